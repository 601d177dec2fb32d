//! Frames from a local WebSocket server through the websocketmanager (the
//! real binary) and the api to a subscriber of the connection's topic,
//! against a client reading the same server directly, in one run.
//!
//!     cargo bench -p virtufin-websocketmanager --bench ws_forwarding
//!
//! BENCH_FRAMES (default 20000) frames at full speed for throughput, then
//! BENCH_RATE (default 1000) frames/s for BENCH_SECONDS (default 3) for
//! latency. The api runs in this process on a real Valkey.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_util::{SinkExt, StreamExt};
use tokio::{net::TcpListener, process::Command, sync::mpsc};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use virtufin_api_client::{ApiClient, pb};
use virtufin_proto::websocketmanager::v1 as ws;
use virtufin_testkit::{NotifyListener, ValkeyServer, bench::ms, free_port};

const BIN: &str = env!("CARGO_BIN_EXE_virtufin-websocketmanager");

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Send times by sequence number, shared by the server and the readers.
type Sent = Arc<Mutex<Vec<Option<Instant>>>>;

/// A server that, on "go N RATE" (RATE 0 = full speed), sends N text frames
/// `{"seq":i,"pad":"…"}` and records when each left.
async fn server(sent: Sent) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let sent = sent.clone();
            // Small frames one after another: without TCP_NODELAY they wait
            // for the reader's delayed ACK.
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    let Message::Text(t) = m else { continue };
                    let parts: Vec<u64> = t
                        .split_whitespace()
                        .skip(1)
                        .filter_map(|p| p.parse().ok())
                        .collect();
                    let (n, rate) = (
                        parts.first().copied().unwrap_or(0),
                        parts.get(1).copied().unwrap_or(0),
                    );
                    *sent.lock().unwrap() = vec![None; n as usize];
                    let mut tick = (rate > 0)
                        .then(|| tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate)));
                    let pad = "x".repeat(64);
                    for i in 0..n {
                        if let Some(t) = tick.as_mut() {
                            t.tick().await;
                        }
                        sent.lock().unwrap()[i as usize] = Some(Instant::now());
                        if ws
                            .send(Message::text(format!("{{\"seq\":{i},\"pad\":\"{pad}\"}}")))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

fn seq_of(payload: &str) -> Option<usize> {
    let v: serde_json::Value = serde_json::from_str(payload).ok()?;
    v["seq"].as_u64().map(|s| s as usize)
}

struct Run {
    per_s: f64,
    p50: Duration,
    p99: Duration,
}

/// Collects `n` sequence numbers from `rx` and measures.
async fn measure(n: usize, sent: &Sent, mut rx: mpsc::Receiver<(usize, Instant)>) -> Run {
    let mut lat = Vec::with_capacity(n);
    let mut first = None;
    let mut last = Instant::now();
    while lat.len() < n {
        let (seq, at) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("frames keep coming")
            .expect("reader alive");
        first.get_or_insert(at);
        last = at;
        if let Some(s) = sent.lock().unwrap().get(seq).copied().flatten() {
            lat.push(at.duration_since(s));
        }
    }
    lat.sort();
    let pick = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
    let span = last
        .duration_since(first.unwrap_or(last))
        .max(Duration::from_micros(1));
    Run {
        per_s: n as f64 / span.as_secs_f64(),
        p50: pick(0.5),
        p99: pick(0.99),
    }
}

/// Reads the server directly.
async fn direct(addr: SocketAddr, n: u64, rate: u64, sent: &Sent) -> Run {
    let (mut wsc, _) =
        tokio_tungstenite::connect_async_with_config(format!("ws://{addr}/"), None, true)
            .await
            .unwrap();
    let (tx, rx) = mpsc::channel(65536);
    wsc.send(Message::text(format!("go {n} {rate}")))
        .await
        .unwrap();
    let reader = tokio::spawn(async move {
        while let Some(Ok(m)) = wsc.next().await {
            if let Message::Text(t) = m {
                let at = Instant::now();
                if let Some(s) = seq_of(t.as_str())
                    && tx.send((s, at)).await.is_err()
                {
                    return;
                }
            }
        }
    });
    let r = measure(n as usize, sent, rx).await;
    reader.abort();
    r
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let frames = env_num("BENCH_FRAMES", 20_000);
    let rate = env_num("BENCH_RATE", 1000);
    let secs = env_num("BENCH_SECONDS", 3);
    let valkey = ValkeyServer::start();

    // The api, in process.
    let mut cfg = virtufin_api::Config::defaults();
    cfg.http_urls = virtufin_api::config::ListenUrls(vec!["127.0.0.1:0".parse().unwrap()]);
    cfg.grpc_port = 0;
    cfg.backend = Some(virtufin_api::BackendKind::Valkey);
    cfg.valkey_url = Some(valkey.url());
    let listeners = virtufin_api::bind(&cfg).await.unwrap();
    let api_addr = listeners.grpc_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(virtufin_api::run(cfg, listeners, stop.clone()));
    let api = ApiClient::lazy(&api_addr.to_string()).unwrap();

    // The websocketmanager, as its own process.
    let notify = NotifyListener::bind();
    let grpc = free_port();
    let mut wsm = Command::new(BIN)
        .env(
            "ASPNETCORE_URLS",
            format!("http://127.0.0.1:{}", free_port()),
        )
        .env("VIRTUFIN_GRPC_PORT", grpc.to_string())
        .env("VIRTUFIN_API_GRPC_PORT", api_addr.port().to_string())
        .env("VIRTUFIN_INSTANCE_ID", "bench")
        .env("NOTIFY_SOCKET", notify.path())
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    notify.wait_for("READY=1", Duration::from_secs(30)).await;
    let ch = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let wsc = ws::web_socket_manager_client::WebSocketManagerClient::new(ch);

    let sent: Sent = Arc::default();
    let addr = server(sent.clone()).await;

    let through = |topic: &'static str, n: u64, rate: u64| {
        let (api, sent, mut wsc) = (api.clone(), sent.clone(), wsc.clone());
        async move {
            let mut stream = api
                .pubsub()
                .subscribe(pb::SubscribeRequest {
                    topic: topic.into(),
                    subscriber: "bench".into(),
                    group: topic.into(),
                })
                .await
                .unwrap()
                .into_inner();
            let id = wsc
                .connect(ws::ConnectRequest {
                    url: format!("ws://{addr}/"),
                    auto_reconnect: false,
                })
                .await
                .unwrap()
                .into_inner()
                .id;
            wsc.start_publish(ws::StartPublishRequest {
                id: id.clone(),
                topic: topic.into(),
            })
            .await
            .unwrap();
            let (tx, rx) = mpsc::channel(65536);
            let reader = tokio::spawn(async move {
                while let Ok(Some(ev)) = stream.message().await {
                    let at = Instant::now();
                    let env: serde_json::Value = serde_json::from_slice(&ev.data).unwrap();
                    if let Some(s) = env["Payload"].as_str().and_then(seq_of)
                        && tx.send((s, at)).await.is_err()
                    {
                        return;
                    }
                }
            });
            wsc.send_raw(ws::SendRawRequest {
                id: id.clone(),
                message: format!("go {n} {rate}"),
                content_type: "text/plain".into(),
                message_bytes: Vec::new(),
            })
            .await
            .unwrap();
            let r = measure(n as usize, &sent, rx).await;
            reader.abort();
            wsc.disconnect(ws::DisconnectRequest { id }).await.unwrap();
            r
        }
    };

    let d_full = direct(addr, frames, 0, &sent).await;
    let w_full = through("bench.full", frames, 0).await;
    let paced = rate * secs;
    let d_paced = direct(addr, paced, rate, &sent).await;
    let w_paced = through("bench.paced", paced, rate).await;

    println!(
        "WebSocket server → reader: direct client vs websocketmanager → api → Subscribe (Valkey {})",
        valkey.port
    );
    println!();
    println!(
        "| run                         | path              | frames/s  | p50 ms   | p99 ms   |"
    );
    println!(
        "|-----------------------------|-------------------|-----------|----------|----------|"
    );
    for (name, path, r) in [
        (format!("{frames} frames, full speed"), "direct", &d_full),
        (
            format!("{frames} frames, full speed"),
            "websocketmanager",
            &w_full,
        ),
        (format!("{paced} frames at {rate}/s"), "direct", &d_paced),
        (
            format!("{paced} frames at {rate}/s"),
            "websocketmanager",
            &w_paced,
        ),
    ] {
        println!(
            "| {name:<27} | {path:<17} | {:>9.0} | {:>8} | {:>8} |",
            r.per_s,
            ms(r.p50),
            ms(r.p99)
        );
    }
    println!();
    println!(
        "throughput ratio (websocketmanager / direct, full speed): {:.3}x",
        w_full.per_s / d_full.per_s
    );
    println!(
        "p50 latency at {rate}/s: {} ms vs {} ms direct; p99 {} ms vs {} ms",
        ms(w_paced.p50),
        ms(d_paced.p50),
        ms(w_paced.p99),
        ms(d_paced.p99)
    );
    wsm.kill().await.unwrap();
    stop.cancel();
}
