//! Test support shared by the workspace's tests and benchmarks: real
//! Valkey/Redis servers and a real `NOTIFY_SOCKET` listener. Panics are the
//! error reporting here: this crate only ever runs inside tests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod bench;
pub mod daprd;
pub mod files;
pub mod logs;
pub mod prometheus;

use std::{
    io::{BufRead, BufReader},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

/// The Valkey (or Redis) server binary: `VIRTUFIN_TEST_VALKEY_SERVER`, else
/// `valkey-server`, else `redis-server` from `PATH`.
pub fn valkey_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("VIRTUFIN_TEST_VALKEY_SERVER") {
        return p.into();
    }
    for name in ["valkey-server", "redis-server"] {
        if let Some(p) = which(name) {
            return p;
        }
    }
    panic!(
        "neither valkey-server nor redis-server is on PATH: install one \
         (Debian: apt-get install redis-server) or set VIRTUFIN_TEST_VALKEY_SERVER"
    );
}

/// Finds `name` on `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A port that was free a moment ago: bound by the test, then released for
/// the server that is about to take it. Never the same port twice in one
/// test process: the kernel hands a just-released port out again, so two
/// parallel tests could otherwise both be given it, and the loser's health
/// check would be answered by the winner's server (seen in CI: a daprd that
/// died on "could not listen" looked healthy through another test's daprd).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = l.local_addr().expect("local_addr").port();
        if given.insert(port) {
            return port;
        }
    }
}

/// A running valkey-server/redis-server, killed on drop.
pub struct ValkeyServer {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
    persist: bool,
    password: Option<String>,
    /// Arguments beyond the defaults (kept across restarts).
    extra: Vec<String>,
}

impl ValkeyServer {
    /// Stops the server's process (SIGSTOP): its port still takes
    /// connections, nothing answers them — as a host that went silent.
    pub fn pause(&self) {
        signal(self.child.id(), "-STOP");
    }

    /// Lets a paused server run again (SIGCONT).
    pub fn resume(&self) {
        signal(self.child.id(), "-CONT");
    }

    /// Starts a server without persistence on a port this test bound.
    pub fn start() -> Self {
        Self::start_on(free_port(), None, false)
    }

    /// Starts a server with append-only persistence in a fresh directory.
    pub fn start_persistent() -> Self {
        Self::start_on(free_port(), None, true)
    }

    /// Starts a server that requires `password` (`--requirepass`).
    pub fn start_with_password(password: &str) -> Self {
        Self::spawn(
            free_port(),
            None,
            false,
            Some(password.to_owned()),
            Vec::new(),
        )
    }

    /// Starts a replica of `primary` (`--replicaof`), answering as soon as
    /// its own port is open (it syncs in the background).
    pub fn start_replica_of(primary: &ValkeyServer) -> Self {
        let extra = vec![
            "--replicaof".into(),
            "127.0.0.1".into(),
            primary.port.to_string(),
        ];
        Self::spawn(free_port(), None, false, None, extra)
    }

    /// Starts a server on `port`, reusing `dir` (for restarts) when given.
    /// Returns once the server logs that it accepts connections.
    pub fn start_on(port: u16, dir: Option<tempfile::TempDir>, persist: bool) -> Self {
        Self::spawn(port, dir, persist, None, Vec::new())
    }

    fn spawn(
        port: u16,
        dir: Option<tempfile::TempDir>,
        persist: bool,
        password: Option<String>,
        extra: Vec<String>,
    ) -> Self {
        let dir = dir.unwrap_or_else(|| tempfile::tempdir().expect("tempdir"));
        let mut cmd = Command::new(valkey_binary());
        cmd.arg("--port")
            .arg(port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--dir")
            .arg(dir.path())
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg(if persist { "yes" } else { "no" })
            .arg("--appendfsync")
            .arg("always")
            .arg("--logfile")
            .arg("")
            .arg("--daemonize")
            .arg("no")
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if let Some(p) = &password {
            cmd.arg("--requirepass").arg(p);
        }
        cmd.args(&extra);
        let mut child = cmd.spawn().expect("start valkey-server");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if !sent && line.contains("Ready to accept connections") {
                    let _ = tx.send(());
                    sent = true;
                }
            }
        });
        if rx.recv_timeout(Duration::from_secs(20)).is_err() {
            let _ = child.kill();
            panic!("valkey-server on port {port} did not become ready");
        }
        Self {
            child,
            port,
            dir,
            persist,
            password,
            extra,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops the server (SIGKILL: whatever was acknowledged with
    /// `appendfsync always` is on disk) and starts it again on the same port
    /// with the same data directory.
    pub fn restart(self) -> Self {
        let mut this = self;
        let _ = this.child.kill();
        let _ = this.child.wait();
        let port = this.port;
        let persist = this.persist;
        let password = this.password.take();
        let extra = std::mem::take(&mut this.extra);
        // Move the directory out without running Drop's kill twice.
        let dir = std::mem::replace(&mut this.dir, tempfile::tempdir().expect("tempdir"));
        drop(this);
        Self::spawn(port, Some(dir), persist, password, extra)
    }

    /// Stops the server and returns its data directory and port.
    pub fn stop(mut self) -> (u16, tempfile::TempDir) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"));
        (self.port, dir)
    }
}

impl Drop for ValkeyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Valkey Sentinel (the server binary in `--sentinel` mode) watching the
/// primary `name`, killed on drop.
pub struct Sentinel {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Sentinel {
    /// Starts a Sentinel monitoring `primary` as `name` with `quorum`,
    /// declaring it down after `down_after` without an answer. Returns once
    /// it monitors the primary.
    pub fn start(primary: &ValkeyServer, name: &str, quorum: u32, down_after: Duration) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let conf = dir.path().join("sentinel.conf");
        let ms = down_after.as_millis();
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\n\
                 sentinel monitor {name} 127.0.0.1 {} {quorum}\n\
                 sentinel down-after-milliseconds {name} {ms}\n\
                 sentinel failover-timeout {name} {}\n",
                dir.path().display(),
                primary.port,
                (ms * 4).max(1000),
            ),
        )
        .expect("sentinel.conf");
        let mut child = Command::new(valkey_binary())
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start a sentinel");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if !sent && line.contains("+monitor master") {
                    let _ = tx.send(());
                    sent = true;
                }
            }
        });
        if rx.recv_timeout(Duration::from_secs(20)).is_err() {
            let _ = child.kill();
            panic!("sentinel on port {port} did not start monitoring");
        }
        Self {
            child,
            port,
            _dir: dir,
        }
    }

    /// Stops the Sentinel's process (SIGSTOP): its port still takes
    /// connections, nothing answers them.
    pub fn pause(&self) {
        signal(self.child.id(), "-STOP");
    }

    /// Lets a paused Sentinel run again (SIGCONT).
    pub fn resume(&self) {
        signal(self.child.id(), "-CONT");
    }
}

/// Sends `sig` (kill(1)'s spelling, e.g. `-STOP`) to process `pid`.
pub(crate) fn signal(pid: u32, sig: &str) {
    let sent = Command::new("kill")
        .arg(sig)
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success());
    assert!(sent, "kill {sig} {pid} failed");
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A datagram socket standing in for systemd's `NOTIFY_SOCKET`.
pub struct NotifyListener {
    inner: virtufin_common::notify::Listener,
    _dir: tempfile::TempDir,
}

impl NotifyListener {
    pub fn bind() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let inner = virtufin_common::notify::Listener::bind(dir.path().join("notify.sock"))
            .expect("bind notify socket");
        Self { inner, _dir: dir }
    }

    pub fn path(&self) -> &Path {
        self.inner.path()
    }

    /// The next notification (one datagram, e.g. "READY=1\nSTATUS=...").
    pub async fn recv(&self, within: Duration) -> Option<String> {
        tokio::time::timeout(within, self.inner.recv())
            .await
            .ok()?
            .ok()
    }

    /// Waits for a datagram with a line starting with `needle`; returns
    /// every datagram seen on the way (the last one holds it).
    pub async fn wait_for(&self, needle: &str, within: Duration) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv(left).await {
                Some(m) => {
                    let hit = m.lines().any(|l| l.starts_with(needle));
                    seen.push(m);
                    if hit {
                        return seen;
                    }
                }
                None => panic!("no notification '{needle}' within {within:?}; saw {seen:?}"),
            }
        }
    }
}

/// Echoes every text and binary frame of every WebSocket client that
/// connects to `listener`, until the task is dropped.
pub async fn ws_echo_serve(listener: tokio::net::TcpListener) {
    use futures_util::{SinkExt, StreamExt};
    while let Ok((tcp, _)) = listener.accept().await {
        tokio::spawn(async move {
            let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                return;
            };
            while let Some(Ok(m)) = ws.next().await {
                if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// A WebSocket echo peer on a port of its own; its URL.
pub async fn ws_echo() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind an echo peer: {e}"));
    let url = match l.local_addr() {
        Ok(a) => format!("ws://{a}/"),
        Err(e) => panic!("echo peer address: {e}"),
    };
    tokio::spawn(ws_echo_serve(l));
    url
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    /// Thousands of picks from one process (a test binary's lifetime) are
    /// all distinct, although the kernel repeats released ports.
    #[test]
    fn free_port_never_repeats_in_a_process() {
        let picks: Vec<u16> = (0..3000).map(|_| super::free_port()).collect();
        let distinct: BTreeSet<_> = picks.iter().collect();
        assert_eq!(distinct.len(), picks.len(), "a port was handed out twice");
    }
}
