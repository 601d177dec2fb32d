//! A real daprd (built from `packaging/daprd`, see `scripts/daprd`) on
//! ports this test bound, with the deployment's own resource files
//! (`packaging/dapr/resources`, JSON written out as YAML) on a real Valkey.
//!
//! Where no daprd is available the tests that need one say SKIP loudly on
//! stderr and return, unless `VIRTUFIN_REQUIRE_DAPRD=1` (CI sets it), which
//! turns the missing binary into a failure.

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{ValkeyServer, free_port, which};

/// The daprd binary: `VIRTUFIN_DAPRD`, else `daprd` on `PATH`.
pub fn binary() -> Option<PathBuf> {
    match std::env::var_os("VIRTUFIN_DAPRD") {
        Some(p) if !p.is_empty() => Some(p.into()),
        _ => which("daprd"),
    }
}

/// The daprd binary, or `None` after a loud SKIP line naming `what` did not
/// run. Panics instead when `VIRTUFIN_REQUIRE_DAPRD=1`.
pub fn require(what: &str) -> Option<PathBuf> {
    if let Some(b) = binary() {
        return Some(b);
    }
    let msg = format!(
        "no daprd (set VIRTUFIN_DAPRD or put daprd on PATH; ./scripts/daprd builds it with Go): \
         {what} did not run against real daprd"
    );
    if std::env::var("VIRTUFIN_REQUIRE_DAPRD").as_deref() == Ok("1") {
        panic!("{msg}");
    }
    eprintln!("SKIP: {msg}");
    None
}

/// The deployment's resource files (`packaging/dapr/resources`).
pub fn resources_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../packaging/dapr/resources")
}

/// How the resource files are filled in.
#[derive(Debug, Clone)]
pub struct DaprdOptions {
    pub app_id: String,
    /// pubsub.redis `processingTimeout` (the deployment: 60s).
    pub processing_timeout: Duration,
    /// pubsub.redis `redeliverInterval` (the deployment: 15s).
    pub redeliver_interval: Duration,
    /// Leave the resiliency policy out (to show what it is for).
    pub without_resiliency: bool,
    /// Override of the pubsub component's `concurrency` (to show what the
    /// deployment's value is for).
    pub concurrency: Option<u32>,
}

impl Default for DaprdOptions {
    fn default() -> Self {
        Self {
            app_id: "virtufin-api".into(),
            processing_timeout: Duration::from_secs(60),
            redeliver_interval: Duration::from_secs(15),
            without_resiliency: false,
            concurrency: None,
        }
    }
}

fn millis(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// A running daprd, killed on drop. Its log is kept in its directory and
/// printed when it fails to start.
pub struct Daprd {
    child: Option<Child>,
    binary: PathBuf,
    pub grpc_port: u16,
    pub http_port: u16,
    dir: tempfile::TempDir,
    options: DaprdOptions,
    /// The ports were picked here (not given by the caller): a collision
    /// may pick others.
    repick_ports: bool,
}

impl Daprd {
    /// Starts daprd on fresh ports for `valkey` and waits until
    /// `/v1.0/healthz` answers 204.
    pub fn start(binary: &Path, valkey: &ValkeyServer, options: DaprdOptions) -> Self {
        let mut d = Self::prepare(binary, valkey.port, free_port(), free_port(), options);
        d.repick_ports = true;
        d.spawn();
        d
    }

    /// Starts daprd on the given ports (for a daprd that the api expects
    /// at known ports).
    pub fn start_on(
        binary: &Path,
        valkey_port: u16,
        grpc_port: u16,
        http_port: u16,
        options: DaprdOptions,
    ) -> Self {
        let mut d = Self::prepare(binary, valkey_port, grpc_port, http_port, options);
        d.spawn();
        d
    }

    fn prepare(
        binary: &Path,
        valkey_port: u16,
        grpc_port: u16,
        http_port: u16,
        options: DaprdOptions,
    ) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let resources = dir.path().join("resources");
        std::fs::create_dir(&resources).expect("resources dir");
        let secrets = dir.path().join("secrets.json");
        std::fs::write(&secrets, "{}").expect("secrets file");
        for entry in std::fs::read_dir(resources_dir()).expect("packaging/dapr/resources") {
            let path = entry.expect("resource entry").path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let stem = path
                .file_stem()
                .expect("file name")
                .to_string_lossy()
                .into_owned();
            if options.without_resiliency && stem == "resiliency" {
                continue;
            }
            let mut text = std::fs::read_to_string(&path).expect("read a resource file");
            text = text
                .replace("@VALKEY_HOST@", &format!("127.0.0.1:{valkey_port}"))
                .replace("@SECRETS_FILE@", &secrets.display().to_string())
                .replace("@PROCESSING_TIMEOUT@", &millis(options.processing_timeout))
                .replace("@REDELIVER_INTERVAL@", &millis(options.redeliver_interval));
            if let Some(c) = options.concurrency {
                text = text.replace(
                    r#"{"name": "concurrency", "value": "1024"}"#,
                    &format!(r#"{{"name": "concurrency", "value": "{c}"}}"#),
                );
            }
            assert!(!text.contains('@'), "unfilled placeholder in {stem}");
            // JSON is YAML; daprd loads only *.yaml / *.yml.
            std::fs::write(resources.join(format!("{stem}.yaml")), text)
                .expect("write a resource file");
        }
        Self {
            child: None,
            binary: binary.to_owned(),
            grpc_port,
            http_port,
            dir,
            options,
            repick_ports: false,
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("daprd.log")
    }

    /// Starts daprd and waits until it is healthy. The ports come from
    /// [`free_port`], free a moment before daprd binds them: another
    /// process of a parallel test can take one in between (seen under
    /// load: the internal gRPC port). daprd cannot take a bound socket, so
    /// a start that failed on "address already in use" is tried again on
    /// fresh ports (those this helper picked), up to five times.
    fn spawn(&mut self) {
        for attempt in 1..=5 {
            let from = self.log().len();
            match self.spawn_once() {
                Ok(()) => return,
                Err(why) => {
                    let this_try = self.log().get(from..).unwrap_or_default().to_owned();
                    // daprd says "address already in use" for its internal
                    // gRPC port, only "could not listen on any endpoint"
                    // for its HTTP and gRPC ones (both seen under load).
                    let lost_port = this_try.contains("address already in use")
                        || this_try.contains("could not listen on any endpoint");
                    if attempt < 5 && lost_port {
                        eprintln!(
                            "daprd lost a port to another process (attempt {attempt}); again on fresh ports"
                        );
                        if self.repick_ports {
                            self.grpc_port = free_port();
                            self.http_port = free_port();
                        }
                        continue;
                    }
                    panic!("{why}:\n{}", self.log());
                }
            }
        }
    }

    fn spawn_once(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("daprd log");
        // The arguments of the NixOS module's virtufin-daprd.service.
        let child = Command::new(&self.binary)
            .args(["--mode", "standalone", "--app-id", &self.options.app_id])
            .args(["--app-protocol", "grpc"])
            .args(["--dapr-listen-addresses", "127.0.0.1"])
            .args(["--dapr-internal-grpc-listen-address", "127.0.0.1"])
            .args(["--dapr-http-port", &self.http_port.to_string()])
            .args(["--dapr-grpc-port", &self.grpc_port.to_string()])
            // Its own pick is the same port in every daprd: several in one
            // test run would collide.
            .args(["--dapr-internal-grpc-port", &free_port().to_string()])
            .arg("--resources-path")
            .arg(self.dir.path().join("resources"))
            .arg("--enable-metrics=false")
            .env("HOME", self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.binary.display()));
        self.child = Some(child);
        self.wait_healthy(Duration::from_secs(30))
    }

    fn wait_healthy(&mut self, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            // Exit first: a 204 must come from a daprd that is still ours.
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return Err(format!("daprd exited ({status}) before it was healthy"));
            }
            if healthz(self.http_port) == Some(204) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("daprd not healthy within {within:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What daprd logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// SIGKILLs daprd (a crash): every stream and connection drops at once.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts daprd again on the same ports with the same resources.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Freezes daprd (SIGSTOP): it keeps its sockets open but answers
    /// nothing.
    pub fn pause(&self) {
        if let Some(c) = &self.child {
            crate::signal(c.id(), "-STOP");
        }
    }

    /// Lets a paused daprd run again (SIGCONT).
    pub fn resume(&self) {
        if let Some(c) = &self.child {
            crate::signal(c.id(), "-CONT");
        }
    }
}

impl Drop for Daprd {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- daprd's log (the test failed) ----\n{}", self.log());
        }
    }
}

/// The status of `GET /v1.0/healthz` on `port`, if anything answers.
pub fn healthz(port: u16) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /v1.0/healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let head = String::from_utf8_lossy(&buf);
    head.split_whitespace().nth(1)?.parse().ok()
}
