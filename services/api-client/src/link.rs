//! The link a downstream service keeps to the api: the readiness handshake,
//! repeated so that a restarted api is noticed and re-handshaken, and the
//! liveness rule — an api unreachable for longer than a grace period makes
//! the service not live, so that its watchdog stops and systemd restarts it.

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use virtufin_common::{Check, Health};

use crate::ApiClient;

/// How the link probes the api.
#[derive(Debug, Clone)]
pub struct LinkOptions {
    /// Time between handshakes.
    pub interval: Duration,
    /// How long one handshake may take.
    pub timeout: Duration,
    /// How long the api may stay unreachable before the service reports
    /// itself not live.
    pub grace: Duration,
}

impl Default for LinkOptions {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(2),
            grace: Duration::from_secs(30),
        }
    }
}

/// Keeps `check` in step with the api's handshake and `health`'s liveness
/// with the grace period, until `shutdown`. `on_reconnect` runs each time
/// the handshake succeeds again after failing.
pub async fn maintain<F, Fut>(
    api: ApiClient,
    check: Check,
    health: Health,
    options: LinkOptions,
    shutdown: CancellationToken,
    mut on_reconnect: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut last_ok = Instant::now();
    let mut was_ok = false;
    loop {
        let result = tokio::time::timeout(options.timeout, api.handshake()).await;
        match result {
            Ok(Ok(_)) => {
                if !was_ok {
                    tracing::info!(api = %api.addr(), "api handshake succeeded");
                }
                check.pass(format!("api at {} is ready", api.addr()));
                health.set_live(true, "api reachable");
                if !was_ok && last_ok.elapsed() > options.interval {
                    on_reconnect().await;
                }
                was_ok = true;
                last_ok = Instant::now();
            }
            other => {
                let why = match other {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {:?}", options.timeout),
                };
                if was_ok {
                    tracing::warn!(api = %api.addr(), error = %why, "lost the api; re-handshaking");
                }
                was_ok = false;
                check.fail(format!("api at {}: {why}", api.addr()));
                let down = last_ok.elapsed();
                if down > options.grace {
                    health.set_live(
                        false,
                        format!(
                            "api unreachable for {}s (grace {}s)",
                            down.as_secs(),
                            options.grace.as_secs()
                        ),
                    );
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(options.interval) => {}
        }
    }
}
