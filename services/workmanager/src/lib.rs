//! virtufin-workmanager: runs user workers on event topics — each in its
//! own process, fed through the api's acknowledged subscriptions — and
//! reports their lifecycle. Talks to nothing but the api.
//!
//! This build runs Python workers and native ones (C ABI v1, each in its
//! own `virtufin-worker-host` process); .NET workers are refused with a
//! clear status.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use virtufin_api_client::{link, publisher::Publisher};
use virtufin_common::{Health, Notifier, serve};
use virtufin_proto::workmanager::v1::work_manager_server::WorkManagerServer;

pub mod config;
pub mod engine;
mod grpc;
mod http;
pub mod manager;
pub mod metrics;
pub mod runtime;
pub mod source;

pub use config::Config;
pub use serve::Listeners;

/// Lifecycle topic owned by the workmanager.
pub const STATUS_TOPIC: &str = "workmanager.workerstatus";
/// CloudEvent source of the workmanager's events.
pub const SOURCE: &str = "urn:com.virtufin.workmanager";

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

const GRPC_SERVICES: &[&str] = &["virtufin.workmanager.v1.WorkManager"];

/// Runs until `shutdown`; READY after the api handshake and the recovery
/// of this instance's workers.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    config.check().map_err(RunError::Config)?;
    std::fs::create_dir_all(&config.state_dir).map_err(|e| {
        RunError::Config(format!("cannot create {}: {e}", config.state_dir.display()))
    })?;
    let api = config.link.client().map_err(RunError::Config)?;
    let health = Health::new();
    let api_check = health.register("api", &format!("handshake with the api at {}", api.addr()));
    let recovery_check = health.register("recovery", "waiting for the api");
    let (publisher, publisher_task) = Publisher::spawn(api.clone(), 10_000, shutdown.clone());
    let shared = manager::Shared::new(api.clone(), config.clone(), publisher, shutdown.clone());
    tracing::info!(instance = %shared.instance, api = %api.addr(), "starting");

    let tasks = tokio_util::task::TaskTracker::new();
    tasks.spawn(Notifier.follow(health.clone(), "virtufin-workmanager", shutdown.clone()));
    // SIGHUP (systemctl reload): the log filter.
    tasks.spawn(
        virtufin_common::reload::on_sighup(
            "virtufin-workmanager",
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
            WorkManagerServer::new(grpc::Service(shared.clone()))
                .max_decoding_message_size(16 << 20)
                .max_encoding_message_size(64 << 20),
        );
    let grpc = serve::with_reflection(grpc, &[virtufin_proto::WORKMANAGER_DESCRIPTOR_SET])?;
    let servers = serve::start(
        grpc,
        listeners.grpc,
        http::router(shared.clone(), &health),
        listeners.http,
        listeners.activated.then(|| health.clone()),
        &shutdown,
    );

    let options = config.link.options();
    tasks.spawn(link::maintain(
        api.clone(),
        api_check.clone(),
        health.clone(),
        options,
        shutdown.clone(),
        || async {},
    ));
    {
        let (shared, shutdown) = (shared.clone(), shutdown.clone());
        let progress = virtufin_common::notify::StartupProgress::new(&health);
        tasks.spawn(async move {
            tokio::select! { _ = shutdown.cancelled() => return, _ = api_check.wait_passing() => {} }
            loop {
                match shared.recover_with(&progress).await {
                    Ok(n) => {
                        recovery_check.pass(format!("{n} worker(s) recovered"));
                        return;
                    }
                    Err(e) => {
                        recovery_check.fail(format!("recovering workers: {}", e.message));
                        tokio::select! { _ = shutdown.cancelled() => return, _ = tokio::time::sleep(Duration::from_secs(1)) => {} }
                    }
                }
            }
        });
    }

    shutdown.cancelled().await;
    Notifier.stopping();
    tracing::info!("draining");
    let result = servers
        .drain(config.drain_timeout)
        .await
        .map_err(RunError::from);
    shared.stop_all().await;
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(1), tasks.wait()).await;
    let _ = tokio::time::timeout(Duration::from_secs(3), publisher_task).await;
    tracing::info!("stopped");
    result
}
