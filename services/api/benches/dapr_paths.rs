//! The same three operations over five paths, in one run on one Valkey:
//!
//! - `valkey`: raw Valkey with the `redis` crate (the store's etag script,
//!   `HMGET`, `XADD` → `XREADGROUP`): the floor of the store itself;
//! - `noop-grpc`: an in-process gRPC server with the api's own State and
//!   Pubsub services that does nothing (answers at once, hands a published
//!   event straight to the subscriber): the transport floor on this machine;
//! - `api-valkey`: the real `virtufin-api` on its direct Valkey backend;
//! - `api-daprd`: the real `virtufin-api` on real daprd (the original's
//!   two-hop path: client → api → daprd → Valkey);
//! - `daprd`: daprd's own gRPC API called directly (`SaveState`,
//!   `GetState`, `PublishEvent` → `SubscribeTopicEventsAlpha1`).
//!
//! SaveState, GetState and publish→deliver (each caller publishes one event
//! and waits until the subscriber has it, then the next) at concurrency 1
//! and 64; every cell's throughput is printed with its ratio to raw Valkey,
//! and the api-on-daprd cells with their ratio to the api on Valkey.
//!
//!     export VIRTUFIN_DAPRD=$(./scripts/daprd)
//!     cargo bench -p virtufin-api --bench dapr_paths
//!
//! BENCH_SECONDS (default 3) sets how long each cell runs. Without daprd
//! the two daprd paths are left out with a SKIP line.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use dapr::dapr::proto::{common::v1 as dcommon, runtime::v1 as drt};
use drt::{
    subscribe_topic_events_request_alpha1::SubscribeTopicEventsRequestType as DReq,
    subscribe_topic_events_response_alpha1::SubscribeTopicEventsResponseType as DResp,
    topic_event_response::TopicEventResponseStatus as DStatus,
};
use redis::aio::MultiplexedConnection;
use tokio::{
    process::Command,
    sync::{broadcast, mpsc, oneshot},
};
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, transport::Channel};
use virtufin_api_client::{
    ApiClient,
    pb::{
        self,
        pubsub_server::{Pubsub, PubsubServer},
        state_server::{State, StateServer},
    },
};
use virtufin_testkit::{
    NotifyListener, ValkeyServer,
    bench::{Stats, load, ms, seconds_from_env},
    daprd::{self, Daprd, DaprdOptions},
    free_port,
};

const BIN: &str = env!("CARGO_BIN_EXE_virtufin-api");
const CONNECTIONS: usize = 4;
const CONCURRENCY: [usize; 2] = [1, 64];

// The store's own etag script (as in api_vs_valkey), so the raw path does
// the write the api's Valkey backend does.
const SET_LUA: &str = r"
local v = redis.call('HGET', KEYS[1], 'version')
if ARGV[2] ~= '' and v ~= ARGV[2] then return -1 end
local n = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('HSET', KEYS[1], 'data', ARGV[1])
return n
";

type BoxFut = Pin<Box<dyn Future<Output = ()> + Send>>;
type Op = Arc<dyn Fn(usize, u64) -> BoxFut + Send + Sync>;

/// Delivery waiters of the publish→deliver cells: the subscriber of each
/// path completes the waiter of the number it received.
#[derive(Clone, Default)]
struct Waiters(Arc<std::sync::Mutex<HashMap<u64, oneshot::Sender<()>>>>);

impl Waiters {
    fn expect(&self, n: u64) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.0.lock().unwrap().insert(n, tx);
        rx
    }

    fn arrived(&self, data: &[u8]) {
        let n = std::str::from_utf8(data)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok());
        if let Some(tx) = n.and_then(|n| self.0.lock().unwrap().remove(&n)) {
            let _ = tx.send(());
        }
    }
}

/// A path's three operations.
struct Path {
    name: &'static str,
    save: Op,
    get: Op,
    deliver: Op,
}

/// A unique event number per (task, iteration), so no two callers wait for
/// the same event.
fn event_no(t: usize, i: u64) -> u64 {
    ((t as u64) << 40) | i
}

async fn deliver_once(w: &Waiters, n: u64, publish: impl Future<Output = ()>) {
    let rx = w.expect(n);
    publish.await;
    tokio::time::timeout(Duration::from_secs(30), rx)
        .await
        .expect("the event was delivered within 30 s")
        .expect("the subscriber is running");
}

fn op<F, Fut>(f: F) -> Op
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    Arc::new(move |t, i| Box::pin(f(t, i)) as BoxFut)
}

async fn valkey_path(valkey: &ValkeyServer, value: Arc<String>) -> Path {
    let client = redis::Client::open(valkey.url()).unwrap();
    let conn: MultiplexedConnection = client.get_multiplexed_async_connection().await.unwrap();
    let script = Arc::new(redis::Script::new(SET_LUA));
    let waiters = Waiters::default();
    // The blocking reader gets a connection of its own.
    let mut reader = client.get_multiplexed_async_connection().await.unwrap();
    let _: Result<(), _> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg("bench-raw")
        .arg("g")
        .arg("$")
        .arg("MKSTREAM")
        .query_async::<()>(&mut reader)
        .await;
    let w = waiters.clone();
    tokio::spawn(async move {
        loop {
            let r: redis::streams::StreamReadReply = match redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg("g")
                .arg("c")
                .arg("COUNT")
                .arg(256)
                // Under the redis crate's 500 ms response timeout.
                .arg("BLOCK")
                .arg(200)
                .arg("STREAMS")
                .arg("bench-raw")
                .arg(">")
                .query_async(&mut reader)
                .await
            {
                Ok(r) => r,
                Err(_) => continue,
            };
            let mut ids = Vec::new();
            for k in r.keys {
                for e in k.ids {
                    if let Some(d) = e.get::<String>("data") {
                        w.arrived(d.as_bytes());
                    }
                    ids.push(e.id);
                }
            }
            if !ids.is_empty() {
                let _: i64 = redis::cmd("XACK")
                    .arg("bench-raw")
                    .arg("g")
                    .arg(&ids)
                    .query_async(&mut reader)
                    .await
                    .unwrap_or(0);
            }
        }
    });
    let (c, s) = (conn.clone(), script.clone());
    let save = op(move |t, i| {
        let (mut c, s, v) = (c.clone(), s.clone(), value.clone());
        async move {
            let _: i64 = s
                .key(format!("bench-raw-k{t}-{}", i % 100))
                .arg(v.as_str())
                .arg("")
                .invoke_async(&mut c)
                .await
                .unwrap();
        }
    });
    let c = conn.clone();
    let get = op(move |t, i| {
        let mut c = c.clone();
        async move {
            let _: Vec<Option<String>> = redis::cmd("HMGET")
                .arg(format!("bench-raw-k{t}-{}", i % 100))
                .arg("data")
                .arg("version")
                .query_async(&mut c)
                .await
                .unwrap();
        }
    });
    let deliver = op(move |t, i| {
        let (mut c, w) = (conn.clone(), waiters.clone());
        async move {
            let n = event_no(t, i);
            deliver_once(&w, n, async move {
                let _: String = redis::cmd("XADD")
                    .arg("bench-raw")
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(100_000)
                    .arg("*")
                    .arg("data")
                    .arg(n.to_string())
                    .query_async(&mut c)
                    .await
                    .unwrap();
            })
            .await;
        }
    });
    Path {
        name: "valkey",
        save,
        get,
        deliver,
    }
}

/// Paths through our own gRPC API (the no-op server and the real api):
/// the same client code, so they differ only in what serves them.
async fn api_path(name: &'static str, addr: &str, value: Arc<String>) -> Path {
    let mut pool = Vec::new();
    for _ in 0..CONNECTIONS {
        pool.push(ApiClient::connect(addr).await.unwrap());
    }
    let pool = Arc::new(pool);
    let waiters = Waiters::default();
    // A service and a topic per path: the paths share one Valkey, and the
    // api on Valkey and daprd use the same key and stream layout.
    let topic = format!("bench-deliver-{name}");
    let service = format!("bench-{name}");
    let mut stream = pool[0]
        .pubsub()
        .subscribe(pb::SubscribeRequest {
            topic: topic.clone(),
            subscriber: "bench".into(),
            group: "bench".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let w = waiters.clone();
    tokio::spawn(async move {
        while let Ok(Some(ev)) = stream.message().await {
            w.arrived(&ev.data);
        }
    });
    let (p, v, svc) = (pool.clone(), value, service.clone());
    let save = op(move |t, i| {
        let (a, v, svc) = (p[t % p.len()].clone(), v.clone(), svc.clone());
        async move {
            a.save(&svc, &format!("k{t}-{}", i % 100), &v, "")
                .await
                .unwrap();
        }
    });
    let (p, svc) = (pool.clone(), service);
    let get = op(move |t, i| {
        let (a, svc) = (p[t % p.len()].clone(), svc.clone());
        async move {
            a.get(&svc, &format!("k{t}-{}", i % 100)).await.unwrap();
        }
    });
    let deliver = op(move |t, i| {
        let (a, w, topic) = (pool[t % pool.len()].clone(), waiters.clone(), topic.clone());
        async move {
            let n = event_no(t, i);
            deliver_once(&w, n, async move {
                a.publish(&topic, &n.to_string(), HashMap::new())
                    .await
                    .unwrap();
            })
            .await;
        }
    });
    Path {
        name,
        save,
        get,
        deliver,
    }
}

async fn daprd_path(d: &Daprd, value: Arc<String>) -> Path {
    let mut pool = Vec::new();
    for _ in 0..CONNECTIONS {
        pool.push(
            drt::dapr_client::DaprClient::connect(format!("http://127.0.0.1:{}", d.grpc_port))
                .await
                .unwrap(),
        );
    }
    let pool: Arc<Vec<drt::dapr_client::DaprClient<Channel>>> = Arc::new(pool);
    let waiters = Waiters::default();
    let (tx, rx) = mpsc::channel(1024);
    tx.send(drt::SubscribeTopicEventsRequestAlpha1 {
        subscribe_topic_events_request_type: Some(DReq::InitialRequest(
            drt::SubscribeTopicEventsRequestInitialAlpha1 {
                pubsub_name: "pubsub".into(),
                topic: "bench-daprd".into(),
                metadata: HashMap::new(),
                dead_letter_topic: None,
            },
        )),
    })
    .await
    .unwrap();
    let mut inbound = pool[0]
        .clone()
        .subscribe_topic_events_alpha1(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    // The first answer confirms the subscription.
    inbound.message().await.unwrap();
    let w = waiters.clone();
    tokio::spawn(async move {
        while let Ok(Some(m)) = inbound.message().await {
            if let Some(DResp::EventMessage(ev)) = m.subscribe_topic_events_response_type {
                w.arrived(&ev.data);
                let done = drt::SubscribeTopicEventsRequestAlpha1 {
                    subscribe_topic_events_request_type: Some(DReq::EventProcessed(
                        drt::SubscribeTopicEventsRequestProcessedAlpha1 {
                            id: ev.id,
                            status: Some(drt::TopicEventResponse {
                                status: DStatus::Success as i32,
                            }),
                        },
                    )),
                };
                if tx.send(done).await.is_err() {
                    return;
                }
            }
        }
    });
    let (p, v) = (pool.clone(), value);
    let save = op(move |t, i| {
        let (mut c, v) = (p[t % p.len()].clone(), v.clone());
        async move {
            c.save_state(drt::SaveStateRequest {
                store_name: "statestore".into(),
                states: vec![dcommon::StateItem {
                    key: format!("bench-daprd-k{t}-{}", i % 100),
                    value: v.as_bytes().to_vec(),
                    etag: None,
                    metadata: HashMap::new(),
                    options: None,
                }],
            })
            .await
            .unwrap();
        }
    });
    let p = pool.clone();
    let get = op(move |t, i| {
        let mut c = p[t % p.len()].clone();
        async move {
            c.get_state(drt::GetStateRequest {
                store_name: "statestore".into(),
                key: format!("bench-daprd-k{t}-{}", i % 100),
                consistency: 0,
                metadata: HashMap::new(),
            })
            .await
            .unwrap();
        }
    });
    let deliver = op(move |t, i| {
        let (mut c, w) = (pool[t % pool.len()].clone(), waiters.clone());
        async move {
            let n = event_no(t, i);
            deliver_once(&w, n, async move {
                c.publish_event(drt::PublishEventRequest {
                    pubsub_name: "pubsub".into(),
                    topic: "bench-daprd".into(),
                    data: n.to_string().into_bytes(),
                    data_content_type: "application/json".into(),
                    metadata: HashMap::new(),
                })
                .await
                .unwrap();
            })
            .await;
        }
    });
    Path {
        name: "daprd",
        save,
        get,
        deliver,
    }
}

/// The transport floor: the api's own State and Pubsub services answering
/// at once. A published event goes straight to the open subscriptions.
#[derive(Clone)]
struct Noop {
    events: broadcast::Sender<pb::TopicEventRequest>,
    value: Arc<String>,
    next_id: Arc<AtomicU64>,
}

type NoopStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn ok() -> pb::StatusResponse {
    pb::StatusResponse {
        success: true,
        status: "OK".into(),
        message: String::new(),
        etag: "1".into(),
    }
}

#[tonic::async_trait]
impl State for Noop {
    async fn save_state(
        &self,
        _: Request<pb::SaveStateRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        Ok(Response::new(ok()))
    }

    async fn get_state(
        &self,
        req: Request<pb::GetStateRequest>,
    ) -> Result<Response<pb::GetStateResponse>, Status> {
        Ok(Response::new(pb::GetStateResponse {
            key: req.into_inner().key,
            value: self.value.to_string(),
            etag: "1".into(),
        }))
    }

    async fn get_all_state(
        &self,
        _: Request<pb::GetAllStateRequest>,
    ) -> Result<Response<pb::GetAllStateResponse>, Status> {
        Err(Status::unimplemented("not part of the benchmark"))
    }

    async fn register_keys(
        &self,
        _: Request<pb::RegisterKeysRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        Err(Status::unimplemented("not part of the benchmark"))
    }

    async fn delete_state(
        &self,
        _: Request<pb::DeleteStateRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        Err(Status::unimplemented("not part of the benchmark"))
    }
}

#[tonic::async_trait]
impl Pubsub for Noop {
    async fn publish_event(
        &self,
        req: Request<pb::PublishEventRequest>,
    ) -> Result<Response<pb::PublishEventResponse>, Status> {
        let r = req.into_inner();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed).to_string();
        let _ = self.events.send(pb::TopicEventRequest {
            id: id.clone(),
            topic: r.topic,
            data: r.data.into_bytes(),
            ..Default::default()
        });
        Ok(Response::new(pb::PublishEventResponse {
            success: true,
            id,
            message: String::new(),
        }))
    }

    async fn publish_events(
        &self,
        _: Request<pb::PublishEventsRequest>,
    ) -> Result<Response<pb::PublishEventsResponse>, Status> {
        Err(Status::unimplemented("not part of the benchmark"))
    }

    type SubscribeStream = NoopStream<pb::TopicEventRequest>;

    async fn subscribe(
        &self,
        _: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let rx = tokio_stream::wrappers::BroadcastStream::new(self.events.subscribe());
        Ok(Response::new(Box::pin(
            rx.filter_map(|e| e.ok()).map(Ok::<_, Status>),
        )))
    }

    async fn unsubscribe(
        &self,
        _: Request<pb::UnsubscribeRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        Err(Status::unimplemented("not part of the benchmark"))
    }

    type SubscribeTopicEventsStream = NoopStream<pb::SubscribeTopicEventsResponse>;

    async fn subscribe_topic_events(
        &self,
        _: Request<tonic::Streaming<pb::SubscribeTopicEventsRequest>>,
    ) -> Result<Response<Self::SubscribeTopicEventsStream>, Status> {
        Err(Status::unimplemented("not part of the benchmark"))
    }
}

async fn start_noop(value: Arc<String>) -> String {
    // TCP_NODELAY as the api sets it: without it small answers wait for
    // delayed ACKs (tens of ms at concurrency 1).
    let incoming = tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap())
        .unwrap()
        .with_nodelay(Some(true));
    let addr = incoming.local_addr().unwrap();
    let noop = Noop {
        events: broadcast::channel(65_536).0,
        value,
        next_id: Arc::default(),
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(StateServer::new(noop.clone()))
            .add_service(PubsubServer::new(noop))
            .serve_with_incoming(incoming),
    );
    addr.to_string()
}

/// Starts the real api with `env` and waits for its READY=1.
async fn start_api(env: &[(&str, String)]) -> (tokio::process::Child, String) {
    let notify = NotifyListener::bind();
    let grpc = free_port();
    let mut cmd = Command::new(BIN);
    cmd.env(
        "ASPNETCORE_URLS",
        format!("http://127.0.0.1:{}", free_port()),
    )
    .env("VIRTUFIN_GRPC_PORT", grpc.to_string())
    .env("NOTIFY_SOCKET", notify.path())
    .env("RUST_LOG", "warn")
    .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().unwrap();
    notify.wait_for("READY=1", Duration::from_secs(30)).await;
    (child, format!("127.0.0.1:{grpc}"))
}

fn print_cell(path: &str, s: Stats, floor: Stats, vs_api: Option<Stats>) {
    let extra = vs_api
        .map(|a| format!("{:>6.2}x", s.ops_per_s / a.ops_per_s))
        .unwrap_or_else(|| format!("{:>7}", ""));
    println!(
        "|   {path:<12} | {:>10.0} | {:>8.2}x | {extra} | {:>8} | {:>8} |",
        s.ops_per_s,
        s.ops_per_s / floor.ops_per_s,
        ms(s.p50),
        ms(s.p99)
    );
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let secs = seconds_from_env(3);
    let valkey = ValkeyServer::start();
    let value = Arc::new("x".repeat(256));

    let mut paths = vec![
        valkey_path(&valkey, value.clone()).await,
        api_path("noop-grpc", &start_noop(value.clone()).await, value.clone()).await,
    ];
    let (_api_valkey, addr) = start_api(&[("VIRTUFIN_VALKEY_URL", valkey.url())]).await;
    paths.push(api_path("api-valkey", &addr, value.clone()).await);

    let daprd_bin = daprd::binary();
    let mut keep = None;
    match &daprd_bin {
        Some(bin) => {
            let d = Daprd::start(bin, &valkey, DaprdOptions::default());
            let (api, addr) = start_api(&[
                ("VIRTUFIN_BACKEND", "dapr".into()),
                ("DAPR_GRPC_PORT", d.grpc_port.to_string()),
                ("DAPR_HTTP_PORT", d.http_port.to_string()),
            ])
            .await;
            paths.push(api_path("api-daprd", &addr, value.clone()).await);
            paths.push(daprd_path(&d, value.clone()).await);
            keep = Some((d, api));
        }
        None => println!(
            "SKIP: no daprd (set VIRTUFIN_DAPRD=$(./scripts/daprd)): the api-daprd and daprd paths do not run"
        ),
    }

    println!(
        "Five paths, one Valkey ({}), {}s per cell, 256-byte values, {CONNECTIONS} client connections per gRPC path{}",
        valkey_version(&valkey).await,
        secs.as_secs(),
        daprd_bin
            .as_ref()
            .map(|b| format!(", daprd {}", b.display()))
            .unwrap_or_default()
    );
    println!(
        "(× valkey: throughput relative to raw Valkey; × api-valkey: the api on daprd relative to the api on Valkey)"
    );
    println!();
    println!("| operation / path | ops/s      | × valkey  | × api-valkey | p50 ms   | p99 ms   |");
    println!("|------------------|------------|-----------|--------------|----------|----------|");
    // Every key is written once before the cells, so they measure
    // overwrites: the api registers a service's new keys in one set, which
    // on daprd is a JSON list under etag retries (see the README).
    for p in &paths {
        let save = p.save.clone();
        for t in 0..CONCURRENCY[1] {
            for i in 0..100 {
                save(t, i).await;
            }
        }
    }
    type Pick = fn(&Path) -> Op;
    let ops: [(&str, Pick); 3] = [
        ("SaveState", |p| p.save.clone()),
        ("GetState", |p| p.get.clone()),
        ("publish→deliver", |p| p.deliver.clone()),
    ];
    for (name, pick) in ops {
        for conc in CONCURRENCY {
            println!("| **{name}, concurrency {conc}** | | | | | |");
            let mut results: Vec<(&str, Stats)> = Vec::new();
            for p in &paths {
                let f = pick(p);
                let s = load(conc, secs, move |t, i| f(t, i)).await;
                results.push((p.name, s));
            }
            let floor = results[0].1;
            let api_valkey = results
                .iter()
                .find(|(n, _)| *n == "api-valkey")
                .map(|r| r.1);
            for (n, s) in &results {
                print_cell(
                    n,
                    *s,
                    floor,
                    (*n == "api-daprd").then_some(api_valkey).flatten(),
                );
            }
        }
    }
    drop(keep);
}

async fn valkey_version(valkey: &ValkeyServer) -> String {
    let mut c = redis::Client::open(valkey.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut c)
        .await
        .unwrap_or_default();
    info.lines()
        .find_map(|l| {
            l.strip_prefix("redis_version:")
                .map(|v| format!("redis_version {v}"))
        })
        .unwrap_or_else(|| "unknown version".into())
}
