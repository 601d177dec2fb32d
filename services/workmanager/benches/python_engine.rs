//! Per-event latency of the Python engine, inside the engine (host ⇄
//! python3 over the Unix socket) and end to end (PublishEvent → worker →
//! answer received by a Subscribe reader through the api), in one run,
//! beside the original's published figure (Python: 1–5 ms per event).
//!
//!     cargo bench -p virtufin-workmanager --bench python_engine
//!
//! BENCH_EVENTS (default 3000) events each.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use serde_json::json;
use tokio_util::sync::CancellationToken;
use virtufin_api_client::{ApiClient, pb as api_pb};
use virtufin_proto::workmanager::v1::{
    self as pb, code_source::Source, work_manager_client::WorkManagerClient,
};
use virtufin_testkit::ValkeyServer;
use virtufin_workmanager::engine::python::PythonEngine;

const ECHO: &str =
    "def Process(event):\n    return {'type': 'bench-answers', 'data': event['data']}\n";

fn pct(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    let p = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    (p(0.5), p(0.99))
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let n: usize = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000);
    let dir = tempfile::tempdir().unwrap();

    // Inside the engine.
    let cfg = virtufin_workmanager::Config::defaults();
    let mut engine = PythonEngine::start(
        &cfg.python_options(),
        "bench",
        ECHO.as_bytes(),
        &dir.path().join("engine"),
    )
    .await
    .unwrap();
    let mut lat = Vec::with_capacity(n);
    let event =
        json!({"id": "x", "type": "t", "source": "s", "specversion": "1.0", "data": {"n": 1}});
    for _ in 0..100 {
        engine
            .process(event.clone(), Duration::from_secs(5))
            .await
            .unwrap();
    }
    let t0 = Instant::now();
    for _ in 0..n {
        let s = Instant::now();
        engine
            .process(event.clone(), Duration::from_secs(5))
            .await
            .unwrap();
        lat.push(s.elapsed());
    }
    let inside_rate = n as f64 / t0.elapsed().as_secs_f64();
    let (in50, in99) = pct(lat);
    engine.shutdown().await;

    // End to end through the api and the workmanager (in process).
    let valkey = ValkeyServer::start();
    let mut c = virtufin_api::Config::defaults();
    c.http_urls = virtufin_api::config::ListenUrls(vec!["127.0.0.1:0".parse().unwrap()]);
    c.grpc_port = 0;
    c.backend = Some(virtufin_api::BackendKind::Valkey);
    c.valkey_url = Some(valkey.url());
    let l = virtufin_api::bind(&c).await.unwrap();
    let api_addr = l.grpc_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(virtufin_api::run(c, l, stop.clone()));
    let api = ApiClient::lazy(&api_addr.to_string()).unwrap();
    while api.handshake().await.is_err() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut w = virtufin_workmanager::Config::defaults();
    w.http_urls = virtufin_workmanager::config::ListenUrls(vec!["127.0.0.1:0".parse().unwrap()]);
    w.grpc_port = 0;
    w.link.api_grpc_port = api_addr.port();
    w.state_dir = dir.path().join("wm");
    w.instance_id = Some("bench".into());
    let l = virtufin_workmanager::bind(&w).await.unwrap();
    let wm_addr = l.grpc_addr().unwrap();
    tokio::spawn(virtufin_workmanager::run(w, l, stop.clone()));
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{wm_addr}"))
        .unwrap()
        .connect_lazy();
    let mut wm = WorkManagerClient::new(ch);
    let id = loop {
        let r = wm
            .create_worker(pb::CreateWorkerRequest {
                code_source: Some(pb::CodeSource {
                    source: Some(Source::Content(ECHO.as_bytes().to_vec())),
                    sha256: String::new(),
                }),
                mime_type: "text/x-python".into(),
                topic: "bench-jobs".into(),
                ..Default::default()
            })
            .await;
        match r {
            Ok(r) => break r.into_inner().id,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    wm.start_worker(pb::StartWorkerRequest { id })
        .await
        .unwrap();
    let mut answers = api
        .pubsub()
        .subscribe(api_pb::SubscribeRequest {
            topic: "bench-answers".into(),
            subscriber: "b".into(),
            group: "b".into(),
        })
        .await
        .unwrap()
        .into_inner();
    // One at a time: publish, wait for its answer.
    let mut lat = Vec::with_capacity(n);
    for i in 0..(n + 50) {
        let s = Instant::now();
        api.publish("bench-jobs", &i.to_string(), HashMap::new())
            .await
            .unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(10), answers.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if i >= 50 {
            lat.push(s.elapsed());
        }
    }
    let (e50, e99) = pct(lat);
    println!(
        "Python engine, {n} events each (python3 {}):",
        cfg.python_path().display()
    );
    println!();
    println!(
        "| path                                        | p50      | p99      | published (original)  |"
    );
    println!(
        "|---------------------------------------------|----------|----------|-----------------------|"
    );
    println!(
        "| inside the engine (host ⇄ python3)          | {:>8} | {:>8} | 1–5 ms per event      |",
        us(in50),
        us(in99)
    );
    println!(
        "| PublishEvent → worker → answer via Subscribe | {:>8} | {:>8} |                       |",
        us(e50),
        us(e99)
    );
    println!();
    println!("inside the engine: {inside_rate:.0} events/s sequential; target ≤ 1 ms p50");
    stop.cancel();
}
