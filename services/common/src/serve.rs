//! The two faces of every service — gRPC (h2c) and HTTP — on sockets bound
//! before anything else (so a port conflict fails the start at once), and
//! their graceful drain on shutdown.

use std::{net::SocketAddr, time::Duration};

use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

/// Why a service could not listen or serve.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr} ({what}): {cause}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        cause: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Grpc(String),
    #[error("invalid reflection descriptors: {0}")]
    Reflection(String),
}

/// A service's sockets.
#[derive(Debug)]
pub struct Listeners {
    pub http: Vec<TcpListener>,
    pub grpc: TcpListener,
}

impl Listeners {
    pub async fn bind(http: &[SocketAddr], grpc: SocketAddr) -> Result<Self, ServeError> {
        let mut out = Vec::new();
        for &addr in http {
            out.push(
                TcpListener::bind(addr)
                    .await
                    .map_err(|cause| ServeError::Bind {
                        what: "HTTP",
                        addr,
                        cause,
                    })?,
            );
        }
        let listener = TcpListener::bind(grpc)
            .await
            .map_err(|cause| ServeError::Bind {
                what: "gRPC",
                addr: grpc,
                cause,
            })?;
        Ok(Self {
            http: out,
            grpc: listener,
        })
    }

    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc.local_addr().ok()
    }

    pub fn http_addrs(&self) -> Vec<SocketAddr> {
        self.http
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }
}

/// A gRPC server with the settings every service shares: HTTP/2 keepalive
/// pings find clients that vanished without closing (dead subscriptions)
/// within 40 s.
pub fn grpc_server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
}

/// Adds gRPC reflection (v1, and v1alpha which grpcurl 1.8 uses) over the
/// given descriptor sets plus `grpc.health.v1`.
pub fn with_reflection<L>(
    router: tonic::transport::server::Router<L>,
    sets: &[&'static [u8]],
) -> Result<tonic::transport::server::Router<L>, ServeError> {
    with_reflection_behind(router, sets, Ok)
}

/// [`with_reflection`] with the reflection services behind `interceptor`
/// (e.g. the api's key check).
pub fn with_reflection_behind<L, I>(
    router: tonic::transport::server::Router<L>,
    sets: &[&'static [u8]],
    interceptor: I,
) -> Result<tonic::transport::server::Router<L>, ServeError>
where
    I: tonic::service::Interceptor + Clone + Send + Sync + 'static,
{
    let mut v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
    let mut v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
    for s in sets {
        v1 = v1.register_encoded_file_descriptor_set(s);
        v1alpha = v1alpha.register_encoded_file_descriptor_set(s);
    }
    let v1 = v1
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    let v1alpha = v1alpha
        .build_v1alpha()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    Ok(router
        .add_service(tonic::service::interceptor::InterceptedService::new(
            v1,
            interceptor.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            v1alpha,
            interceptor,
        )))
}

/// The running servers of one service.
pub struct Servers {
    grpc: JoinHandle<Result<(), tonic::transport::Error>>,
    http: Vec<JoinHandle<std::io::Result<()>>>,
}

/// Starts serving; both stop accepting when `shutdown` is cancelled.
pub fn start<L>(
    grpc: tonic::transport::server::Router<L>,
    grpc_listener: TcpListener,
    http: axum::Router,
    http_listeners: Vec<TcpListener>,
    shutdown: &CancellationToken,
) -> Servers
where
    L: tower_layer::Layer<tonic::service::Routes> + Send + 'static,
    L::Service: tower_service::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
        > + Clone
        + Send
        + Sync
        + 'static,
    <L::Service as tower_service::Service<http::Request<tonic::body::Body>>>::Future: Send,
    <L::Service as tower_service::Service<http::Request<tonic::body::Body>>>::Error:
        Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    tracing::info!(addr = ?grpc_listener.local_addr().ok(), "gRPC listening");
    // Our own listener, so socket options are set here: without
    // TCP_NODELAY small replies wait ~40 ms for a delayed ACK.
    let incoming = tonic::transport::server::TcpIncoming::from(grpc_listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(30)));
    let grpc = tokio::spawn(
        grpc.serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned()),
    );
    let http = http_listeners
        .into_iter()
        .map(|l| {
            tracing::info!(addr = ?l.local_addr().ok(), "HTTP listening");
            let (r, s) = (http.clone(), shutdown.clone());
            tokio::spawn(async move {
                axum::serve(l, r)
                    .with_graceful_shutdown(s.cancelled_owned())
                    .await
            })
        })
        .collect();
    Servers { grpc, http }
}

impl Servers {
    /// Waits for the servers to finish their open calls, at most `timeout`.
    pub async fn drain(self, timeout: Duration) -> Result<(), ServeError> {
        let Self { grpc, http } = self;
        let all = async {
            let g = grpc.await;
            for h in http {
                let _ = h.await;
            }
            g
        };
        match tokio::time::timeout(timeout, all).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(ServeError::Grpc(e.to_string())),
            Ok(Err(e)) => Err(ServeError::Grpc(e.to_string())),
            Err(_) => {
                tracing::warn!(?timeout, "drain timed out; stopping anyway");
                Ok(())
            }
        }
    }
}
