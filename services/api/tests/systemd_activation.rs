//! The virtufin-api binary under systemd's socket-activation and reload
//! protocols, outside a container: listeners passed by the real
//! `systemd-socket-activate` (LISTEN_FDS/LISTEN_FDNAMES) and accepted from
//! only once the api is ready; SIGHUP (what `Type=notify-reload` sends)
//! re-reading the keys, the services file and the log filter, refusing bad
//! ones while the service stays up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{process::Stdio, time::Duration};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    process::{Child, Command},
};
use virtufin_api_client::{ApiClient, ClientError, pb};
use virtufin_testkit::{NotifyListener, ValkeyServer, free_port, which};

const BIN: &str = env!("CARGO_BIN_EXE_virtufin-api");

/// `GET /health` on a fresh connection: the status code, or the error.
async fn get_health(port: u16) -> Result<u16, String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&buf);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no HTTP status in {text:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activated_api_uses_the_passed_sockets_and_accepts_only_once_ready() {
    let activate = which("systemd-socket-activate")
        .expect("systemd-socket-activate (Debian package systemd) is needed for this test");
    let notify = NotifyListener::bind();
    let (http, grpc) = (free_port(), free_port());
    // The configured ports: the passed sockets must win over them.
    let (decoy_http, decoy_grpc) = (free_port(), free_port());
    let valkey_port = free_port();
    let mut child = Command::new(activate)
        .arg("-l")
        .arg(format!("127.0.0.1:{http}"))
        .arg("-l")
        .arg(format!("127.0.0.1:{grpc}"))
        .arg("--fdname=http:grpc")
        .arg("-E")
        .arg(format!("NOTIFY_SOCKET={}", notify.path().display()))
        .args(["-E", "RUST_LOG=info", "-E", "VIRTUFIN_PROBE_INTERVAL=100ms"])
        .arg("-E")
        .arg(format!("ASPNETCORE_URLS=http://127.0.0.1:{decoy_http}"))
        .arg("-E")
        .arg(format!("VIRTUFIN_GRPC_PORT={decoy_grpc}"))
        .arg("-E")
        .arg(format!(
            "VIRTUFIN_VALKEY_URL=redis://127.0.0.1:{valkey_port}"
        ))
        .arg(BIN)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // systemd-socket-activate says when both sockets listen.
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut listening = 0;
    while listening < 2 {
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .expect("systemd-socket-activate did not start listening")
            .unwrap()
            .expect("systemd-socket-activate ended");
        if line.starts_with("Listening on") {
            listening += 1;
        }
    }
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    // A request on the HTTP socket starts the api (socket activation) ...
    let mut request = tokio::spawn(get_health(http));
    // ... which runs, waits for Valkey, and is not ready.
    let seen = notify
        .wait_for("STATUS=waiting for", Duration::from_secs(20))
        .await;
    assert!(seen.iter().all(|m| !m.contains("READY=1")), "{seen:?}");
    // The request waits in the backlog: no answer from a half-started api
    // (bound by itself, the api answers 503 meanwhile).
    assert!(
        tokio::time::timeout(Duration::from_secs(1), &mut request)
            .await
            .is_err(),
        "the api answered before it was ready"
    );
    // It listens on the passed sockets only, not on its configured ports.
    for port in [decoy_http, decoy_grpc] {
        let e = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{port}");
    }
    // Valkey comes: READY=1, and the waiting request is answered, ready.
    let _valkey = ValkeyServer::start_on(valkey_port, None, false);
    notify.wait_for("READY=1", Duration::from_secs(20)).await;
    let code = tokio::time::timeout(Duration::from_secs(10), request)
        .await
        .expect("the waiting request was not answered once ready")
        .unwrap();
    assert_eq!(code, Ok(200));
    let api = ApiClient::connect(&format!("127.0.0.1:{grpc}"))
        .await
        .unwrap();
    assert!(api.handshake().await.is_ok());
    child.kill().await.unwrap();
}

const K1: &str = "reload-test-key-one-0123";
const K2: &str = "reload-test-key-two-0123";

async fn sighup(child: &Child) {
    let s = Command::new("kill")
        .arg("-HUP")
        .arg(child.id().unwrap().to_string())
        .status()
        .await
        .unwrap();
    assert!(s.success());
}

/// Waits for the reload's notifications: RELOADING=1 with MONOTONIC_USEC=,
/// then READY=1; returns the final STATUS=.
async fn reload(child: &Child, notify: &NotifyListener) -> String {
    sighup(child).await;
    let seen = notify.wait_for("READY=1", Duration::from_secs(10)).await;
    let reloading = seen
        .iter()
        .position(|m| m.contains("RELOADING=1"))
        .unwrap_or_else(|| panic!("no RELOADING=1 before READY=1: {seen:?}"));
    let usec = virtufin_common::notify::field(&seen[reloading], "MONOTONIC_USEC")
        .unwrap_or_else(|| panic!("RELOADING=1 without MONOTONIC_USEC=: {seen:?}"));
    assert!(usec.parse::<u64>().unwrap() > 0);
    let last = seen.last().unwrap();
    virtufin_common::notify::field(last, "STATUS")
        .unwrap_or_default()
        .to_owned()
}

async fn get_with(grpc: u16, key: Option<&str>) -> Result<(), tonic::Code> {
    let api = ApiClient::connect(&format!("127.0.0.1:{grpc}"))
        .await
        .unwrap()
        .with_key(key)
        .unwrap();
    match api.get("reload", "k").await {
        Ok(_) => Ok(()),
        Err(ClientError::Status(s)) => Err(s.code()),
        Err(e) => panic!("{e}"),
    }
}

async fn services(grpc: u16) -> Vec<String> {
    let api = ApiClient::connect(&format!("127.0.0.1:{grpc}"))
        .await
        .unwrap()
        .with_key(Some(K1))
        .unwrap();
    let mut s = api
        .gateway()
        .list_services(pb::ListServicesRequest {})
        .await
        .unwrap()
        .into_inner()
        .services;
    s.sort();
    s
}

fn services_json(names: &[&str]) -> String {
    let list: Vec<String> = names
        .iter()
        .map(|n| format!(r#"{{"name":"{n}","grpc":{{"host":"127.0.0.1","port":1}}}}"#))
        .collect();
    format!(r#"{{"services":[{}]}}"#, list.join(","))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_keys_services_and_log_filter_and_keeps_them_when_bad() {
    let dir = tempfile::tempdir().unwrap();
    let (keys, svcs, filter) = (
        dir.path().join("keys.yaml"),
        dir.path().join("services.json"),
        dir.path().join("log-filter"),
    );
    std::fs::write(&keys, format!("keys:\n  - {{name: one, key: {K1}}}\n")).unwrap();
    std::fs::write(&svcs, services_json(&["alpha"])).unwrap();
    let notify = NotifyListener::bind();
    let (http, grpc) = (free_port(), free_port());
    let mut child = Command::new(BIN)
        .env_clear()
        .env("RUST_LOG", "info")
        .env("ASPNETCORE_URLS", format!("http://127.0.0.1:{http}"))
        .env("VIRTUFIN_GRPC_PORT", grpc.to_string())
        .env("VIRTUFIN_API_KEYS_FILE", &keys)
        .env("SERVICES_CONFIG_PATH", &svcs)
        // Only SIGHUP re-reads the services file in this test.
        .env("VIRTUFIN_SERVICES_RELOAD_INTERVAL", "1h")
        .env("LOG_FILTER_FILE", &filter)
        .env("NOTIFY_SOCKET", notify.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    notify.wait_for("READY=1", Duration::from_secs(20)).await;
    assert_eq!(
        get_with(grpc, Some(K2)).await,
        Err(tonic::Code::Unauthenticated)
    );
    assert_eq!(services(grpc).await, ["alpha"]);

    // Good new files: all in force after the reload, same process.
    std::fs::write(
        &keys,
        format!("keys:\n  - {{name: one, key: {K1}}}\n  - {{name: two, key: {K2}}}\n"),
    )
    .unwrap();
    std::fs::write(&svcs, services_json(&["alpha", "beta"])).unwrap();
    std::fs::write(&filter, "debug # more\n").unwrap();
    let status = reload(&child, &notify).await;
    assert!(status.contains("reloaded"), "{status}");
    assert!(status.contains("log filter 'debug'"), "{status}");
    assert_eq!(get_with(grpc, Some(K2)).await, Ok(()));
    assert_eq!(services(grpc).await, ["alpha", "beta"]);

    // Bad new files: each refused, naming why; the old ones stay.
    std::fs::write(&keys, "keys: [this is not: valid\n").unwrap();
    std::fs::write(&svcs, "{ not json").unwrap();
    std::fs::write(&filter, "virtufin_api=[[[\n").unwrap();
    let status = reload(&child, &notify).await;
    assert!(status.contains("reload refused"), "{status}");
    for part in ["API keys", "services file", "log filter"] {
        assert!(status.contains(part), "{part} not named: {status}");
    }
    assert!(status.contains(&keys.display().to_string()), "{status}");
    assert_eq!(get_with(grpc, Some(K1)).await, Ok(()));
    assert_eq!(get_with(grpc, Some(K2)).await, Ok(()));
    assert_eq!(services(grpc).await, ["alpha", "beta"]);
    assert_eq!(get_health(http).await, Ok(200), "still serving and ready");
    assert!(child.try_wait().unwrap().is_none(), "the api stayed up");

    // An emptied keys file would turn auth off: refused too.
    std::fs::write(&keys, "").unwrap();
    let status = reload(&child, &notify).await;
    assert!(
        status.contains("reload refused") && status.contains("API keys"),
        "{status}"
    );
    assert_eq!(
        get_with(grpc, None).await,
        Err(tonic::Code::Unauthenticated)
    );
    assert!(child.try_wait().unwrap().is_none(), "the api stayed up");
    child.kill().await.unwrap();
}
