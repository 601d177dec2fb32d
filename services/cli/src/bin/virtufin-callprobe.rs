//! A continuous client of virtufin-api, for the chain test's restarts: the
//! gRPC calls `Health/HealthCheck` and `State/GetState`, each round on a
//! fresh connection, and an HTTP `GET /health` poller (a fresh connection
//! per request too), so every call goes through the listening socket — a
//! refused connection would show at once. Each call ends as one of:
//! answered (any gRPC status or HTTP status the api sent), refused
//! (ECONNREFUSED), transport (the connection broke without an answer) or
//! timeout. Runs until SIGTERM, then until each loop has had one more
//! successful answer (so the counts span the whole disruption), and prints
//! its counts as one JSON line.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use clap::Parser;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Endpoint;
use virtufin_proto::api::v1::{
    GetStateRequest, HealthCheckRequest, health_client::HealthClient, state_client::StateClient,
};

#[derive(Debug, Parser)]
#[command(
    name = "virtufin-callprobe",
    about = "Calls the api continuously and counts how each call ended"
)]
struct Args {
    /// The api's gRPC address.
    #[arg(long, default_value = "127.0.0.1:5002")]
    grpc: String,
    /// The api's HTTP address.
    #[arg(long, default_value = "127.0.0.1:5001")]
    http: String,
    /// API key for GetState.
    #[arg(long, env = "VIRTUFIN_API_KEY")]
    api_key: Option<String>,
    /// The state read by GetState: service and key.
    #[arg(long, default_value = "probe")]
    service: String,
    #[arg(long, default_value = "probe")]
    key: String,
    /// Pause between two rounds of a loop.
    #[arg(long, default_value = "5ms", value_parser = humantime::parse_duration)]
    pause: Duration,
    /// A call without an answer by then counts as a timeout.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    call_timeout: Duration,
    /// Written once every loop has had a successful answer.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

#[derive(Debug, Default)]
struct Counts {
    answered: BTreeMap<String, u64>,
    refused: u64,
    transport: u64,
    timeout: u64,
    slowest_ms: u128,
    examples: Vec<String>,
}

impl Counts {
    fn record(&mut self, outcome: &Outcome, took: Duration) {
        self.slowest_ms = self.slowest_ms.max(took.as_millis());
        match outcome {
            Outcome::Answered(what) => *self.answered.entry(what.clone()).or_default() += 1,
            Outcome::Refused(e) | Outcome::Transport(e) | Outcome::Timeout(e) => {
                match outcome {
                    Outcome::Refused(_) => self.refused += 1,
                    Outcome::Transport(_) => self.transport += 1,
                    _ => self.timeout += 1,
                }
                if self.examples.len() < 5 {
                    self.examples.push(e.clone());
                }
            }
        }
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "answered": self.answered.values().sum::<u64>(),
            "by_status": self.answered,
            "refused": self.refused,
            "transport": self.transport,
            "timeout": self.timeout,
            "slowest_ms": self.slowest_ms,
            "examples": self.examples,
        })
    }
}

#[derive(Debug)]
enum Outcome {
    /// The api answered: "OK", a gRPC code, or an HTTP status.
    Answered(String),
    Refused(String),
    Transport(String),
    Timeout(String),
}

impl Outcome {
    fn success(&self) -> bool {
        matches!(self, Outcome::Answered(s) if s == "Ok" || s == "200")
    }
}

fn chain(e: &(dyn std::error::Error + 'static)) -> (bool, String) {
    let mut refused = false;
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            refused |= io.kind() == std::io::ErrorKind::ConnectionRefused;
        }
        text.push_str(": ");
        text.push_str(&s.to_string());
        cur = s.source();
    }
    if let Some(io) = e.downcast_ref::<std::io::Error>() {
        refused |= io.kind() == std::io::ErrorKind::ConnectionRefused;
    }
    (refused, text)
}

fn failed(e: &(dyn std::error::Error + 'static)) -> Outcome {
    match chain(e) {
        (true, t) => Outcome::Refused(t),
        (false, t) => Outcome::Transport(t),
    }
}

/// A status the api sent has no source; one tonic made from a broken
/// connection carries the transport error as its source.
fn from_status(s: &tonic::Status) -> Outcome {
    use std::error::Error;
    match s.source() {
        None => Outcome::Answered(format!("{:?}", s.code())),
        Some(src) => match chain(src) {
            (true, t) => Outcome::Refused(format!("{}: {t}", s.message())),
            (false, t) => Outcome::Transport(format!("{:?} {}: {t}", s.code(), s.message())),
        },
    }
}

/// One round: a fresh connection, HealthCheck, then GetState on it.
async fn grpc_round(args: &Args) -> (Outcome, Option<Outcome>) {
    let endpoint = match Endpoint::from_shared(format!("http://{}", args.grpc)) {
        Ok(e) => e.tcp_nodelay(true),
        Err(e) => return (Outcome::Transport(e.to_string()), None),
    };
    let channel = match endpoint.connect().await {
        Ok(c) => c,
        Err(e) => return (failed(&e), None),
    };
    let health = match HealthClient::new(channel.clone())
        .health_check(HealthCheckRequest {})
        .await
    {
        Ok(_) => Outcome::Answered("Ok".into()),
        Err(s) => from_status(&s),
    };
    let mut req = tonic::Request::new(GetStateRequest {
        service: args.service.clone(),
        key: args.key.clone(),
    });
    if let Some(k) = args.api_key.as_deref().and_then(|k| k.parse().ok()) {
        req.metadata_mut().insert("x-api-key", k);
    }
    let get = match StateClient::new(channel).get_state(req).await {
        Ok(_) => Outcome::Answered("Ok".into()),
        Err(s) => from_status(&s),
    };
    (health, Some(get))
}

/// One `GET /health` on a fresh connection.
async fn http_round(args: &Args) -> Outcome {
    let mut s = match tokio::net::TcpStream::connect(&args.http).await {
        Ok(s) => s,
        Err(e) => return failed(&e),
    };
    let req = format!(
        "GET /health HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        args.http
    );
    if let Err(e) = s.write_all(req.as_bytes()).await {
        return failed(&e);
    }
    let mut buf = Vec::new();
    if let Err(e) = s.read_to_end(&mut buf).await
        && buf.is_empty()
    {
        return failed(&e);
    }
    let text = String::from_utf8_lossy(&buf);
    match text
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
    {
        Some(code) if text.starts_with("HTTP/") => Outcome::Answered(code.to_owned()),
        _ => Outcome::Transport(format!(
            "the connection closed without an HTTP response ({} bytes)",
            buf.len()
        )),
    }
}

struct Shared {
    stop: AtomicBool,
    counts: Mutex<BTreeMap<&'static str, Counts>>,
}

impl Shared {
    fn record(&self, name: &'static str, o: &Outcome, took: Duration) {
        self.counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name)
            .or_default()
            .record(o, took);
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        counts: Mutex::new(BTreeMap::new()),
    });
    let started = Instant::now();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(2);

    let grpc = {
        let (args, shared, ready) = (args.clone(), shared.clone(), ready_tx.clone());
        tokio::spawn(async move {
            let mut first = true;
            let mut since_stop = None::<Instant>;
            loop {
                let t0 = Instant::now();
                let (h, g) = match tokio::time::timeout(args.call_timeout, grpc_round(&args)).await
                {
                    Ok(r) => r,
                    Err(_) => (
                        Outcome::Timeout("no answer within the call timeout".into()),
                        None,
                    ),
                };
                let took = t0.elapsed();
                shared.record("grpc HealthCheck", &h, took);
                if let Some(g) = &g {
                    shared.record("grpc GetState", g, took);
                }
                let ok = h.success() && g.as_ref().is_some_and(Outcome::success);
                if ok && first {
                    first = false;
                    let _ = ready.send(()).await;
                }
                if shared.stop.load(Ordering::Relaxed) {
                    let t = *since_stop.get_or_insert_with(Instant::now);
                    if ok || t.elapsed() > Duration::from_secs(60) {
                        return;
                    }
                }
                tokio::time::sleep(args.pause).await;
            }
        })
    };
    let http = {
        let (args, shared, ready) = (args.clone(), shared.clone(), ready_tx.clone());
        tokio::spawn(async move {
            let mut first = true;
            let mut since_stop = None::<Instant>;
            loop {
                let t0 = Instant::now();
                let o = match tokio::time::timeout(args.call_timeout, http_round(&args)).await {
                    Ok(o) => o,
                    Err(_) => Outcome::Timeout("no answer within the call timeout".into()),
                };
                shared.record("http GET /health", &o, t0.elapsed());
                if o.success() && first {
                    first = false;
                    let _ = ready.send(()).await;
                }
                if shared.stop.load(Ordering::Relaxed) {
                    let t = *since_stop.get_or_insert_with(Instant::now);
                    if o.success() || t.elapsed() > Duration::from_secs(60) {
                        return;
                    }
                }
                tokio::time::sleep(args.pause).await;
            }
        })
    };
    drop(ready_tx);
    if let Some(path) = args.ready_file.clone() {
        tokio::spawn(async move {
            if ready_rx.recv().await.is_some() && ready_rx.recv().await.is_some() {
                let _ = std::fs::write(&path, "ready\n");
            }
        });
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    shared.stop.store(true, Ordering::Relaxed);
    let _ = grpc.await;
    let _ = http.await;

    let counts = shared.counts.lock().unwrap_or_else(|p| p.into_inner());
    let mut out = serde_json::Map::new();
    for (name, c) in counts.iter() {
        out.insert((*name).to_owned(), c.json());
    }
    out.insert(
        "seconds".into(),
        json!(started.elapsed().as_secs_f64().round()),
    );
    println!("{}", serde_json::Value::Object(out));
    Ok(())
}
