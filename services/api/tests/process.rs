//! The virtufin-api binary as systemd runs it: a real NOTIFY_SOCKET,
//! readiness gated on Valkey, the watchdog, SIGTERM, and configuration
//! errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{process::Stdio, time::Duration};

use tokio::process::{Child, Command};
use virtufin_testkit::{NotifyListener, ValkeyServer, free_port};

const BIN: &str = env!("CARGO_BIN_EXE_virtufin-api");

fn api_command(notify: Option<&NotifyListener>) -> (Command, u16, u16) {
    let (http, grpc) = (free_port(), free_port());
    let mut c = Command::new(BIN);
    c.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        .env("ASPNETCORE_URLS", format!("http://127.0.0.1:{http}"))
        .env("VIRTUFIN_GRPC_PORT", grpc.to_string())
        .env("VIRTUFIN_PROBE_INTERVAL", "100ms")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(n) = notify {
        c.env("NOTIFY_SOCKET", n.path());
    }
    (c, http, grpc)
}

async fn sigterm(child: &Child) {
    let pid = child.id().unwrap().to_string();
    let s = Command::new("kill")
        .arg("-TERM")
        .arg(pid)
        .status()
        .await
        .unwrap();
    assert!(s.success());
}

async fn http_status(port: u16, path: &str) -> u16 {
    match reqwest::get(format!("http://127.0.0.1:{port}{path}")).await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_only_once_valkey_answers() {
    let notify = NotifyListener::bind();
    let valkey_port = free_port();
    let (mut cmd, http, _) = api_command(Some(&notify));
    cmd.env(
        "VIRTUFIN_VALKEY_URL",
        format!("redis://127.0.0.1:{valkey_port}"),
    );
    let mut child = cmd.spawn().unwrap();
    // Valkey is down: the api says what it waits for, and is not ready.
    let seen = notify
        .wait_for("STATUS=waiting for", Duration::from_secs(20))
        .await;
    assert!(seen.iter().all(|m| !m.contains("READY=1")), "{seen:?}");
    let status = seen.last().unwrap();
    assert!(
        status.contains(&format!("127.0.0.1:{valkey_port}")),
        "names the Valkey it waits for: {status}"
    );
    // /health answers 503 meanwhile (the HTTP side is up before readiness).
    let mut code = 0;
    for _ in 0..100 {
        code = http_status(http, "/health").await;
        if code != 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(code, 503);
    assert_eq!(http_status(http, "/health/live").await, 200);
    // Bring Valkey up on that port: READY=1 follows.
    let _valkey = ValkeyServer::start_on(valkey_port, None, false);
    let seen = notify.wait_for("READY=1", Duration::from_secs(20)).await;
    assert!(seen.last().unwrap().contains("STATUS=virtufin-api ready"));
    assert_eq!(http_status(http, "/health").await, 200);
    // SIGTERM: STOPPING=1, then a clean exit.
    sigterm(&child).await;
    notify.wait_for("STOPPING=1", Duration::from_secs(10)).await;
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchdog_pings_while_healthy() {
    let notify = NotifyListener::bind();
    let (mut cmd, _, _) = api_command(Some(&notify));
    cmd.env("WATCHDOG_USEC", "200000");
    let mut child = cmd.spawn().unwrap();
    notify.wait_for("READY=1", Duration::from_secs(20)).await;
    notify.wait_for("WATCHDOG=1", Duration::from_secs(5)).await;
    notify.wait_for("WATCHDOG=1", Duration::from_secs(5)).await;
    child.kill().await.unwrap();
}

async fn fails_with(env: &[(&str, &str)], needle: &str) {
    let (mut cmd, _, _) = api_command(None);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(20), cmd.output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{env:?}: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(
        lines[0].contains(needle),
        "{env:?}: '{}' lacks '{needle}'",
        lines[0]
    );
}

#[tokio::test]
async fn bad_settings_exit_1_naming_the_setting() {
    fails_with(&[("VIRTUFIN_GRPC_PORT", "abc")], "VIRTUFIN_GRPC_PORT").await;
    fails_with(&[("VIRTUFIN_GRPC_PORT", "70000")], "VIRTUFIN_GRPC_PORT").await;
    fails_with(&[("ASPNETCORE_URLS", "https://+:5001")], "ASPNETCORE_URLS").await;
    fails_with(&[("VIRTUFIN_BACKEND", "cassandra")], "VIRTUFIN_BACKEND").await;
    fails_with(&[("VIRTUFIN_BACKEND", "valkey")], "VIRTUFIN_VALKEY_URL").await;
    fails_with(
        &[("VIRTUFIN_VALKEY_URL", "http://nope")],
        "VIRTUFIN_VALKEY_URL",
    )
    .await;
    fails_with(
        &[("VIRTUFIN_PROCESSING_TIMEOUT", "soon")],
        "VIRTUFIN_PROCESSING_TIMEOUT",
    )
    .await;
    fails_with(&[("VIRTUFIN_STREAM_MAXLEN", "0")], "VIRTUFIN_STREAM_MAXLEN").await;
}

#[tokio::test]
async fn a_taken_port_exits_1_naming_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    fails_with(
        &[("VIRTUFIN_GRPC_PORT", &port)],
        &format!("127.0.0.1:{port}"),
    )
    .await;
}

/// A directory standing in for systemd's $CREDENTIALS_DIRECTORY.
fn credentials(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, content) in files {
        std::fs::write(dir.path().join(name), content).unwrap();
    }
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_password_from_the_systemd_credential() {
    let valkey = ValkeyServer::start_with_password("s3cret-pw");
    // Without the password the api waits, saying why.
    let notify = NotifyListener::bind();
    let (mut cmd, _, _) = api_command(Some(&notify));
    cmd.env("VIRTUFIN_VALKEY_URL", valkey.url());
    let mut child = cmd.spawn().unwrap();
    // (The first status says it is connecting; the next ones why it waits.)
    let status = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let seen = notify
                .wait_for("STATUS=waiting for", Duration::from_secs(20))
                .await;
            assert!(seen.iter().all(|m| !m.contains("READY=1")), "{seen:?}");
            let status = seen.last().unwrap().to_lowercase();
            if !status.contains("connecting to") {
                return status;
            }
        }
    })
    .await
    .unwrap();
    assert!(status.contains("auth"), "names the refusal: {status}");
    child.kill().await.unwrap();

    // With the credential valkey-password (as NixOS's LoadCredential= puts
    // it, trailing newline included) it becomes ready: READY=1 follows a
    // state and pub/sub round trip on that Valkey.
    let creds = credentials(&[("valkey-password", "s3cret-pw\n")]);
    let notify = NotifyListener::bind();
    let (mut cmd, _, _) = api_command(Some(&notify));
    cmd.env("VIRTUFIN_VALKEY_URL", valkey.url())
        .env("CREDENTIALS_DIRECTORY", creds.path());
    let mut child = cmd.spawn().unwrap();
    let seen = notify.wait_for("READY=1", Duration::from_secs(20)).await;
    assert!(seen.last().unwrap().contains("STATUS=virtufin-api ready"));
    child.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_password_file_setting_wins_over_the_credential() {
    let valkey = ValkeyServer::start_with_password("right-pw");
    let creds = credentials(&[("valkey-password", "wrong-pw")]);
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), "right-pw").unwrap();
    let notify = NotifyListener::bind();
    let (mut cmd, _, _) = api_command(Some(&notify));
    cmd.env("VIRTUFIN_VALKEY_URL", valkey.url())
        .env("CREDENTIALS_DIRECTORY", creds.path())
        .env("VIRTUFIN_VALKEY_PASSWORD_FILE", file.path());
    let mut child = cmd.spawn().unwrap();
    notify.wait_for("READY=1", Duration::from_secs(20)).await;
    child.kill().await.unwrap();
}

#[tokio::test]
async fn bad_valkey_password_files_exit_1_naming_the_file() {
    let url = "redis://127.0.0.1:1";
    fails_with(
        &[
            ("VIRTUFIN_VALKEY_URL", url),
            ("VIRTUFIN_VALKEY_PASSWORD_FILE", "/nonexistent/valkey-password"),
        ],
        "cannot read the Valkey password file /nonexistent/valkey-password (VIRTUFIN_VALKEY_PASSWORD_FILE)",
    )
    .await;
    let empty = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(empty.path(), "\n").unwrap();
    let shown = empty.path().display().to_string();
    fails_with(
        &[
            ("VIRTUFIN_VALKEY_URL", url),
            ("VIRTUFIN_VALKEY_PASSWORD_FILE", &shown),
        ],
        &format!("the Valkey password file {shown} (VIRTUFIN_VALKEY_PASSWORD_FILE) is empty"),
    )
    .await;
    let pw = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(pw.path(), "pw").unwrap();
    let shown = pw.path().display().to_string();
    fails_with(
        &[
            ("VIRTUFIN_VALKEY_URL", "redis://:other@127.0.0.1:1"),
            ("VIRTUFIN_VALKEY_PASSWORD_FILE", &shown),
        ],
        "VIRTUFIN_VALKEY_URL carries a password and",
    )
    .await;
}
