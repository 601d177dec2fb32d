//! `virtufin up`: the whole stack on this machine, in dependency order —
//! Valkey (when one is installed), the api, then the websocketmanager and
//! the workmanager — each waited for through
//! its own `NOTIFY_SOCKET` exactly as systemd would, and stopped in reverse
//! order on Ctrl-C.

use std::{
    path::{Path, PathBuf},
    process::{ExitCode, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};
use clap::Args;
use nix::{sys::signal::Signal, unistd::Pid};
use tokio::process::{Child, Command};
use virtufin_common::notify::{Listener, field};

#[derive(Debug, Args)]
pub struct UpArgs {
    /// `auto`: start valkey-server (or redis-server) when one is installed,
    /// else use the embedded backend; `embedded`; or the redis:// URL of a
    /// Valkey that is already running.
    #[arg(long, env = "VIRTUFIN_UP_VALKEY", default_value = "auto")]
    valkey: String,
    /// Port of the Valkey that `up` starts.
    #[arg(long, default_value_t = 6380)]
    valkey_port: u16,
    /// Where `up` keeps Valkey's data and the notify sockets.
    #[arg(long, env = "VIRTUFIN_STATE_DIR", default_value = ".virtufin")]
    state_dir: PathBuf,
    /// Where the service binaries are (default: beside this binary, then PATH).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// How long each service may take to report READY=1.
    #[arg(long, default_value = "30s", value_parser = humantime_duration)]
    ready_timeout: Duration,
}

fn humantime_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("'{s}': {e} (e.g. 30s, 2m)"))
}

/// One process that `up` started.
struct Running {
    name: String,
    child: Child,
    _notify: Listener,
}

fn find_binary(name: &str, bin_dir: Option<&Path>) -> anyhow::Result<PathBuf> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf));
    for dir in bin_dir.map(Path::to_path_buf).into_iter().chain(beside) {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    if let Some(p) = which(name) {
        return Ok(p);
    }
    bail!(
        "{name} was not found beside this binary nor on PATH: build it with `cargo build --release` (or pass --bin-dir)"
    )
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Starts `cmd` with its own NOTIFY_SOCKET and waits for READY=1, passing
/// its STATUS= lines on. Fails if it exits first or takes too long.
async fn start_notify(
    name: &str,
    mut cmd: Command,
    state_dir: &Path,
    timeout: Duration,
) -> anyhow::Result<Running> {
    let notify = Listener::bind(state_dir.join(format!("{name}.notify")))
        .with_context(|| format!("cannot create the notify socket for {name}"))?;
    cmd.env("NOTIFY_SOCKET", notify.path())
        // Own process group: Ctrl-C reaches `up` only, which then stops the
        // services in reverse order.
        .process_group(0)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {name}"))?;
    let started = tokio::time::Instant::now();
    let deadline = started + timeout;
    loop {
        tokio::select! {
            m = notify.recv() => {
                let m = m.with_context(|| format!("reading {name}'s notifications"))?;
                if let Some(s) = field(&m, "STATUS") {
                    tracing::info!(service = name, "{s}");
                }
                if field(&m, "READY") == Some("1") {
                    tracing::info!(service = name, after = ?started.elapsed(), "ready");
                    return Ok(Running { name: name.to_owned(), child, _notify: notify });
                }
            }
            status = child.wait() => {
                let status = status?;
                bail!("{name} exited before it was ready ({status}); its log is above");
            }
            _ = tokio::time::sleep_until(deadline) => {
                let _ = child.start_kill();
                bail!("{name} did not report READY=1 within {timeout:?}; its last status is above");
            }
        }
    }
}

async fn stop(mut r: Running) {
    if let Some(pid) = r.child.id() {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    }
    match tokio::time::timeout(Duration::from_secs(15), r.child.wait()).await {
        Ok(Ok(s)) => tracing::info!(service = %r.name, %s, "stopped"),
        _ => {
            tracing::warn!(service = %r.name, "did not stop within 15 s; killing it");
            let _ = r.child.kill().await;
        }
    }
}

pub async fn run(args: UpArgs) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("cannot create {}", args.state_dir.display()))?;
    let state_dir = args
        .state_dir
        .canonicalize()
        .unwrap_or_else(|_| args.state_dir.clone());
    let mut running: Vec<Running> = Vec::new();
    let result = start_all(&args, &state_dir, &mut running).await;
    let code = match result {
        Ok(()) => {
            println!("virtufin stack is up:");
            println!(
                "  virtufin-api                gRPC 127.0.0.1:5002   HTTP http://127.0.0.1:5001/health"
            );
            println!(
                "  virtufin-websocketmanager   gRPC 127.0.0.1:5202   HTTP http://127.0.0.1:5201/health"
            );
            println!(
                "  virtufin-workmanager        gRPC 127.0.0.1:5102   HTTP http://127.0.0.1:5101/health"
            );
            println!("try: virtufin smoke    (Ctrl-C stops the stack)");
            wait_for_stop(&mut running).await
        }
        Err(e) => {
            eprintln!("virtufin up: {e:#}");
            ExitCode::from(1)
        }
    };
    while let Some(r) = running.pop() {
        stop(r).await;
    }
    Ok(code)
}

async fn start_all(
    args: &UpArgs,
    state_dir: &Path,
    running: &mut Vec<Running>,
) -> anyhow::Result<()> {
    let valkey_url = match args.valkey.as_str() {
        "embedded" => None,
        "auto" => match which("valkey-server").or_else(|| which("redis-server")) {
            Some(bin) => {
                let dir = state_dir.join("valkey");
                std::fs::create_dir_all(&dir)?;
                let mut cmd = Command::new(&bin);
                cmd.arg("--port")
                    .arg(args.valkey_port.to_string())
                    .arg("--bind")
                    .arg("127.0.0.1")
                    .arg("--dir")
                    .arg(&dir)
                    .arg("--appendonly")
                    .arg("yes")
                    .arg("--supervised")
                    .arg("systemd")
                    .arg("--daemonize")
                    .arg("no")
                    .stdout(Stdio::null());
                running.push(start_notify("valkey", cmd, state_dir, args.ready_timeout).await?);
                Some(format!("redis://127.0.0.1:{}", args.valkey_port))
            }
            None => {
                tracing::warn!(
                    "no valkey-server or redis-server on PATH: using the embedded backend (state is lost when the stack stops)"
                );
                None
            }
        },
        url => Some(url.to_owned()),
    };
    // The Gateway's backends: the two services started below (unless the
    // caller brought a services file of their own).
    let services = state_dir.join("services.json");
    if !services.exists() {
        std::fs::write(&services, LOCAL_SERVICES)
            .with_context(|| format!("cannot write {}", services.display()))?;
    }
    let mut api = Command::new(find_binary("virtufin-api", args.bin_dir.as_deref())?);
    api.env("ASPNETCORE_URLS", "http://127.0.0.1:5001")
        .env("VIRTUFIN_GRPC_PORT", "5002")
        .env("SERVICES_CONFIG_PATH", &services);
    match &valkey_url {
        Some(url) => {
            api.env("VIRTUFIN_BACKEND", "valkey")
                .env("VIRTUFIN_VALKEY_URL", url);
        }
        None => {
            api.env("VIRTUFIN_BACKEND", "memory")
                .env_remove("VIRTUFIN_VALKEY_URL");
        }
    }
    running.push(start_notify("virtufin-api", api, state_dir, args.ready_timeout).await?);

    // After the api (it handshakes with it before reporting ready).
    let mut wsm = Command::new(find_binary(
        "virtufin-websocketmanager",
        args.bin_dir.as_deref(),
    )?);
    wsm.env("ASPNETCORE_URLS", "http://127.0.0.1:5201")
        .env("VIRTUFIN_GRPC_PORT", "5202")
        .env("VIRTUFIN_API_HOST", "127.0.0.1")
        .env("VIRTUFIN_API_GRPC_PORT", "5002");
    running.push(
        start_notify(
            "virtufin-websocketmanager",
            wsm,
            state_dir,
            args.ready_timeout,
        )
        .await?,
    );

    let mut wm = Command::new(find_binary(
        "virtufin-workmanager",
        args.bin_dir.as_deref(),
    )?);
    wm.env("ASPNETCORE_URLS", "http://127.0.0.1:5101")
        .env("VIRTUFIN_GRPC_PORT", "5102")
        .env("VIRTUFIN_API_HOST", "127.0.0.1")
        .env("VIRTUFIN_API_GRPC_PORT", "5002")
        .env("STATE_DIRECTORY", state_dir.join("workmanager"));
    running.push(start_notify("virtufin-workmanager", wm, state_dir, args.ready_timeout).await?);
    Ok(())
}

/// The services file `virtufin up` gives the api: the websocketmanager and
/// the workmanager on their default ports.
const LOCAL_SERVICES: &str = r#"{"services": [
  {"name": "websocketmanager", "grpc": {"host": "127.0.0.1", "port": 5202, "reflectionEnabled": true}},
  {"name": "workmanager", "grpc": {"host": "127.0.0.1", "port": 5102, "reflectionEnabled": true}}
]}
"#;

/// Waits for Ctrl-C / SIGTERM, or for a service to exit on its own.
async fn wait_for_stop(running: &mut [Running]) -> ExitCode {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("virtufin up: cannot watch SIGTERM: {e}");
            return ExitCode::from(1);
        }
    };
    let exited = futures_util::future::select_all(running.iter_mut().map(|r| {
        let name = r.name.clone();
        Box::pin(async move { (name, r.child.wait().await) })
    }));
    tokio::select! {
        _ = tokio::signal::ctrl_c() => { println!("stopping the stack"); ExitCode::SUCCESS }
        _ = term.recv() => { println!("stopping the stack"); ExitCode::SUCCESS }
        ((name, status), _, _) = exited => {
            eprintln!("virtufin up: {name} exited unexpectedly ({status:?}); stopping the rest");
            ExitCode::from(1)
        }
    }
}
