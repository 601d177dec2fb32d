//! virtufin-websocketmanager: keeps outbound WebSocket connections on
//! behalf of workers, forwards what arrives to pub/sub topics and publishes
//! the connections' lifecycle — all through virtufin-api (it never talks to
//! Valkey). Connections are persisted in the api's State, owned by one
//! instance each, restored after a restart and reclaimed from vanished
//! instances.

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;
use virtufin_api_client::link;
use virtufin_common::{Health, Notifier, serve};
use virtufin_proto::websocketmanager::v1::web_socket_manager_server::WebSocketManagerServer;

pub mod config;
pub mod conn;
pub mod grpc;
mod http;
pub mod manager;
pub mod metrics;

pub use config::Config;

/// Lifecycle topic owned by the websocketmanager.
pub const STATUS_TOPIC: &str = "websocketmanager.connectionstatus";
/// CloudEvent source of everything the websocketmanager publishes.
pub const SOURCE: &str = "urn:com.virtufin.websocketmanager";
/// CloudEvent type of forwarded frames.
pub const MESSAGE_TYPE: &str = "com.virtufin.websocketmanager.message";
pub use serve::Listeners;

/// Why the websocketmanager could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Serve(#[from] serve::ServeError),
}

/// The service's sockets: those systemd passed (socket activation), or
/// bound here before anything else, so that a port conflict fails the
/// start at once.
pub async fn bind(config: &Config) -> Result<Listeners, RunError> {
    Ok(Listeners::from_systemd_or_bind(&config.http_addrs(), config.grpc_addr()).await?)
}

const GRPC_SERVICES: &[&str] = &["virtufin.websocketmanager.v1.WebSocketManager"];

/// Largest gRPC message (a 1 MiB frame and more fits).
const MAX_MESSAGE_BYTES: usize = 32 * 1024 * 1024;

/// Runs the service until `shutdown` is cancelled, then drains.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    config.check().map_err(RunError::Config)?;
    let api = config.link.client().map_err(RunError::Config)?;
    let health = Health::new();
    let api_check = health.register("api", &format!("handshake with the api at {}", api.addr()));
    let state_check = health.register("state", "waiting for the api");
    let restore_check = health.register("restore", "waiting for the api");

    let (publisher, publisher_task) =
        virtufin_api_client::publisher::Publisher::spawn(api.clone(), 10_000, shutdown.clone());
    let shared = manager::Shared::new(api.clone(), config.clone(), publisher, shutdown.clone())
        .map_err(RunError::Config)?;
    tracing::info!(instance = %shared.instance, api = %api.addr(), "starting");

    let tasks = tokio_util::task::TaskTracker::new();
    tasks.spawn(Notifier.follow(
        health.clone(),
        "virtufin-websocketmanager",
        shutdown.clone(),
    ));
    // SIGHUP (systemctl reload): the log filter.
    tasks.spawn(
        virtufin_common::reload::on_sighup(
            "virtufin-websocketmanager",
            virtufin_common::reload::common_parts(),
            health.clone(),
            shutdown.clone(),
        )
        .map_err(|e| RunError::Config(format!("cannot install the SIGHUP handler: {e}")))?,
    );
    let (reporter, std_health) = tonic_health::server::health_reporter();
    tasks.spawn(virtufin_common::grpc_health::follow(
        reporter,
        health.clone(),
        GRPC_SERVICES,
        shutdown.clone(),
    ));

    let grpc = serve::grpc_server()
        .layer(shared.metrics.base.grpc_layer())
        .add_service(std_health)
        .add_service(
            WebSocketManagerServer::new(grpc::Service(shared.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        );
    let grpc = serve::with_reflection(grpc, &[virtufin_proto::WEBSOCKETMANAGER_DESCRIPTOR_SET])?;
    let servers = serve::start(
        grpc,
        listeners.grpc,
        http::router(shared.clone(), &health),
        listeners.http,
        listeners.activated.then(|| health.clone()),
        &shutdown,
    );

    // The api link: handshake now and again; on a reconnect, rewrite the
    // records (writes may have failed while the api was away).
    {
        let (api, check, health, shared) = (
            api.clone(),
            api_check.clone(),
            health.clone(),
            shared.clone(),
        );
        let options = config.link.options();
        tasks.spawn(link::maintain(
            api,
            check,
            health,
            options,
            shutdown.clone(),
            move || {
                let shared = shared.clone();
                async move { shared.persist_all().await }
            },
        ));
    }
    tasks.spawn(startup(
        shared.clone(),
        health.clone(),
        api_check,
        state_check,
        restore_check,
    ));

    shutdown.cancelled().await;
    Notifier.stopping();
    tracing::info!("draining");
    let result = servers
        .drain(config.drain_timeout)
        .await
        .map_err(RunError::from);
    shared.wait_actors(Duration::from_secs(5)).await;
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(1), tasks.wait()).await;
    let _ = tokio::time::timeout(Duration::from_secs(3), publisher_task).await;
    tracing::info!("stopped");
    result
}

/// Readiness after the handshake: a state round trip, then the restore of
/// this instance's connections; then heartbeat and reclaim forever.
async fn startup(
    shared: Arc<manager::Shared>,
    health: Health,
    api_check: virtufin_common::Check,
    state_check: virtufin_common::Check,
    restore_check: virtufin_common::Check,
) {
    let shutdown = shared.shutdown.clone();
    tokio::select! { _ = shutdown.cancelled() => return, _ = api_check.wait_passing() => {} }
    let mut backoff = Duration::from_millis(100);
    loop {
        match shared.heartbeat().await {
            Ok(()) => {
                state_check.pass("state write/read round trip through the api succeeded");
                break;
            }
            Err(e) => {
                state_check.fail(format!("state round trip through the api failed: {e}"));
                tokio::select! { _ = shutdown.cancelled() => return, _ = tokio::time::sleep(backoff) => {} }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
    let progress = virtufin_common::notify::StartupProgress::new(&health);
    loop {
        match shared.restore(&progress).await {
            Ok(n) => {
                restore_check.pass(format!("{n} connection(s) restored"));
                break;
            }
            Err(e) => {
                restore_check.fail(format!("restoring connections: {e}"));
                tokio::select! { _ = shutdown.cancelled() => return, _ = tokio::time::sleep(Duration::from_secs(1)) => {} }
            }
        }
    }
    let mut heartbeat = tokio::time::interval(shared.config.heartbeat_interval);
    let mut reclaim = tokio::time::interval(shared.config.reclaim_interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    reclaim.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = heartbeat.tick() => match shared.heartbeat().await {
                Ok(()) => {
                    state_check.pass("state write/read round trip through the api succeeded");
                    if let Err(e) = shared.let_go_of_lost().await {
                        tracing::warn!(error = %e, "could not check which connections are still this instance's");
                    }
                }
                Err(e) => state_check.fail(format!("state round trip through the api failed: {e}")),
            },
            _ = reclaim.tick() => {
                if let Err(e) = shared.reclaim().await {
                    tracing::warn!(error = %e, "reclaim failed");
                }
            }
        }
    }
}
