//! The websocketmanager's settings: flags bound to environment variables,
//! the seed's names where it has them.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use clap::Parser;
pub use virtufin_common::config::ListenUrls;
use virtufin_common::config::{parse_duration, parse_positive, parse_urls};

/// virtufin-websocketmanager: outbound WebSocket connections on behalf of
/// workers, with forwarding and lifecycle events through virtufin-api.
#[derive(Debug, Clone, Parser)]
#[command(name = "virtufin-websocketmanager", version, about, long_about = None)]
pub struct Config {
    #[command(flatten)]
    pub link: virtufin_api_client::link::LinkArgs,

    /// HTTP listen URLs (health and REST), `;`-separated.
    #[arg(long = "urls", env = "ASPNETCORE_URLS", default_value = "http://127.0.0.1:5201", value_parser = parse_urls)]
    pub http_urls: ListenUrls,

    /// Overrides the port of every HTTP listen URL.
    #[arg(long, env = "VIRTUFIN_HTTP_PORT")]
    pub http_port: Option<u16>,

    /// gRPC (h2c) port.
    #[arg(long, env = "VIRTUFIN_GRPC_PORT", default_value_t = 5202)]
    pub grpc_port: u16,

    /// gRPC listen address.
    #[arg(long, env = "VIRTUFIN_GRPC_HOST", default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    pub grpc_host: IpAddr,

    /// This instance's id (owner of its connections). Default: HOSTNAME,
    /// else the machine's host name — stable across restarts, so a
    /// restarted service takes its connections back at once.
    #[arg(long, env = "VIRTUFIN_INSTANCE_ID")]
    pub instance_id: Option<String>,

    /// First delay before reconnecting; doubles per attempt.
    #[arg(long, env = "VIRTUFIN_WS_RECONNECT_BASE_DELAY", default_value = "1s", value_parser = parse_duration)]
    pub reconnect_base_delay: Duration,

    /// Cap of the reconnect delay.
    #[arg(long, env = "VIRTUFIN_WS_RECONNECT_MAX_DELAY", default_value = "30s", value_parser = parse_duration)]
    pub reconnect_max_delay: Duration,

    /// Reconnect attempts before a connection is given up (`disconnected`).
    #[arg(long, env = "VIRTUFIN_WS_RECONNECT_MAX_ATTEMPTS", default_value = "5", value_parser = parse_positive)]
    pub reconnect_max_attempts: usize,

    /// How long one connection attempt (TCP, TLS, handshake) may take.
    #[arg(long, env = "VIRTUFIN_WS_CONNECT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// Send's timeout when a request gives none.
    #[arg(long, env = "VIRTUFIN_WS_SEND_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub default_send_timeout: Duration,

    /// Largest inbound or outbound WebSocket message, in bytes.
    #[arg(long, env = "VIRTUFIN_WS_MAX_MESSAGE_BYTES", default_value = "16777216", value_parser = parse_positive)]
    pub max_message_bytes: usize,

    /// Most connections this instance keeps.
    #[arg(long, env = "VIRTUFIN_WS_MAX_CONNECTIONS", default_value = "1000", value_parser = parse_positive)]
    pub max_connections: usize,

    /// How often this instance records that it is alive.
    #[arg(long, env = "VIRTUFIN_WS_HEARTBEAT_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,

    /// How often connections of vanished instances are looked for.
    #[arg(long, env = "VIRTUFIN_WS_RECLAIM_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub reclaim_interval: Duration,

    /// An instance silent for this long has vanished: its connections are
    /// taken over.
    #[arg(long, env = "VIRTUFIN_WS_RECLAIM_AFTER", default_value = "60s", value_parser = parse_duration)]
    pub reclaim_after: Duration,

    /// How long shutdown waits for open calls to finish.
    #[arg(long, env = "VIRTUFIN_DRAIN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
}

impl Config {
    pub fn defaults() -> Self {
        Self::parse_from(["virtufin-websocketmanager"])
    }

    pub fn http_addrs(&self) -> Vec<SocketAddr> {
        self.http_urls.with_port(self.http_port)
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        SocketAddr::new(self.grpc_host, self.grpc_port)
    }

    /// The instance id in effect.
    /// The instance id in effect.
    pub fn instance(&self) -> String {
        virtufin_common::config::instance_id(self.instance_id.as_deref(), "wsm")
    }

    pub fn check(&self) -> Result<(), String> {
        if self.reconnect_max_delay < self.reconnect_base_delay {
            return Err("VIRTUFIN_WS_RECONNECT_MAX_DELAY must not be below VIRTUFIN_WS_RECONNECT_BASE_DELAY".into());
        }
        if self.heartbeat_interval.is_zero() || self.reclaim_interval.is_zero() {
            return Err(
                "VIRTUFIN_WS_HEARTBEAT_INTERVAL and VIRTUFIN_WS_RECLAIM_INTERVAL must be above 0"
                    .into(),
            );
        }
        // A live instance's record is up to a heartbeat interval old, and a
        // take-over needs heartbeats without a gap of two intervals: a grace
        // below that would take connections from live instances.
        if self.reclaim_after <= self.heartbeat_interval * 2 {
            return Err(format!(
                "VIRTUFIN_WS_RECLAIM_AFTER ({:?}) must be more than twice VIRTUFIN_WS_HEARTBEAT_INTERVAL ({:?}): \
                 otherwise connections of live instances would be taken over",
                self.reclaim_after, self.heartbeat_interval
            ));
        }
        self.link.client().map(|_| ())
    }
}
