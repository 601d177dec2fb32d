//! The virtufin-websocketmanager binary under a real NOTIFY_SOCKET: no
//! READY until the api answers, not live (and no watchdog pings) once the
//! api has been away past the grace period, READY and pings when it is
//! back, STOPPING on SIGTERM; bad settings exit 1 with one line.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{process::Stdio, time::Duration};

use tokio::process::Command;
use virtufin_testkit::{NotifyListener, ValkeyServer, free_port};

const BIN: &str = env!("CARGO_BIN_EXE_virtufin-websocketmanager");

async fn status_of(url: &str) -> u16 {
    reqwest::get(url)
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_follows_the_api_and_liveness_its_grace() {
    let notify = NotifyListener::bind();
    let (api_grpc, api_http, http, grpc) = (free_port(), free_port(), free_port(), free_port());
    let mut child = Command::new(BIN)
        .env("ASPNETCORE_URLS", format!("http://127.0.0.1:{http}"))
        .env("VIRTUFIN_GRPC_PORT", grpc.to_string())
        .env("VIRTUFIN_API_HOST", "127.0.0.1")
        .env("VIRTUFIN_API_GRPC_PORT", api_grpc.to_string())
        .env("VIRTUFIN_API_GRACE", "500ms")
        .env("VIRTUFIN_PROBE_INTERVAL", "100ms")
        .env("VIRTUFIN_INSTANCE_ID", "proc-test")
        .env("NOTIFY_SOCKET", notify.path())
        .env("WATCHDOG_USEC", "200000")
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let seen = notify
        .wait_for("STATUS=waiting for api", Duration::from_secs(20))
        .await;
    assert!(seen.iter().all(|m| !m.contains("READY=1")), "{seen:?}");
    let live = format!("http://127.0.0.1:{http}/health/live");
    common::wait_until(|| {
        let l = live.clone();
        async move { status_of(&l).await == 503 }
    })
    .await;
    assert_eq!(
        status_of(&format!("http://127.0.0.1:{http}/health")).await,
        503
    );
    // Not live: after what was already queued, no WATCHDOG=1 for several
    // watchdog periods.
    while notify.recv(Duration::from_millis(20)).await.is_some() {}
    let deadline = tokio::time::Instant::now() + Duration::from_millis(600);
    while let Some(m) = notify
        .recv(deadline.saturating_duration_since(tokio::time::Instant::now()))
        .await
    {
        assert!(!m.contains("WATCHDOG=1"), "pinged while not live: {m}");
    }

    // The api comes up on the port the service expects: READY=1.
    let valkey = ValkeyServer::start();
    let api = common::Api::start_on(&valkey, api_grpc, api_http).await;
    let seen = notify.wait_for("READY=1", Duration::from_secs(20)).await;
    assert!(
        seen.last()
            .unwrap()
            .contains("STATUS=virtufin-websocketmanager ready"),
        "{seen:?}"
    );
    notify.wait_for("WATCHDOG=1", Duration::from_secs(5)).await;
    assert_eq!(status_of(&live).await, 200);

    let pid = child.id().unwrap().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .unwrap()
            .success()
    );
    notify.wait_for("STOPPING=1", Duration::from_secs(10)).await;
    let st = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(st.success(), "{st:?}");
    api.stop().await;
}

#[tokio::test]
async fn bad_settings_exit_1_naming_the_setting() {
    for (k, v) in [
        ("VIRTUFIN_WS_RECONNECT_MAX_ATTEMPTS", "0"),
        ("VIRTUFIN_API_GRPC_PORT", "http"),
        ("VIRTUFIN_WS_SEND_TIMEOUT", "forever"),
        ("ASPNETCORE_URLS", "ftp://x"),
        ("VIRTUFIN_WS_HEARTBEAT_INTERVAL", "0s"),
        // Twice the default 10 s heartbeat: live instances would look gone.
        ("VIRTUFIN_WS_RECLAIM_AFTER", "20s"),
    ] {
        // Bounded: a setting that is not refused starts the service.
        let out = tokio::time::timeout(
            common::WAIT,
            Command::new(BIN).env(k, v).kill_on_drop(true).output(),
        )
        .await
        .unwrap_or_else(|_| panic!("{k}={v} was not refused: the service started"))
        .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{k}={v}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(k), "{k}: {err}");
    }
}
