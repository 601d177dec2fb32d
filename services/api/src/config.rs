//! The api's settings: command-line flags, each bound to an environment
//! variable (the seed's names where it has one). Flags win over variables.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use clap::{Parser, ValueEnum};
pub use virtufin_common::config::ListenUrls;
use virtufin_common::config::{parse_duration, parse_positive, parse_urls};

/// Which store and broker the api uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// In this process's memory: nothing survives a restart.
    Memory,
    /// Valkey (or Redis 7) in Dapr's layout.
    Valkey,
    /// Through a Dapr sidecar.
    Dapr,
}

/// virtufin-api: Health, State and Pubsub over gRPC (h2c) and REST.
#[derive(Debug, Clone, Parser)]
#[command(name = "virtufin-api", version, about, long_about = None)]
pub struct Config {
    /// HTTP listen URLs (health and REST), `;`-separated; `+` or `*` means
    /// every interface.
    #[arg(long = "urls", env = "ASPNETCORE_URLS", default_value = "http://127.0.0.1:5001", value_parser = parse_urls)]
    pub http_urls: ListenUrls,

    /// Overrides the port of every HTTP listen URL.
    #[arg(long, env = "VIRTUFIN_HTTP_PORT")]
    pub http_port: Option<u16>,

    /// gRPC (h2c) port.
    #[arg(long, env = "VIRTUFIN_GRPC_PORT", default_value_t = 5002)]
    pub grpc_port: u16,

    /// gRPC listen address.
    #[arg(long, env = "VIRTUFIN_GRPC_HOST", default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    pub grpc_host: IpAddr,

    /// Store and broker. Default: valkey when a Valkey URL is set, memory
    /// otherwise.
    #[arg(long, env = "VIRTUFIN_BACKEND", value_enum)]
    pub backend: Option<BackendKind>,

    /// Valkey URL: redis://HOST:PORT[/DB], unix:///PATH, or Valkey
    /// Sentinel: redis+sentinel://[USER@]HOST:PORT[,HOST:PORT...]/PRIMARY[/DB]
    /// (the primary Sentinel names, followed through a failover).
    #[arg(long, env = "VIRTUFIN_VALKEY_URL")]
    pub valkey_url: Option<String>,

    /// A file holding the Sentinels' own password (`requirepass` of the
    /// Sentinels), when they have one. Default: the systemd credential
    /// `valkey-sentinel-password`, if the service has one.
    #[arg(long, env = "VIRTUFIN_VALKEY_SENTINEL_PASSWORD_FILE")]
    pub valkey_sentinel_password_file: Option<PathBuf>,

    /// Replicas that must have a state write or a publish before the api
    /// confirms it (Valkey's WAIT). 0: confirmed once the primary has it.
    #[arg(long, env = "VIRTUFIN_VALKEY_MIN_REPLICAS", default_value_t = 0)]
    pub valkey_min_replicas: usize,

    /// Longest wait for those replicas; past it the call fails with
    /// UNAVAILABLE (not confirmed).
    #[arg(long, env = "VIRTUFIN_VALKEY_WAIT_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub valkey_wait_timeout: Duration,

    /// A file holding Valkey's password (its content, surrounding
    /// whitespace trimmed). Default: the systemd credential
    /// `valkey-password`, if the service has one.
    #[arg(long, env = "VIRTUFIN_VALKEY_PASSWORD_FILE")]
    pub valkey_password_file: Option<PathBuf>,

    /// App id: the prefix of state keys (`<app-id>||<service>/<key>`), as
    /// Dapr's state.redis writes them.
    #[arg(long, env = "VIRTUFIN_APP_ID", default_value = "virtufin-api")]
    pub app_id: String,

    /// Dapr sidecar host (dapr backend).
    #[arg(long, env = "DAPR_HOST", default_value = "127.0.0.1")]
    pub dapr_host: String,

    /// Dapr sidecar gRPC port (dapr backend).
    #[arg(long, env = "DAPR_GRPC_PORT", default_value_t = 50001)]
    pub dapr_grpc_port: u16,

    /// Dapr sidecar HTTP port, for its health (dapr backend).
    #[arg(long, env = "DAPR_HTTP_PORT", default_value_t = 3500)]
    pub dapr_http_port: u16,

    /// Pub/sub component name (dapr backend; also `pubsubname` on events).
    #[arg(long, env = "VIRTUFIN_PUBSUB_NAME", default_value = "pubsub")]
    pub pubsub_name: String,

    /// State store component name (dapr backend).
    #[arg(long, env = "VIRTUFIN_STATE_STORE_NAME", default_value = "statestore")]
    pub state_store_name: String,

    /// Approximate number of events kept per topic (`XADD MAXLEN ~`).
    #[arg(long, env = "VIRTUFIN_STREAM_MAXLEN", default_value = "100000", value_parser = parse_positive)]
    pub stream_max_len: usize,

    /// An event left unacknowledged this long is delivered again.
    #[arg(long, env = "VIRTUFIN_PROCESSING_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub processing_timeout: Duration,

    /// How often subscriptions look for such events.
    #[arg(long, env = "VIRTUFIN_RECLAIM_INTERVAL", default_value = "15s", value_parser = parse_duration)]
    pub reclaim_interval: Duration,

    /// Delay before an event acknowledged with RETRY comes back.
    #[arg(long, env = "VIRTUFIN_RETRY_DELAY", default_value = "1s", value_parser = parse_duration)]
    pub retry_delay: Duration,

    /// Most unacknowledged events per subscription stream.
    #[arg(long, env = "VIRTUFIN_MAX_IN_FLIGHT", default_value = "256", value_parser = parse_positive)]
    pub max_in_flight: usize,

    /// Largest state value, in bytes.
    #[arg(long, env = "VIRTUFIN_MAX_VALUE_BYTES", default_value = "1048576", value_parser = parse_positive)]
    pub max_value_bytes: usize,

    /// Largest event data, in bytes.
    #[arg(long, env = "VIRTUFIN_MAX_EVENT_BYTES", default_value = "4194304", value_parser = parse_positive)]
    pub max_event_bytes: usize,

    /// How often the backend's health is probed.
    #[arg(long, env = "VIRTUFIN_PROBE_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub probe_interval: Duration,

    /// How long shutdown waits for open calls to finish.
    #[arg(long, env = "VIRTUFIN_DRAIN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// The services file of the Gateway (JSON or YAML): which backends it
    /// may call. Re-read when it changes; without it the Gateway has no
    /// backends.
    #[arg(long = "services-config", env = "SERVICES_CONFIG_PATH")]
    pub services_config: Option<PathBuf>,

    /// How often the services file is checked for changes.
    #[arg(long, env = "VIRTUFIN_SERVICES_RELOAD_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub services_reload_interval: Duration,

    /// A file of named API keys (JSON or YAML:
    /// `{"keys":[{"name","key","services":[..]}]}`); keys are also read from
    /// `ApiAuth__Keys__<name>` (and `ApiAuth__Services__<name>`). With no
    /// key anywhere, auth is off.
    #[arg(long, env = "VIRTUFIN_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,

    /// Origins allowed to call from a browser (CORS, for REST and
    /// gRPC-Web), comma-separated, or `*`; empty = CORS off.
    #[arg(
        long,
        env = "VIRTUFIN_CORS_ORIGINS",
        default_value = "",
        value_delimiter = ','
    )]
    pub cors_origins: Vec<String>,
}

impl Config {
    /// The backend in effect: explicit, else Valkey when a URL is set.
    pub fn backend_kind(&self) -> BackendKind {
        self.backend.unwrap_or(if self.valkey_url.is_some() {
            BackendKind::Valkey
        } else {
            BackendKind::Memory
        })
    }

    pub fn http_addrs(&self) -> Vec<SocketAddr> {
        self.http_urls.with_port(self.http_port)
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        SocketAddr::new(self.grpc_host, self.grpc_port)
    }

    /// Valkey's password, from VIRTUFIN_VALKEY_PASSWORD_FILE or else the
    /// systemd credential `valkey-password`; None when neither is there.
    /// A file that cannot be read, an empty one, or one given as well as a
    /// password in the URL is an error naming it.
    pub fn valkey_password(&self) -> Result<Option<String>, String> {
        let password = secret_file(
            self.valkey_password_file.as_ref(),
            "VIRTUFIN_VALKEY_PASSWORD_FILE",
            "valkey-password",
            "Valkey password",
        )?;
        if let Some((_, shown)) = &password
            && self
                .valkey_url
                .as_deref()
                .is_some_and(virtufin_store::valkey::url_has_password)
        {
            return Err(format!(
                "VIRTUFIN_VALKEY_URL carries a password and {shown} gives one too: keep one"
            ));
        }
        Ok(password.map(|(p, _)| p))
    }

    /// The Sentinels' password, like [`Self::valkey_password`]
    /// (VIRTUFIN_VALKEY_SENTINEL_PASSWORD_FILE, else the credential
    /// `valkey-sentinel-password`).
    pub fn valkey_sentinel_password(&self) -> Result<Option<String>, String> {
        Ok(secret_file(
            self.valkey_sentinel_password_file.as_ref(),
            "VIRTUFIN_VALKEY_SENTINEL_PASSWORD_FILE",
            "valkey-sentinel-password",
            "Valkey Sentinel password",
        )?
        .map(|(p, _)| p))
    }

    /// Checks what clap cannot: combinations of settings.
    pub fn check(&self) -> Result<(), String> {
        match (self.backend_kind(), &self.valkey_url) {
            (BackendKind::Valkey, None) => {
                return Err("VIRTUFIN_BACKEND=valkey needs VIRTUFIN_VALKEY_URL (or --valkey-url), e.g. redis://127.0.0.1:6379".into());
            }
            (BackendKind::Valkey, Some(url)) => {
                virtufin_store::valkey::validate_url(url)
                    .map_err(|e| format!("invalid VIRTUFIN_VALKEY_URL '{url}': {e}"))?;
            }
            (BackendKind::Dapr, _) => {
                if self.dapr_grpc_port == 0 || self.dapr_http_port == 0 {
                    return Err(
                        "VIRTUFIN_BACKEND=dapr needs DAPR_GRPC_PORT and DAPR_HTTP_PORT (non-zero)"
                            .into(),
                    );
                }
            }
            (BackendKind::Memory, _) => {}
        }
        for o in self
            .cors_origins
            .iter()
            .filter(|o| !o.is_empty() && *o != "*")
        {
            if !(o.starts_with("http://") || o.starts_with("https://")) || o.ends_with('/') {
                return Err(format!(
                    "invalid VIRTUFIN_CORS_ORIGINS entry '{o}': an origin is scheme://host[:port], e.g. https://app.example.com"
                ));
            }
        }
        if self.app_id.is_empty() || self.app_id.contains("||") {
            return Err(format!(
                "invalid VIRTUFIN_APP_ID '{}': must be non-empty and must not contain '||'",
                self.app_id
            ));
        }
        Ok(())
    }

    /// The defaults, as if started with no flags and an empty environment
    /// (for tests and embedding).
    pub fn defaults() -> Self {
        Self::parse_from(["virtufin-api"])
    }
}

/// A secret from the file `setting` names, else from the systemd credential
/// `credential`; with where it came from (for messages). Trimmed as Valkey
/// reads its own password file (one config line); empty is an error.
fn secret_file(
    path: Option<&PathBuf>,
    setting: &str,
    credential: &str,
    what: &str,
) -> Result<Option<(String, String)>, String> {
    let (path, source) = match path {
        Some(p) => (p.clone(), setting.to_owned()),
        None => match virtufin_common::config::credential(credential) {
            Some(p) => (p, format!("the systemd credential {credential}")),
            None => return Ok(None),
        },
    };
    let shown = format!("{} ({source})", path.display());
    // Settled: a secret file being rewritten is not taken half-written;
    // empty is refused there.
    let text = virtufin_common::file::read_settled(&path).map_err(|e| match e {
        virtufin_common::file::ReadError::Empty { .. } => {
            format!("the {what} file {shown} is empty")
        }
        e => format!("cannot read the {what} file {shown}: {}", e.reason()),
    })?;
    let secret = text.trim_ascii();
    Ok(Some((secret.to_owned(), shown)))
}
