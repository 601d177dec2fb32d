//! The two faces of every service — gRPC (h2c) and HTTP — on sockets bound
//! before anything else (so a port conflict fails the start at once), or
//! taken from systemd (socket activation), and their graceful drain on
//! shutdown.
//!
//! Socket activation: systemd holds the listeners (`virtufin-<service>-http.socket`
//! and `-grpc.socket`, `FileDescriptorName=http` / `grpc`) across restarts
//! of the service, so a client connecting while the service restarts waits
//! in the listen backlog instead of being refused. A socket-activated
//! service starts accepting only once it is ready (see [`start`]), so no
//! call is ever answered by a half-started service.

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
    #[error("socket activation: {0}")]
    Activation(String),
}

/// `FileDescriptorName=` of the HTTP socket unit.
pub const FD_NAME_HTTP: &str = "http";
/// `FileDescriptorName=` of the gRPC socket unit.
pub const FD_NAME_GRPC: &str = "grpc";

/// A service's sockets.
#[derive(Debug)]
pub struct Listeners {
    pub http: Vec<TcpListener>,
    pub grpc: TcpListener,
    /// Passed by systemd (socket activation) rather than bound here: the
    /// servers then accept only once the service is ready.
    pub activated: bool,
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
            activated: false,
        })
    }

    /// The listeners systemd passed (`LISTEN_FDS`/`LISTEN_FDNAMES`), or,
    /// when it passed none (`virtufin up`, tests, a plain run), the given
    /// addresses bound here. The passed sockets win over the addresses:
    /// the socket units say where the service listens.
    pub async fn from_systemd_or_bind(
        http: &[SocketAddr],
        grpc: SocketAddr,
    ) -> Result<Self, ServeError> {
        match Self::from_systemd()? {
            Some(l) => {
                let (h, g) = (l.http_addrs(), l.grpc_addr());
                tracing::info!(http = ?h, grpc = ?g, "socket-activated: listening on the sockets systemd passed");
                if g != Some(grpc) || h.iter().any(|a| !http.contains(a)) {
                    tracing::info!(configured_http = ?http, configured_grpc = %grpc, "the socket units' addresses differ from the configured ones; the socket units win");
                }
                Ok(l)
            }
            None => Self::bind(http, grpc).await,
        }
    }

    /// The listeners systemd passed, if any: every socket named `http` (at
    /// least one) and exactly one named `grpc`.
    pub fn from_systemd() -> Result<Option<Self>, ServeError> {
        let err = |m: String| ServeError::Activation(m);
        // sd_notify reads the names (and marks the descriptors
        // close-on-exec, so workers do not inherit them); listenfd turns
        // each descriptor into a listener after checking it is a TCP
        // listening socket.
        let names: Vec<String> = sd_notify::listen_fds_with_names()
            .map_err(|e| err(format!("LISTEN_FDS/LISTEN_FDNAMES: {e}")))?
            .map(|(_, name)| name)
            .collect();
        if names.is_empty() {
            return Ok(None);
        }
        let mut fds = listenfd::ListenFd::from_env();
        let mut http = Vec::new();
        let mut grpc = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let std = fds
                .take_tcp_listener(i)
                .map_err(|e| err(format!("descriptor {} ('{name}'): {e}", i + 3)))?
                .ok_or_else(|| err(format!("descriptor {} ('{name}') was not passed", i + 3)))?;
            std.set_nonblocking(true)
                .map_err(|e| err(format!("descriptor {} ('{name}'): {e}", i + 3)))?;
            let l = TcpListener::from_std(std)
                .map_err(|e| err(format!("descriptor {} ('{name}'): {e}", i + 3)))?;
            match name.as_str() {
                FD_NAME_HTTP => http.push(l),
                FD_NAME_GRPC => grpc.push(l),
                other => {
                    return Err(err(format!(
                        "systemd passed a socket named '{other}'; the socket units must name theirs \
                         FileDescriptorName={FD_NAME_HTTP} or FileDescriptorName={FD_NAME_GRPC}"
                    )));
                }
            }
        }
        if http.is_empty() {
            return Err(err(format!(
                "systemd passed sockets ({}) but none named '{FD_NAME_HTTP}': is the -http.socket unit listed in the service's Sockets=?",
                names.join(", ")
            )));
        }
        let grpc = match (grpc.pop(), grpc.is_empty()) {
            (Some(g), true) => g,
            (Some(_), false) => {
                return Err(err(format!(
                    "systemd passed more than one socket named '{FD_NAME_GRPC}'; give the -grpc.socket unit one ListenStream="
                )));
            }
            (None, _) => {
                return Err(err(format!(
                    "systemd passed sockets ({}) but none named '{FD_NAME_GRPC}': is the -grpc.socket unit listed in the service's Sockets=?",
                    names.join(", ")
                )));
            }
        };
        Ok(Some(Self {
            http,
            grpc,
            activated: true,
        }))
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

/// The gRPC server [`grpc_server`] returns: every call in its trace.
pub type GrpcServer = tonic::transport::Server<
    tower_layer::Stack<crate::trace_layer::TraceLayer, tower_layer::Identity>,
>;

/// A gRPC server with the settings every service shares: HTTP/2 keepalive
/// pings find clients that vanished without closing (dead subscriptions)
/// within 40 s, and every call runs in its trace (the caller's
/// `traceparent`; see [`crate::trace_layer`]).
pub fn grpc_server() -> GrpcServer {
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .layer(crate::trace_layer::TraceLayer)
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
///
/// With `accept_when_ready` (socket-activated listeners) nothing is
/// accepted before `health` is first ready: connections wait in the
/// kernel's backlog meanwhile, so a client is neither refused nor answered
/// by a half-started service (systemd's socket-activation contract). Bound
/// here (`virtufin up`, tests) the service accepts at once and answers
/// "not ready yet" itself, as before.
pub fn start<L>(
    grpc: tonic::transport::server::Router<L>,
    grpc_listener: TcpListener,
    http: axum::Router,
    http_listeners: Vec<TcpListener>,
    accept_when_ready: Option<crate::Health>,
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
    // Only a socket-activated service lingers: its listening socket stays
    // with systemd for the next process, so every connection it accepted
    // is one nobody else will answer. Bound here, the socket closes with
    // the process anyway (tests, `virtufin up`: no half-second per stop).
    let linger = if accept_when_ready.is_some() {
        LINGER
    } else {
        Duration::ZERO
    };
    let gate = |health: Option<crate::Health>, s: CancellationToken| async move {
        let Some(h) = health else { return true };
        tokio::select! {
            _ = s.cancelled() => false,
            _ = h.wait_ready() => true,
        }
    };
    let grpc = {
        let (g, s) = (
            gate(accept_when_ready.clone(), shutdown.clone()),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            if !g.await {
                return Ok(());
            }
            tracing::info!("ready: accepting gRPC connections");
            // As for HTTP (see [`LINGER`]): stop accepting at once, let
            // the connections accepted so far send their calls, then go
            // away (HTTP/2 GOAWAY; calls in progress finish).
            use futures_util::StreamExt;
            let incoming = incoming
                .take_until(s.clone().cancelled_owned())
                .chain(futures_util::stream::pending());
            grpc.serve_with_incoming_shutdown(incoming, async move {
                s.cancelled().await;
                tokio::time::sleep(linger).await;
            })
            .await
        })
    };
    // Every HTTP call in its trace too (a `traceparent` header).
    let http = http.layer(crate::trace_layer::TraceLayer);
    let http = http_listeners
        .into_iter()
        .map(|l| {
            tracing::info!(addr = ?l.local_addr().ok(), "HTTP listening");
            let (r, s) = (http.clone(), shutdown.clone());
            let g = gate(accept_when_ready.clone(), shutdown.clone());
            tokio::spawn(async move {
                if !g.await {
                    return Ok(());
                }
                let r = r.layer(axum::middleware::map_response_with_state(
                    s.clone(),
                    close_after_shutdown,
                ));
                let stop = s.clone();
                axum::serve(
                    UntilShutdown {
                        inner: l,
                        stop: s.clone(),
                    },
                    r,
                )
                .with_graceful_shutdown(async move {
                    stop.cancelled().await;
                    tokio::time::sleep(linger).await;
                })
                .await
            })
        })
        .collect();
    Servers { grpc, http }
}

/// How long, once shutdown begins, connections already accepted get to send
/// their request before idle ones are closed. A client whose connection
/// was accepted an instant before shutdown has its request on the way:
/// closing the connection as idle (what a graceful shutdown does at once)
/// would reset it, and the listener is socket-activated precisely so that
/// no client sees a restart.
const LINGER: Duration = Duration::from_millis(500);

/// An HTTP listener that stops accepting when shutdown begins, while the
/// connections it accepted are still served (see [`LINGER`]); what
/// waits in the backlog stays for the next process (socket activation) or
/// is refused when the socket closes (bound here).
struct UntilShutdown<L> {
    inner: L,
    stop: CancellationToken,
}

impl<L: axum::serve::Listener> axum::serve::Listener for UntilShutdown<L> {
    type Io = L::Io;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        tokio::select! {
            // Never again: the graceful shutdown ends the accept loop.
            _ = self.stop.cancelled() => std::future::pending().await,
            c = self.inner.accept() => c,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// Once shutdown began, every answer closes its connection behind it, so a
/// keep-alive client opens its next one to the next process.
async fn close_after_shutdown(
    axum::extract::State(stop): axum::extract::State<CancellationToken>,
    mut res: axum::response::Response,
) -> axum::response::Response {
    if stop.is_cancelled() {
        res.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
    res
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
