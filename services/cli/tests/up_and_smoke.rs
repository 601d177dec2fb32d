//! `virtufin up` starts the stack and waits for READY=1 through
//! NOTIFY_SOCKET; `virtufin smoke` passes against it; Ctrl-C stops it.
//! Uses the virtufin-api binary that the workspace build put beside
//! `virtufin`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{path::PathBuf, process::Stdio, time::Duration};

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
async fn up_then_smoke_then_ctrl_c() {
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
