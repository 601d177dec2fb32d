//! virtufin-api: the only Virtufin service that talks to the state store
//! and the broker. Serves `virtufin.api.v1.{Health,State,Pubsub}` and the
//! standard `grpc.health.v1` over gRPC (h2c) with reflection, and health
//! plus REST routes over HTTP.

use std::{
    net::SocketAddr,
    sync::{Arc, OnceLock},
    time::Duration,
};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use virtufin_common::{Health, Notifier};
use virtufin_proto::api::v1::{
    health_server::HealthServer, pubsub_server::PubsubServer, state_server::StateServer,
};
use virtufin_store::{Backend, DeliveryOptions, memory, valkey};

pub mod cloudevent;
pub mod config;
pub mod error;
mod grpc_health;
mod http;
pub mod pubsub;
pub mod state;
pub mod validate;

pub use config::{BackendKind, Config};
use error::ApiError;

/// Largest gRPC message the api accepts or sends: room for the largest
/// event (`--max-event-bytes`, 4 MiB by default) and its envelope; batches
/// beyond it are refused by gRPC itself.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Why the api could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot listen on {addr} ({what}): {cause}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        cause: std::io::Error,
    },
    #[error("{what} server failed: {cause}")]
    Serve {
        what: &'static str,
        cause: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// What every request handler shares.
pub struct App {
    backend: OnceLock<Backend>,
    /// Says where the backend is, for messages ("Valkey at redis://…").
    pub backend_desc: String,
    pub kind: BackendKind,
    pub limits: validate::Limits,
    pub event_defaults: cloudevent::Defaults,
    pub subscriptions: Arc<pubsub::Registry>,
    pub health: Health,
    /// Cancelled on shutdown; every subscription stream hangs off it.
    pub shutdown: CancellationToken,
}

impl App {
    /// The backend, once connected.
    pub fn backend(&self) -> Result<&Backend, ApiError> {
        self.backend.get().ok_or_else(|| {
            ApiError::unavailable(format!(
                "the api is not connected to {} yet; retry shortly",
                self.backend_desc
            ))
        })
    }
}

/// The api's sockets, bound before anything else so that a port conflict
/// fails the start at once.
#[derive(Debug)]
pub struct Listeners {
    pub http: Vec<TcpListener>,
    pub grpc: TcpListener,
}

impl Listeners {
    pub async fn bind(config: &Config) -> Result<Self, RunError> {
        let mut http = Vec::new();
        for addr in config.http_addrs() {
            http.push(
                TcpListener::bind(addr)
                    .await
                    .map_err(|cause| RunError::Bind {
                        what: "HTTP",
                        addr,
                        cause,
                    })?,
            );
        }
        let addr = config.grpc_addr();
        let grpc = TcpListener::bind(addr)
            .await
            .map_err(|cause| RunError::Bind {
                what: "gRPC",
                addr,
                cause,
            })?;
        Ok(Self { http, grpc })
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

fn delivery_options(c: &Config) -> DeliveryOptions {
    DeliveryOptions {
        processing_timeout: c.processing_timeout,
        reclaim_interval: c.reclaim_interval,
        retry_delay: c.retry_delay,
        max_in_flight: c.max_in_flight,
        ..DeliveryOptions::default()
    }
}

/// Runs the api until `shutdown` is cancelled, then drains.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    config.check().map_err(RunError::Config)?;
    let notifier = Notifier;
    let health = Health::new();
    let kind = config.backend_kind();
    let backend_desc = match kind {
        BackendKind::Memory => "the embedded memory backend".to_owned(),
        BackendKind::Valkey => format!("Valkey at {}", config.valkey_url.as_deref().unwrap_or("?")),
        BackendKind::Dapr => format!("the Dapr sidecar on port {}", config.dapr_grpc_port),
    };
    let store_check = health.register("state-store", &format!("connecting to {backend_desc}"));
    let broker_check = health.register("broker", &format!("connecting to {backend_desc}"));
    let app = Arc::new(App {
        backend: OnceLock::new(),
        backend_desc,
        kind,
        limits: validate::Limits {
            max_value_bytes: config.max_value_bytes,
            max_event_bytes: config.max_event_bytes,
            ..validate::Limits::default()
        },
        event_defaults: cloudevent::Defaults {
            source: config.app_id.clone(),
            pubsub_name: config.pubsub_name.clone(),
            ..cloudevent::Defaults::default()
        },
        subscriptions: Arc::default(),
        health: health.clone(),
        shutdown: shutdown.clone(),
    });

    let tasks = tokio_util::task::TaskTracker::new();
    tasks.spawn(notifier.follow(health.clone(), "virtufin-api", shutdown.clone()));

    // gRPC
    let (reporter, std_health) = tonic_health::server::health_reporter();
    tasks.spawn(grpc_health::follow(
        reporter,
        health.clone(),
        shutdown.clone(),
    ));
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(virtufin_proto::API_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| RunError::Config(format!("reflection: {e}")))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(virtufin_proto::API_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| RunError::Config(format!("reflection: {e}")))?;
    let state_api = state::StateApi::new(app.clone());
    let grpc_addr = listeners.grpc.local_addr().ok();
    let grpc = tonic::transport::Server::builder()
        // Finds clients that vanished without closing (dead subscriptions)
        // within 40 s.
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(std_health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(HealthServer::new(grpc_health::ApiHealth {
            app: app.clone(),
        }))
        .add_service(StateServer::new(state::StateService(state_api.clone())))
        .add_service(PubsubServer::new(pubsub::PubsubService {
            app: app.clone(),
        }))
        .serve_with_incoming_shutdown(
            // Our own listener, so the server's socket options must be set
            // here: without TCP_NODELAY small replies wait ~40 ms for a
            // delayed ACK.
            tonic::transport::server::TcpIncoming::from(listeners.grpc)
                .with_nodelay(Some(true))
                .with_keepalive(Some(Duration::from_secs(30))),
            shutdown.clone().cancelled_owned(),
        );

    // HTTP
    let router = http::router(app.clone(), state_api);
    let mut http_servers = Vec::new();
    for l in listeners.http {
        let addr = l.local_addr().ok();
        let s = shutdown.clone();
        let r = router.clone();
        tracing::info!(?addr, "HTTP listening");
        http_servers.push(tokio::spawn(async move {
            axum::serve(l, r)
                .with_graceful_shutdown(s.cancelled_owned())
                .await
        }));
    }
    tracing::info!(addr = ?grpc_addr, backend = %app.backend_desc, "gRPC listening");

    // Backend: connect (retrying until it answers), then keep probing it.
    tasks.spawn(connect_and_probe(
        app.clone(),
        config.clone(),
        store_check,
        broker_check,
    ));

    let grpc_task = tokio::spawn(grpc);
    shutdown.cancelled().await;
    Notifier.stopping();
    tracing::info!("draining");
    let drain = async {
        let g = grpc_task.await;
        for h in http_servers {
            let _ = h.await;
        }
        g
    };
    let result = match tokio::time::timeout(config.drain_timeout, drain).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(e))) => Err(RunError::Serve {
            what: "gRPC",
            cause: Box::new(e),
        }),
        Ok(Err(e)) => Err(RunError::Serve {
            what: "gRPC",
            cause: Box::new(e),
        }),
        Err(_) => {
            tracing::warn!(timeout = ?config.drain_timeout, "drain timed out; stopping anyway");
            Ok(())
        }
    };
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(1), tasks.wait()).await;
    tracing::info!("stopped");
    result
}

async fn connect_and_probe(
    app: Arc<App>,
    config: Config,
    store_check: virtufin_common::Check,
    broker_check: virtufin_common::Check,
) {
    let delivery = delivery_options(&config);
    let mut backoff = Duration::from_millis(100);
    let backend = loop {
        let attempt = match app.kind {
            BackendKind::Memory => Ok(memory::backend(delivery.clone(), config.stream_max_len)),
            BackendKind::Valkey => {
                let mut o =
                    valkey::ValkeyOptions::new(config.valkey_url.clone().unwrap_or_default());
                o.key_prefix = config.app_id.clone();
                o.stream_max_len = config.stream_max_len;
                valkey::connect(o, delivery.clone()).await
            }
            BackendKind::Dapr => Err(virtufin_store::StoreError::Unavailable(
                "the dapr backend is not built in".into(),
            )),
        };
        match attempt {
            Ok(b) => break b,
            Err(e) => {
                let why = format!("{} is unreachable: {e}", app.backend_desc);
                store_check.fail(why.clone());
                broker_check.fail(why);
                tracing::warn!(error = %e, retry_in = ?backoff, "backend not reachable yet");
                tokio::select! {
                    _ = app.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    };
    let _ = app.backend.set(backend.clone());
    tracing::info!(backend = %app.backend_desc, "backend connected");
    let mut tick = tokio::time::interval(config.probe_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let limit =
            Duration::from_secs(2).min(config.probe_interval.max(Duration::from_millis(100)));
        match tokio::time::timeout(limit, backend.state.ping()).await {
            Ok(Ok(())) => store_check.pass(format!("{} answers", app.backend_desc)),
            Ok(Err(e)) => store_check.fail(format!("{}: {e}", app.backend_desc)),
            Err(_) => store_check.fail(format!("{}: no answer within {limit:?}", app.backend_desc)),
        }
        match tokio::time::timeout(limit, backend.pubsub.ping()).await {
            Ok(Ok(())) => broker_check.pass(format!("{} answers", app.backend_desc)),
            Ok(Err(e)) => broker_check.fail(format!("{}: {e}", app.backend_desc)),
            Err(_) => {
                broker_check.fail(format!("{}: no answer within {limit:?}", app.backend_desc))
            }
        }
        app.health.set_live(true, "probing the backend");
        tokio::select! {
            _ = app.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
    }
}
