//! Per-event latency of the Python and native engines, in one run:
//! inside the engine (workmanager ⇄ worker process over the Unix socket;
//! for native: JSON → FlatBuffers → `Process` in virtufin-worker-host →
//! back) and end to end (PublishEvent → worker → answer received by a
//! Subscribe reader through the api), beside the original's published
//! figures (Python 1–5 ms per event; native, in process, 50–200 µs).
//!
//!     cargo bench -p virtufin-workmanager --bench engines
//!
//! BENCH_EVENTS (default 3000) events per row. Both workers echo their
//! input and log nothing; the native one is built with the DevKit
//! (`virtufin-worker-testlib`, whose default is an echo).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::{
    collections::HashMap,
    future::Future,
    path::{Path, PathBuf},
    pin::Pin,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use virtufin_api_client::{ApiClient, pb as api_pb};
use virtufin_proto::workmanager::v1::{
    self as pb, code_source::Source, work_manager_client::WorkManagerClient,
};
use virtufin_testkit::ValkeyServer;
use virtufin_workmanager::engine::{Engine, Kind, native::GatewayCaller};

const ECHO_PY: &str =
    "def Process(event):\n    return {'type': 'bench-answers', 'data': event['data']}\n";
const NATIVE_ANSWERS: &str = "testlib.answers";

/// The workers make no gateway calls.
struct NoGateway;

impl GatewayCaller for NoGateway {
    fn invoke<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
        _: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send + 'a>> {
        Box::pin(async { Err("no gateway in this benchmark".into()) })
    }
}

fn native_so() -> Vec<u8> {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let file = "libvirtufin_worker_testlib.so";
    let p = [deps.join(file), deps.parent().unwrap().join(file)]
        .into_iter()
        .find(|p| p.is_file())
        .expect("libvirtufin_worker_testlib.so is built as a dev-dependency");
    std::fs::read(p).unwrap()
}

fn pct(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    let p = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    (p(0.5), p(0.99))
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

struct Inside {
    p50: Duration,
    p99: Duration,
    rate: f64,
}

async fn inside(
    kind: Kind,
    cfg: &virtufin_workmanager::Config,
    code: &[u8],
    dir: &Path,
    event: Value,
    n: usize,
) -> Inside {
    let mut engine = Engine::start(kind, cfg, cfg.memory_limit_bytes(), "bench", code, dir)
        .await
        .unwrap();
    let t = Duration::from_secs(5);
    for _ in 0..100 {
        engine.process(event.clone(), t, &NoGateway).await.unwrap();
    }
    let mut lat = Vec::with_capacity(n);
    let t0 = Instant::now();
    for _ in 0..n {
        let s = Instant::now();
        let a = engine.process(event.clone(), t, &NoGateway).await.unwrap();
        lat.push(s.elapsed());
        assert!(a.is_some());
    }
    let rate = n as f64 / t0.elapsed().as_secs_f64();
    engine.shutdown().await;
    let (p50, p99) = pct(lat);
    Inside { p50, p99, rate }
}

/// Creates and starts a worker, then publishes one event at a time and
/// waits for its answer.
async fn end_to_end(
    wm: &mut WorkManagerClient<tonic::transport::Channel>,
    api: &ApiClient,
    req: pb::CreateWorkerRequest,
    answers_topic: &str,
    payload: &str,
    md: &[(&str, &str)],
    n: usize,
) -> (Duration, Duration) {
    let topic = req.topic.clone();
    let id = wm.create_worker(req).await.unwrap().into_inner().id;
    wm.start_worker(pb::StartWorkerRequest { id })
        .await
        .unwrap();
    let mut answers = api
        .pubsub()
        .subscribe(api_pb::SubscribeRequest {
            topic: answers_topic.into(),
            subscriber: "b".into(),
            group: format!("b-{answers_topic}"),
        })
        .await
        .unwrap()
        .into_inner();
    let md: HashMap<String, String> = md
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut lat = Vec::with_capacity(n);
    for i in 0..(n + 50) {
        let s = Instant::now();
        api.publish(&topic, payload, md.clone()).await.unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(10), answers.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if i >= 50 {
            lat.push(s.elapsed());
        }
    }
    pct(lat)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let n: usize = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = virtufin_workmanager::Config::defaults();
    cfg.worker_host = Some(PathBuf::from(env!("CARGO_BIN_EXE_virtufin-worker-host")));
    let so = native_so();

    // Inside the engines.
    let py_event =
        json!({"id": "x", "type": "t", "source": "s", "specversion": "1.0", "data": {"n": 1}});
    let py_in = inside(
        Kind::Python,
        &cfg,
        ECHO_PY.as_bytes(),
        &dir.path().join("py"),
        py_event,
        n,
    )
    .await;
    let native_event = json!({"id": "x", "type": "t", "source": "s", "specversion": "1.0",
        "datacontenttype": "application/json", "data": {"n": 1}});
    let native_in = inside(
        Kind::Native,
        &cfg,
        &so,
        &dir.path().join("native"),
        native_event,
        n,
    )
    .await;

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
    let mut w = cfg.clone();
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
    let create = |code: &[u8], mime: &str, topic: &str| pb::CreateWorkerRequest {
        code_source: Some(pb::CodeSource {
            source: Some(Source::Content(code.to_vec())),
            sha256: String::new(),
        }),
        mime_type: mime.into(),
        topic: topic.into(),
        ..Default::default()
    };
    // The workmanager is ready when it takes a request.
    while wm
        .list_workers(pb::ListWorkersRequest { filters: vec![] })
        .await
        .is_err()
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let py_e2e = end_to_end(
        &mut wm,
        &api,
        create(ECHO_PY.as_bytes(), "text/x-python", "bench-py"),
        "bench-answers",
        "1",
        &[],
        n,
    )
    .await;
    let native_e2e = end_to_end(
        &mut wm,
        &api,
        create(&so, "application/x-native-dll", "bench-native"),
        NATIVE_ANSWERS,
        r#"{"n":1}"#,
        &[("ce-datacontenttype", "application/json")],
        n,
    )
    .await;

    println!(
        "Engines, {n} events per row (python3 {}; native: a DevKit echo in virtufin-worker-host):",
        cfg.python_path().display()
    );
    println!();
    println!(
        "| engine | path                                         | p50      | p99      | events/s | published (original)         |"
    );
    println!(
        "|--------|----------------------------------------------|----------|----------|----------|------------------------------|"
    );
    println!(
        "| python | inside the engine (host ⇄ python3)           | {:>8} | {:>8} | {:>8.0} | 1–5 ms per event             |",
        us(py_in.p50),
        us(py_in.p99),
        py_in.rate
    );
    println!(
        "| native | inside the engine (host ⇄ worker host ⇄ .so) | {:>8} | {:>8} | {:>8.0} | 50–200 µs per event (in-proc) |",
        us(native_in.p50),
        us(native_in.p99),
        native_in.rate
    );
    println!(
        "| python | PublishEvent → worker → answer via Subscribe | {:>8} | {:>8} |          |                              |",
        us(py_e2e.0),
        us(py_e2e.1)
    );
    println!(
        "| native | PublishEvent → worker → answer via Subscribe | {:>8} | {:>8} |          |                              |",
        us(native_e2e.0),
        us(native_e2e.1)
    );
    println!();
    println!(
        "targets: python ≤ 1 ms p50, native ≤ 100 µs p50 inside the engine (sequential, one event at a time)"
    );
    stop.cancel();
}
