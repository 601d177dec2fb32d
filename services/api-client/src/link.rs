//! The link a downstream service keeps to the api: the readiness handshake,
//! repeated so that a restarted api is noticed and re-handshaken, and the
//! liveness rule — an api unreachable for longer than a grace period makes
//! the service not live, so that its watchdog stops and systemd restarts it.

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use virtufin_common::{Check, Health};

use crate::ApiClient;

/// Where the api is and how the link watches it: the settings every
/// downstream service shares (the seed's environment names).
#[derive(Debug, Clone, clap::Args)]
pub struct LinkArgs {
    /// The api's host.
    #[arg(long, env = "VIRTUFIN_API_HOST", default_value = "127.0.0.1")]
    pub api_host: String,
    /// The api's gRPC port.
    #[arg(long, env = "VIRTUFIN_API_GRPC_PORT", default_value_t = 5002)]
    pub api_grpc_port: u16,
    /// How long the api may stay unreachable before this service reports
    /// itself not live (and its watchdog stops).
    #[arg(long, env = "VIRTUFIN_API_GRACE", default_value = "30s", value_parser = virtufin_common::config::parse_duration)]
    pub api_grace: Duration,
    /// How often the api handshake is repeated.
    #[arg(long, env = "VIRTUFIN_PROBE_INTERVAL", default_value = "2s", value_parser = virtufin_common::config::parse_duration)]
    pub probe_interval: Duration,
    /// The API key this service presents to the api (`x-api-key`), when the
    /// api requires one. Prefer VIRTUFIN_API_KEY_FILE: a key in the
    /// environment shows in the process's environment.
    #[arg(long, env = "VIRTUFIN_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// A file holding the API key (e.g. a systemd credential:
    /// `LoadCredential=api-key:/etc/virtufin/keys/...` and
    /// `VIRTUFIN_API_KEY_FILE=%d/api-key`).
    #[arg(long, env = "VIRTUFIN_API_KEY_FILE", conflicts_with = "api_key")]
    pub api_key_file: Option<std::path::PathBuf>,
}

impl LinkArgs {
    pub fn addr(&self) -> String {
        format!("{}:{}", self.api_host, self.api_grpc_port)
    }

    pub fn options(&self) -> LinkOptions {
        LinkOptions {
            interval: self.probe_interval,
            timeout: Duration::from_secs(2),
            grace: self.api_grace,
        }
    }

    /// A client for the configured api (presenting the configured key), or
    /// why the settings are unusable.
    pub fn client(&self) -> Result<ApiClient, String> {
        if self.api_host.is_empty() {
            return Err("VIRTUFIN_API_HOST must not be empty".into());
        }
        // Without a setting, a systemd credential named "api-key" is used.
        let file = self.api_key_file.clone().or_else(|| {
            self.api_key
                .is_none()
                .then(|| virtufin_common::config::credential("api-key"))
                .flatten()
        });
        let key = match &file {
            // Settled: a key file being rewritten is not taken half-written.
            Some(path) => Some(virtufin_common::file::read_settled(path).map_err(|e| {
                format!("VIRTUFIN_API_KEY_FILE: {}: {}", path.display(), e.reason())
            })?),
            None => self.api_key.clone(),
        };
        ApiClient::lazy(&self.addr())
            .map_err(|e| format!("invalid VIRTUFIN_API_HOST/VIRTUFIN_API_GRPC_PORT: {e}"))?
            .with_key(key.as_deref())
            .map_err(|e| format!("VIRTUFIN_API_KEY(_FILE): {e}"))
    }
}

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
