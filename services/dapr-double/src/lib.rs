//! A stand-in for daprd in tests: the state and pub/sub part of
//! `dapr.proto.runtime.v1.Dapr` (SaveState, GetState, GetBulkState,
//! DeleteState, PublishEvent, SubscribeTopicEventsAlpha1) served with the
//! `dapr` crate's generated server, plus `GET /v1.0/healthz`, and backed by
//! virtufin-store's Valkey backend with the app id as key prefix — so what
//! goes through it lands in Dapr's own Valkey layout. Every other RPC
//! answers UNIMPLEMENTED. It is a double: real daprd was not run here.

mod double;
mod stubs;

use std::net::SocketAddr;

pub use double::DaprDouble;
use tokio_util::sync::CancellationToken;
use virtufin_store::{DeliveryOptions, valkey};

/// A running double.
pub struct Running {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    stop: CancellationToken,
}

impl Running {
    /// Stops serving (like killing daprd).
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Why the double could not start.
#[derive(Debug)]
pub struct StartError(pub String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Starts the double on `grpc`/`http` (port 0: any) over the Valkey at
/// `valkey_url`, with Dapr's app-id key prefix.
pub async fn start(
    valkey_url: &str,
    app_id: &str,
    delivery: DeliveryOptions,
    grpc: SocketAddr,
    http: SocketAddr,
) -> Result<Running, StartError> {
    let mut o = valkey::ValkeyOptions::new(valkey_url);
    o.key_prefix = app_id.to_owned();
    let backend = valkey::connect(o, delivery)
        .await
        .map_err(|e| StartError(e.to_string()))?;
    let double = DaprDouble::new(backend, app_id);
    let stop = CancellationToken::new();
    let gl = tokio::net::TcpListener::bind(grpc)
        .await
        .map_err(|e| StartError(format!("bind {grpc}: {e}")))?;
    let hl = tokio::net::TcpListener::bind(http)
        .await
        .map_err(|e| StartError(format!("bind {http}: {e}")))?;
    let (grpc, http) = (
        gl.local_addr().map_err(|e| StartError(e.to_string()))?,
        hl.local_addr().map_err(|e| StartError(e.to_string()))?,
    );
    let server = dapr::dapr::proto::runtime::v1::dapr_server::DaprServer::new(double);
    let s = stop.clone();
    tokio::spawn(async move {
        let incoming = tonic::transport::server::TcpIncoming::from(gl).with_nodelay(Some(true));
        let _ = tonic::transport::Server::builder()
            .add_service(server)
            .serve_with_incoming_shutdown(incoming, s.cancelled_owned())
            .await;
    });
    let s = stop.clone();
    let router = axum::Router::new().route(
        "/v1.0/healthz",
        axum::routing::get(|| async { axum::http::StatusCode::NO_CONTENT }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(hl, router)
            .with_graceful_shutdown(s.cancelled_owned())
            .await;
    });
    Ok(Running { grpc, http, stop })
}
