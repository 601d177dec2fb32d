//! SaveState, GetState and publish→delivery through virtufin-api (the real
//! binary, on gRPC over loopback) against the same operations done
//! directly on the same Valkey with the `redis` crate, in one run.
//!
//!     cargo bench -p virtufin-api --bench api_vs_valkey
//!
//! BENCH_SECONDS (default 3) sets how long each throughput cell runs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use redis::aio::MultiplexedConnection;
use tokio::{process::Command, sync::Mutex};
use virtufin_api_client::{ApiClient, pb};
use virtufin_testkit::{
    NotifyListener, ValkeyServer,
    bench::{Stats, load, ms, stats},
    free_port,
};

const BIN: &str = env!("CARGO_BIN_EXE_virtufin-api");

// The store's own etag script, so "direct" does exactly the write the
// api's backend does (minus the api: validation, registry, state-changes).
const SET_LUA: &str = r"
local v = redis.call('HGET', KEYS[1], 'version')
if ARGV[2] ~= '' and v ~= ARGV[2] then return -1 end
local n = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('HSET', KEYS[1], 'data', ARGV[1])
return n
";

fn row(name: &str, conc: usize, direct: Stats, api: Stats) {
    println!(
        "| {name:<16} | {conc:>4} | {:>12.0} | {:>12.0} | {:>6.2}x | {:>8} / {:<8} | {:>8} / {:<8} |",
        direct.ops_per_s,
        api.ops_per_s,
        api.ops_per_s / direct.ops_per_s,
        ms(direct.p50),
        ms(direct.p99),
        ms(api.p50),
        ms(api.p99)
    );
}

/// Publishes at `rate` events/s for `secs` and measures publish→delivery
/// latency at a subscriber, through `publish` and `next_delivery`.
async fn paced_latency<P, PF>(
    rate: u64,
    secs: Duration,
    publish: P,
    recv: tokio::sync::mpsc::Receiver<(u64, Instant)>,
) -> Stats
where
    P: Fn(u64) -> PF,
    PF: std::future::Future<Output = ()>,
{
    let sent: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let total = rate * secs.as_secs();
    let collector = {
        let sent = sent.clone();
        tokio::spawn(async move {
            let mut recv = recv;
            let mut lat = Vec::with_capacity(total as usize);
            while lat.len() < total as usize {
                match tokio::time::timeout(Duration::from_secs(10), recv.recv()).await {
                    Ok(Some((n, at))) => {
                        if let Some(s) = sent.lock().await.remove(&n) {
                            lat.push(at.duration_since(s));
                        }
                    }
                    _ => break,
                }
            }
            lat
        })
    };
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for n in 0..total {
        tick.tick().await;
        sent.lock().await.insert(n, Instant::now());
        publish(n).await;
    }
    let lat = collector.await.unwrap();
    let got = lat.len();
    assert_eq!(got as u64, total, "every event was delivered");
    stats(lat, start.elapsed())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let secs = Duration::from_secs(
        std::env::var("BENCH_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3),
    );
    let valkey = ValkeyServer::start();
    let notify = NotifyListener::bind();
    let grpc = free_port();
    let mut api_proc = Command::new(BIN)
        .env(
            "ASPNETCORE_URLS",
            format!("http://127.0.0.1:{}", free_port()),
        )
        .env("VIRTUFIN_GRPC_PORT", grpc.to_string())
        .env("VIRTUFIN_VALKEY_URL", valkey.url())
        .env("NOTIFY_SOCKET", notify.path())
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    notify.wait_for("READY=1", Duration::from_secs(20)).await;
    let api = ApiClient::connect(&format!("127.0.0.1:{grpc}"))
        .await
        .unwrap();
    // Concurrent callers spread over a few HTTP/2 connections, as several
    // client processes would be (one connection is framed by one task).
    let conns: usize = std::env::var("BENCH_CONNECTIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let mut pool = Vec::new();
    for _ in 0..conns.max(1) {
        pool.push(
            ApiClient::connect(&format!("127.0.0.1:{grpc}"))
                .await
                .unwrap(),
        );
    }
    let pool = Arc::new(pool);
    let client = redis::Client::open(valkey.url()).unwrap();
    let direct: MultiplexedConnection = client.get_multiplexed_async_connection().await.unwrap();
    let script = Arc::new(redis::Script::new(SET_LUA));
    let value = "x".repeat(256);

    println!(
        "virtufin-api vs direct Valkey ({}), {}s per cell, 256-byte values, api callers over {} gRPC connection(s), direct over one multiplexed Valkey connection",
        valkey_version(&direct).await,
        secs.as_secs(),
        pool.len()
    );
    println!();
    println!(
        "| operation        | conc | direct ops/s |    api ops/s |  ratio | direct p50/p99 ms   | api p50/p99 ms      |"
    );
    println!(
        "|------------------|------|--------------|--------------|--------|---------------------|---------------------|"
    );
    for conc in [1usize, 64] {
        let (c, s, v) = (direct.clone(), script.clone(), value.clone());
        let d = load(conc, secs, move |t, i| {
            let (mut c, s, v) = (c.clone(), s.clone(), v.clone());
            async move {
                let _: i64 = s
                    .key(format!("virtufin-api||bench/k{t}-{}", i % 100))
                    .arg(v)
                    .arg("")
                    .invoke_async(&mut c)
                    .await
                    .unwrap();
            }
        })
        .await;
        let (pool, v) = (pool.clone(), value.clone());
        let p = load(conc, secs, move |t, i| {
            let (a, v) = (pool[t % pool.len()].clone(), v.clone());
            async move {
                a.save("bench", &format!("k{t}-{}", i % 100), &v, "")
                    .await
                    .unwrap();
            }
        })
        .await;
        row("SaveState", conc, d, p);
    }
    for conc in [1usize, 64] {
        let c = direct.clone();
        let d = load(conc, secs, move |t, i| {
            let mut c = c.clone();
            async move {
                let _: Vec<Option<String>> = redis::cmd("HMGET")
                    .arg(format!("virtufin-api||bench/k{t}-{}", i % 100))
                    .arg("data")
                    .arg("version")
                    .query_async(&mut c)
                    .await
                    .unwrap();
            }
        })
        .await;
        let pool = pool.clone();
        let p = load(conc, secs, move |t, i| {
            let a = pool[t % pool.len()].clone();
            async move {
                a.get("bench", &format!("k{t}-{}", i % 100)).await.unwrap();
            }
        })
        .await;
        row("GetState", conc, d, p);
    }
    for conc in [1usize, 64] {
        let c = direct.clone();
        let d = load(conc, secs, move |_, _| {
            let mut c = c.clone();
            async move {
                let _: String = redis::cmd("XADD")
                    .arg("bench-direct")
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(100000)
                    .arg("*")
                    .arg("data")
                    .arg("{\"n\":1}")
                    .query_async(&mut c)
                    .await
                    .unwrap();
            }
        })
        .await;
        let pool = pool.clone();
        let p = load(conc, secs, move |t, _| {
            let a = pool[t % pool.len()].clone();
            async move {
                a.publish("bench-api", "{\"n\":1}", HashMap::new())
                    .await
                    .unwrap();
            }
        })
        .await;
        row("PublishEvent", conc, d, p);
    }

    // publish → delivery at 1,000 events/s.
    let rate = 1000;
    let (tx, rx) = tokio::sync::mpsc::channel(4096);
    {
        let mut reader = client.get_multiplexed_async_connection().await.unwrap();
        let _: Result<(), _> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg("lat-direct")
            .arg("g")
            .arg("$")
            .arg("MKSTREAM")
            .query_async::<()>(&mut reader)
            .await;
        tokio::spawn(async move {
            loop {
                let r: redis::streams::StreamReadReply = match redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg("g")
                    .arg("c")
                    .arg("COUNT")
                    .arg(100)
                    .arg("BLOCK")
                    .arg(1000)
                    .arg("STREAMS")
                    .arg("lat-direct")
                    .arg(">")
                    .query_async(&mut reader)
                    .await
                {
                    Ok(r) => r,
                    Err(_) => return,
                };
                let now = Instant::now();
                let mut ids = Vec::new();
                for k in r.keys {
                    for e in k.ids {
                        let n: u64 = e
                            .get::<String>("data")
                            .and_then(|s| s.parse().ok())
                            .unwrap_or(u64::MAX);
                        ids.push(e.id.clone());
                        if tx.send((n, now)).await.is_err() {
                            return;
                        }
                    }
                }
                if !ids.is_empty() {
                    let _: i64 = redis::cmd("XACK")
                        .arg("lat-direct")
                        .arg("g")
                        .arg(&ids)
                        .query_async(&mut reader)
                        .await
                        .unwrap_or(0);
                }
            }
        });
    }
    let c = direct.clone();
    let d = paced_latency(
        rate,
        secs,
        move |n| {
            let mut c = c.clone();
            async move {
                let _: String = redis::cmd("XADD")
                    .arg("lat-direct")
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(100000)
                    .arg("*")
                    .arg("data")
                    .arg(n.to_string())
                    .query_async(&mut c)
                    .await
                    .unwrap();
            }
        },
        rx,
    )
    .await;

    let (tx, rx) = tokio::sync::mpsc::channel(4096);
    let mut stream = api
        .pubsub()
        .subscribe(pb::SubscribeRequest {
            topic: "lat-api".into(),
            subscriber: "c".into(),
            group: "g".into(),
        })
        .await
        .unwrap()
        .into_inner();
    tokio::spawn(async move {
        while let Ok(Some(ev)) = stream.message().await {
            let now = Instant::now();
            let n: u64 = std::str::from_utf8(&ev.data)
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(u64::MAX);
            if tx.send((n, now)).await.is_err() {
                return;
            }
        }
    });
    let a = api.clone();
    let p = paced_latency(
        rate,
        secs,
        move |n| {
            let a = a.clone();
            async move {
                a.publish("lat-api", &n.to_string(), HashMap::new())
                    .await
                    .unwrap();
            }
        },
        rx,
    )
    .await;
    println!();
    println!(
        "publish → delivery at {rate} events/s ({} events each):",
        rate * secs.as_secs()
    );
    println!();
    println!("| path                          | p50 ms   | p99 ms   |");
    println!("|-------------------------------|----------|----------|");
    println!(
        "| direct XADD → XREADGROUP      | {:>8} | {:>8} |",
        ms(d.p50),
        ms(d.p99)
    );
    println!(
        "| api PublishEvent → Subscribe  | {:>8} | {:>8} |",
        ms(p.p50),
        ms(p.p99)
    );
    println!(
        "| ratio (api / direct)          | {:>7.2}x | {:>7.2}x |",
        p.p50.as_secs_f64() / d.p50.as_secs_f64(),
        p.p99.as_secs_f64() / d.p99.as_secs_f64()
    );
    api_proc.kill().await.unwrap();
}

async fn valkey_version(c: &MultiplexedConnection) -> String {
    let mut c = c.clone();
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
