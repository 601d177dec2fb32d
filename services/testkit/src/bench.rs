//! Shared benchmark plumbing: closed-loop load from N tasks with per-call
//! latency, and its summary.

use std::time::{Duration, Instant};

/// Throughput and latency of one benchmark cell.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    pub ops_per_s: f64,
    pub p50: Duration,
    pub p99: Duration,
}

/// Summarises per-call latencies taken over `elapsed`.
pub fn stats(mut lat: Vec<Duration>, elapsed: Duration) -> Stats {
    lat.sort();
    let pick = |q: f64| {
        lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Stats {
        ops_per_s: lat.len() as f64 / elapsed.as_secs_f64(),
        p50: pick(0.50),
        p99: pick(0.99),
    }
}

/// Runs `op(task, i)` from `conc` tasks for `secs`, timing every call.
pub async fn load<F, Fut>(conc: usize, secs: Duration, op: F) -> Stats
where
    F: Fn(usize, u64) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let start = Instant::now();
    let end = start + secs;
    let mut tasks = Vec::new();
    for t in 0..conc {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = 0u64;
            while Instant::now() < end {
                let s = Instant::now();
                op(t, i).await;
                lat.push(s.elapsed());
                i += 1;
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        match t.await {
            Ok(l) => all.extend(l),
            Err(e) => panic!("a load task failed: {e}"),
        }
    }
    stats(all, start.elapsed())
}

/// Milliseconds with three decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

/// `BENCH_SECONDS` (default `default`) as a duration.
pub fn seconds_from_env(default: u64) -> Duration {
    Duration::from_secs(
        std::env::var("BENCH_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default),
    )
}
