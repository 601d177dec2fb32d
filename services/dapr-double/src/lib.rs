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
use virtufin_store::{DeliveryOptions, valkey};

/// A running double. It runs on a runtime of its own, so that
/// [`Running::kill`] drops every connection at once, as a killed daprd does.
pub struct Running {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    kill: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    /// Stops the double abruptly: listeners and connections vanish.
    pub fn kill(&mut self) {
        if let Some(k) = self.kill.take() {
            let _ = k.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill();
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
    let gl =
        std::net::TcpListener::bind(grpc).map_err(|e| StartError(format!("bind {grpc}: {e}")))?;
    let hl =
        std::net::TcpListener::bind(http).map_err(|e| StartError(format!("bind {http}: {e}")))?;
    for l in [&gl, &hl] {
        l.set_nonblocking(true)
            .map_err(|e| StartError(e.to_string()))?;
    }
    let (grpc, http) = (
        gl.local_addr().map_err(|e| StartError(e.to_string()))?,
        hl.local_addr().map_err(|e| StartError(e.to_string()))?,
    );
    let mut o = valkey::ValkeyOptions::new(valkey_url);
    o.key_prefix = app_id.to_owned();
    let app_id = app_id.to_owned();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
    let (kill_tx, kill_rx) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                let _ = ready_tx.send(Err(e.to_string()));
                return;
            }
        };
        rt.spawn(async move {
            let backend = match valkey::connect(o, delivery).await {
                Ok(b) => b,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
            };
            let (gl, hl) = match (
                tokio::net::TcpListener::from_std(gl),
                tokio::net::TcpListener::from_std(hl),
            ) {
                (Ok(g), Ok(h)) => (g, h),
                _ => {
                    let _ = ready_tx.send(Err("cannot adopt the listeners".into()));
                    return;
                }
            };
            let server = dapr::dapr::proto::runtime::v1::dapr_server::DaprServer::new(
                DaprDouble::new(backend, &app_id),
            );
            tokio::spawn(async move {
                let incoming =
                    tonic::transport::server::TcpIncoming::from(gl).with_nodelay(Some(true));
                let _ = tonic::transport::Server::builder()
                    .add_service(server)
                    .serve_with_incoming(incoming)
                    .await;
            });
            let router = axum::Router::new().route(
                "/v1.0/healthz",
                axum::routing::get(|| async { axum::http::StatusCode::NO_CONTENT }),
            );
            tokio::spawn(async move {
                let _ = axum::serve(hl, router).await;
            });
            let _ = ready_tx.send(Ok(()));
        });
        // Run until killed, then drop every task and socket at once.
        let _ = kill_rx.recv();
        rt.shutdown_background();
    });
    match ready_rx.await {
        Ok(Ok(())) => Ok(Running {
            grpc,
            http,
            kill: Some(kill_tx),
            thread: Some(thread),
        }),
        Ok(Err(e)) => Err(StartError(e)),
        Err(_) => Err(StartError(
            "the double's runtime ended before it was ready".into(),
        )),
    }
}
