//! `virtufin up` starts the stack and waits for READY=1 through
//! NOTIFY_SOCKET; `virtufin smoke` passes against it; a real Prometheus
//! scrapes the three services' `/metrics` and its queries count exactly
//! the traffic this test made; Ctrl-C stops it.
//! Uses the virtufin-api binary that the workspace build put beside
//! `virtufin`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{path::PathBuf, process::Stdio, time::Duration};

use virtufin_testkit::prometheus::{Prometheus, http_get};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::Command,
};

const CLI: &str = env!("CARGO_BIN_EXE_virtufin");

fn bin_dir() -> PathBuf {
    let dir = PathBuf::from(CLI).parent().unwrap().to_path_buf();
    for bin in [
        "virtufin-api",
        "virtufin-websocketmanager",
        "virtufin-workmanager",
    ] {
        assert!(
            dir.join(bin).is_file(),
            "{bin} is not built in {}: run the tests with `cargo test --workspace`",
            dir.display()
        );
    }
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_then_smoke_then_metrics_then_ctrl_c() {
    let state = tempfile::tempdir().unwrap();
    let mut up = Command::new(CLI)
        .arg("up")
        .arg("--valkey")
        .arg("embedded")
        .arg("--state-dir")
        .arg(state.path())
        .arg("--bin-dir")
        .arg(bin_dir())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // If the test fails half way, stop the stack the way a person would
    // (SIGINT), so `up` stops its services instead of orphaning them.
    let _guard = StopOnDrop(up.id().unwrap());
    let mut lines = BufReader::new(up.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(l) = lines.next_line().await.unwrap() {
            if l.contains("virtufin stack is up") {
                return true;
            }
        }
        false
    })
    .await
    .expect("the stack comes up in time");
    assert!(ready, "up ended before the stack was up");
    // Scraping the three HTTP ports `up` gives the services.
    let prom = tokio::task::block_in_place(|| {
        Prometheus::start(
            &[
                ("virtufin-api", "127.0.0.1:5001".to_owned()),
                ("virtufin-websocketmanager", "127.0.0.1:5201".to_owned()),
                ("virtufin-workmanager", "127.0.0.1:5101".to_owned()),
            ],
            Duration::from_millis(500),
        )
    });

    let smoke = Command::new(CLI).arg("smoke").output().await.unwrap();
    let out = String::from_utf8_lossy(&smoke.stdout);
    assert!(smoke.status.success(), "{out}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("PASS")).count(),
        6,
        "{out}"
    );
    assert!(!out.contains("FAIL"), "{out}");

    let set = Command::new(CLI)
        .args(["state", "set", "cli", "k", "v1"])
        .output()
        .await
        .unwrap();
    assert!(set.status.success());
    let get = Command::new(CLI)
        .args(["state", "get", "cli", "k"])
        .output()
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&get.stdout).unwrap();
    assert_eq!(v["value"], "v1");
    let missing = Command::new(CLI)
        .args(["state", "get", "cli", "nope"])
        .output()
        .await
        .unwrap();
    assert_eq!(missing.status.code(), Some(3));

    // The websocketmanager is up too, after the api: drive it from the CLI
    // against a WebSocket peer of this test.
    let peer = virtufin_testkit::ws_echo().await;
    let out = Command::new(CLI)
        .args(["ws", "connect", &peer])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let conn: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(conn["status"], "connected");
    let id = conn["id"].as_str().unwrap();
    let out = Command::new(CLI)
        .args(["ws", "send", id, "marco"])
        .output()
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "marco");
    expect(
        &prom,
        r#"sum(virtufin_websocket_connections{state="connected"})"#,
        1.0,
    );
    let out = Command::new(CLI)
        .args(["ws", "list"])
        .output()
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains(id));
    // `up` gives the api's Gateway both services as backends.
    let out = Command::new(CLI)
        .args(["gateway", "invoke", "websocketmanager", "List"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(id));
    let out = Command::new(CLI)
        .args(["gateway", "methods", "workmanager"])
        .output()
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("WorkManager/CreateWorker"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(CLI)
        .args(["ws", "disconnect", id])
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let out = Command::new(CLI)
        .args(["ws", "disconnect", "no-such"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));

    // And the workmanager: a Python worker answers an event.
    let code = state.path().join("echo.py");
    std::fs::write(
        &code,
        "def Process(event):\n    return {'type': 'cli-answers', 'data': event['data']}\n",
    )
    .unwrap();
    let out = Command::new(CLI)
        .args([
            "workers",
            "create",
            code.to_str().unwrap(),
            "--topic",
            "cli-jobs",
            "--start",
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sub = Command::new(CLI)
        .args(["subscribe", "cli-answers", "--count", "1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = Command::new(CLI)
        .args(["publish", "cli-jobs", "ping"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let got = tokio::time::timeout(Duration::from_secs(30), sub.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let ev: serde_json::Value = serde_json::from_slice(&got.stdout).unwrap();
    assert_eq!(ev["data"], "ping");
    for n in 2..=5 {
        let out = Command::new(CLI)
            .args(["publish", "cli-jobs", &format!("ping {n}")])
            .output()
            .await
            .unwrap();
        assert!(out.status.success());
    }
    // Refused calls: two gRPC (no service named) and two HTTP (no such key).
    for _ in 0..2 {
        let out = Command::new(CLI)
            .args(["state", "get", "", "k"])
            .output()
            .await
            .unwrap();
        assert!(!out.status.success());
        let got = http_get(5001, "/v1/state/cli/metrics-nope").map(|(s, _)| s);
        assert_eq!(got, Some(404));
    }
    check_metrics(&prom);
    let out = Command::new(CLI)
        .args(["workers", "list"])
        .output()
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"status\":\"running\""));

    // Ctrl-C (SIGINT to `up` alone: the services run in their own process
    // group) stops everything in reverse order, and `up` exits 0.
    let pid = up.id().unwrap().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .await
            .unwrap()
            .success()
    );
    let status = tokio::time::timeout(Duration::from_secs(30), up.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    let after = Command::new(CLI).arg("smoke").output().await.unwrap();
    assert_eq!(
        after.status.code(),
        Some(1),
        "nothing answers once the stack is down"
    );
    assert!(String::from_utf8_lossy(&after.stdout).contains("FAIL  Health/HealthCheck"));
}

/// Waits until Prometheus' answer to `q` is `want`.
fn expect(prom: &Prometheus, q: &str, want: f64) {
    let got = tokio::task::block_in_place(|| prom.wait_for(q, want, Duration::from_secs(20)));
    assert_eq!(got, Some(want), "{q}");
}

/// The traffic above, as Prometheus saw it.
fn check_metrics(prom: &Prometheus) {
    let wanted: &[(&str, f64)] = &[
        (r#"sum(up{job=~"virtufin-.*"})"#, 3.0),
        ("sum(virtufin_ready)", 3.0),
        ("count(virtufin_build_info)", 3.0),
        // Five events to the worker's topic, each delivered once on its
        // acknowledged stream, acknowledged SUCCESS, none left pending,
        // and answered on cli-answers.
        (
            r#"sum(virtufin_pubsub_published_events_total{topic="cli-jobs"})"#,
            5.0,
        ),
        (
            r#"sum(virtufin_pubsub_delivered_events_total{topic="cli-jobs"})"#,
            5.0,
        ),
        (
            r#"sum(virtufin_pubsub_redelivered_events_total{topic="cli-jobs"}) or vector(0)"#,
            0.0,
        ),
        (
            r#"sum(virtufin_pubsub_acknowledged_events_total{topic="cli-jobs",status="SUCCESS"})"#,
            5.0,
        ),
        (
            r#"sum(virtufin_pubsub_pending_events{topic="cli-jobs"})"#,
            0.0,
        ),
        (
            r#"sum(virtufin_pubsub_published_events_total{topic="cli-answers"})"#,
            5.0,
        ),
        (
            r#"sum(virtufin_worker_events_total{status="SUCCESS"})"#,
            5.0,
        ),
        ("sum(virtufin_worker_event_duration_seconds_count)", 5.0),
        ("sum(virtufin_worker_errors_total) or vector(0)", 0.0),
        // One correlated send: one frame out, its echo in.
        (
            r#"sum(virtufin_websocket_frames_total{direction="out"})"#,
            1.0,
        ),
        (
            r#"sum(virtufin_websocket_frames_total{direction="in"})"#,
            1.0,
        ),
        (
            r#"sum(virtufin_grpc_requests_total{job="virtufin-websocketmanager",rpc="virtufin.websocketmanager.v1.WebSocketManager/Send",code="OK"})"#,
            1.0,
        ),
        (
            r#"sum(virtufin_grpc_requests_total{job="virtufin-api",rpc="virtufin.api.v1.State/GetState",code="INVALID_ARGUMENT"})"#,
            2.0,
        ),
        (
            r#"sum(virtufin_http_requests_total{job="virtufin-api",route="/v1/state/{service}/{*key}",method="GET",status="404"})"#,
            2.0,
        ),
        (
            r#"sum(virtufin_grpc_request_duration_seconds_count{job="virtufin-api",rpc="virtufin.api.v1.State/GetState"}) >= bool 4"#,
            1.0,
        ),
    ];
    for (q, want) in wanted {
        expect(prom, q, *want);
    }
}

struct StopOnDrop(u32);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &self.0.to_string()])
            .status();
        // Give `up` a moment to stop its services in order.
        for _ in 0..100 {
            let alive = std::path::Path::new(&format!("/proc/{}", self.0)).exists();
            if !alive {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

#[tokio::test]
async fn up_without_the_service_binaries_says_what_to_do() {
    let state = tempfile::tempdir().unwrap();
    let empty = tempfile::tempdir().unwrap();
    // Copy the CLI alone, so nothing is beside it.
    let lonely = empty.path().join("virtufin");
    std::fs::copy(CLI, &lonely).unwrap();
    // A binary written a moment ago can fail to exec with ETXTBSY while
    // another test thread forks (the child briefly holds the write fd).
    let mut tries = 0;
    let out = loop {
        let r = Command::new(&lonely)
            .args(["up", "--valkey", "embedded", "--state-dir"])
            .arg(state.path())
            .env("PATH", "/nonexistent")
            .output()
            .await;
        match r {
            Err(e) if e.raw_os_error() == Some(26) && tries < 50 => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            other => break other.unwrap(),
        }
    };
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("virtufin-api was not found") && err.contains("cargo build"),
        "{err}"
    );
}
