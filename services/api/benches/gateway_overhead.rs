//! The Gateway's overhead: the same unary call made directly to a backend
//! and through the api's Gateway (reflection-learnt method, JSON in and
//! out), in one run. Both processes are the real `virtufin-api` binary:
//! the backend on the embedded backend, the gateway with a services file
//! naming it.
//!
//!     cargo bench -p virtufin-api --bench gateway_overhead
//!
//! BENCH_SECONDS (default 3) sets how long each cell runs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::{sync::Arc, time::Duration};

use tokio::process::{Child, Command};
use virtufin_api_client::{ApiClient, pb};
use virtufin_testkit::{
    NotifyListener,
    bench::{Stats, load, ms, seconds_from_env},
    free_port,
};

const BIN: &str = env!("CARGO_BIN_EXE_virtufin-api");

async fn start(grpc: u16, services: Option<&std::path::Path>) -> Child {
    let notify = NotifyListener::bind();
    let mut cmd = Command::new(BIN);
    cmd.env(
        "ASPNETCORE_URLS",
        format!("http://127.0.0.1:{}", free_port()),
    )
    .env("VIRTUFIN_GRPC_PORT", grpc.to_string())
    .env("VIRTUFIN_BACKEND", "memory")
    .env("NOTIFY_SOCKET", notify.path())
    .env("RUST_LOG", "warn")
    .kill_on_drop(true);
    if let Some(p) = services {
        cmd.env("SERVICES_CONFIG_PATH", p);
    }
    let child = cmd.spawn().unwrap();
    notify.wait_for("READY=1", Duration::from_secs(20)).await;
    child
}

fn row(name: &str, conc: usize, direct: Stats, gw: Stats) {
    println!(
        "| {name:<10} | {conc:>4} | {:>10.0} | {:>10.0} | {:>6.2}x | {:>7} / {:<7} | {:>7} / {:<7} | {:>+8} |",
        direct.ops_per_s,
        gw.ops_per_s,
        gw.ops_per_s / direct.ops_per_s,
        ms(direct.p50),
        ms(direct.p99),
        ms(gw.p50),
        ms(gw.p99),
        format!(
            "{:.3}",
            (gw.p50.as_secs_f64() - direct.p50.as_secs_f64()) * 1000.0
        ),
    );
}

#[tokio::main]
async fn main() {
    let secs = seconds_from_env(3);
    let dir = tempfile::tempdir().unwrap();
    let backend_port = free_port();
    let gateway_port = free_port();
    let services = dir.path().join("services.json");
    std::fs::write(
        &services,
        format!(r#"{{"services":[{{"name":"backend","grpc":{{"host":"127.0.0.1","port":{backend_port}}}}}]}}"#),
    )
    .unwrap();
    let _backend = start(backend_port, None).await;
    let _gateway = start(gateway_port, Some(&services)).await;
    let direct = ApiClient::connect(&format!("127.0.0.1:{backend_port}"))
        .await
        .unwrap();
    let via = ApiClient::connect(&format!("127.0.0.1:{gateway_port}"))
        .await
        .unwrap();
    let value = "x".repeat(256);
    direct.save("bench", "k", &value, "").await.unwrap();
    // Warm up: the gateway learns the backend's methods on first use.
    via.invoke("backend", "GetState", r#"{"service":"bench","key":"k"}"#)
        .await
        .unwrap();

    println!(
        "Gateway overhead: GetState (256-byte value) directly on the backend api vs Invoke through the gateway api, {}s per cell, one HTTP/2 connection per side",
        secs.as_secs()
    );
    println!();
    println!(
        "| call       | conc |  direct/s  | gateway/s  |  ratio | direct p50/p99 ms | gateway p50/p99 ms | +p50 ms  |"
    );
    println!(
        "|------------|------|------------|------------|--------|-------------------|--------------------|----------|"
    );
    for conc in [1usize, 16] {
        let d = Arc::new(direct.clone());
        let direct_stats = load(conc, secs, move |_, _| {
            let d = d.clone();
            async move {
                let r = d.get("bench", "k").await.unwrap();
                assert!(r.is_some());
            }
        })
        .await;
        let g = Arc::new(via.clone());
        let gw_stats = load(conc, secs, move |_, _| {
            let g = g.clone();
            async move {
                let r = g
                    .gateway()
                    .invoke(pb::InvokeRequest {
                        service: "backend".into(),
                        method: "GetState".into(),
                        request_data: r#"{"service":"bench","key":"k"}"#.into(),
                        timeout_ms: 0,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                assert!(r.success, "{r:?}");
            }
        })
        .await;
        row("GetState", conc, direct_stats, gw_stats);
    }
    println!();
    println!(
        "Both api processes, the bench client and the Tokio runtimes share this machine's {} cores.",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
}
