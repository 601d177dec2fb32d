//! virtufin-api: the only Virtufin service that talks to the state store
//! and the broker. Serves `virtufin.api.v1.{Health,State,Pubsub,Gateway}`
//! and the standard `grpc.health.v1` over gRPC (h2c, and gRPC-Web for
//! browsers) with reflection, and health plus REST routes over HTTP; API
//! keys guard everything but health when any is configured.

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use virtufin_common::{
    Health, Notifier,
    auth::{ApiKeys, GrpcAuth, SharedKeys},
};
use virtufin_proto::api::v1::{
    gateway_server::GatewayServer, health_server::HealthServer, pubsub_server::PubsubServer,
    state_server::StateServer,
};
use virtufin_store::{Backend, DeliveryOptions, memory, valkey};

pub mod cloudevent;
pub mod config;
pub mod error;
pub mod gateway;
mod grpc_health;
mod http;
pub mod metrics;
pub mod pubsub;
pub mod state;
pub use virtufin_common::validate;

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
    #[error(transparent)]
    Serve(#[from] virtufin_common::serve::ServeError),
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
    pub metrics: metrics::ApiMetrics,
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

pub use virtufin_common::serve::Listeners;

/// The service's sockets: those systemd passed (socket activation), or
/// bound here before anything else, so that a port conflict fails the
/// start at once.
pub async fn bind(config: &Config) -> Result<Listeners, RunError> {
    Ok(Listeners::from_systemd_or_bind(&config.http_addrs(), config.grpc_addr()).await?)
}

fn dapr_options(c: &Config) -> virtufin_store_dapr::DaprOptions {
    let mut o = virtufin_store_dapr::DaprOptions::new(c.dapr_grpc_port, c.dapr_http_port);
    o.host = c.dapr_host.clone();
    o.state_store = c.state_store_name.clone();
    o.pubsub = c.pubsub_name.clone();
    o.retry_delay = c.retry_delay;
    o.max_in_flight = c.max_in_flight;
    o
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
    let valkey_password = match config.backend_kind() {
        BackendKind::Valkey => (
            config.valkey_password().map_err(RunError::Config)?,
            config
                .valkey_sentinel_password()
                .map_err(RunError::Config)?,
        ),
        _ => (None, None),
    };
    let keys = SharedKeys::new(
        ApiKeys::load(api_keys_file(&config).as_deref())
            .map_err(|e| RunError::Config(e.to_string()))?,
    );
    if keys.current().enabled() {
        tracing::info!(keys = ?keys.current().names(), "API keys required (x-api-key)");
    } else {
        tracing::info!("no API key configured: auth is off");
    }
    let cors = cors_layer(&config.cors_origins);
    let gw = virtufin_gateway::Gateway::new(config.services_config.clone());
    let notifier = Notifier;
    let health = Health::new();
    let kind = config.backend_kind();
    let backend_desc = match kind {
        BackendKind::Memory => "the embedded memory backend".to_owned(),
        BackendKind::Valkey => format!("Valkey at {}", config.valkey_url.as_deref().unwrap_or("?")),
        BackendKind::Dapr => dapr_options(&config).describe(),
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
        metrics: metrics::ApiMetrics::new(),
    });

    let tasks = tokio_util::task::TaskTracker::new();
    tasks.spawn(notifier.follow(health.clone(), "virtufin-api", shutdown.clone()));
    // SIGHUP (systemctl reload): the log filter, the API keys and the
    // Gateway's services file, each kept as it was when its new one is bad.
    let mut parts = virtufin_common::reload::common_parts();
    parts.push(reload_keys_part(config.clone(), keys.clone()));
    {
        let gw = gw.clone();
        parts.push(virtufin_common::reload::Part::new(
            "services file",
            move || match gw.path().map(|p| p.display().to_string()) {
                None => Ok("no services file configured".to_owned()),
                Some(path) => match gw.reload() {
                    Ok(true) => Ok(format!("services file {path}: {:?}", gw.service_names())),
                    Ok(false) => Ok(format!("services file {path} unchanged")),
                    Err(e) => Err(e.to_string()),
                },
            },
        ));
    }
    tasks.spawn(
        virtufin_common::reload::on_sighup("virtufin-api", parts, health.clone(), shutdown.clone())
            .map_err(|e| RunError::Config(format!("cannot install the SIGHUP handler: {e}")))?,
    );

    // gRPC
    let (reporter, std_health) = tonic_health::server::health_reporter();
    tasks.spawn(virtufin_common::grpc_health::follow(
        reporter,
        health.clone(),
        grpc_health::SERVICES,
        shutdown.clone(),
    ));
    let state_api = state::StateApi::new(app.clone());
    let gateway_api = gateway::GatewayApi {
        gateway: gw.clone(),
    };
    let auth = GrpcAuth(keys.clone());
    // Health stays open (supervisors and the downstream handshake probe it
    // without a key); everything else is behind the key check.
    let grpc = virtufin_common::serve::grpc_server()
        // HTTP/1.1 for gRPC-Web: browsers cannot speak gRPC over HTTP/2.
        .accept_http1(true)
        .layer(match cors.clone() {
            Some(c) => tower::util::Either::Left(c),
            None => tower::util::Either::Right(tower::layer::util::Identity::new()),
        })
        .layer(tonic_web::GrpcWebLayer::new())
        // Inside gRPC-Web's translation: it sees every call as gRPC, its
        // status in the trailers.
        .layer(app.metrics.base.grpc_layer())
        .add_service(std_health)
        .add_service(HealthServer::new(grpc_health::ApiHealth {
            app: app.clone(),
        }))
        .add_service(InterceptedService::new(
            StateServer::new(state::StateService(state_api.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            auth.clone(),
        ))
        .add_service(InterceptedService::new(
            PubsubServer::new(pubsub::PubsubService { app: app.clone() })
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            auth.clone(),
        ))
        .add_service(InterceptedService::new(
            GatewayServer::new(gateway::GatewayService(gateway_api.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            auth.clone(),
        ));
    let grpc = virtufin_common::serve::with_reflection_behind(
        grpc,
        &[virtufin_proto::API_DESCRIPTOR_SET],
        auth,
    )?;
    let servers = virtufin_common::serve::start(
        grpc,
        listeners.grpc,
        http::router(app.clone(), state_api, gateway_api, keys.clone(), cors),
        listeners.http,
        listeners.activated.then(|| health.clone()),
        &shutdown,
    );
    if config.services_config.is_some() {
        let (gw2, s) = (gw.clone(), shutdown.clone());
        tasks.spawn(gw2.watch(config.services_reload_interval, s.cancelled_owned()));
    }
    tasks.spawn(gateway::follow_health(
        gw.clone(),
        health.clone(),
        shutdown.clone(),
    ));
    tracing::info!(backend = %app.backend_desc, "serving");

    // Backend: connect (retrying until it answers), then keep probing it.
    tasks.spawn(connect_and_probe(
        app.clone(),
        config.clone(),
        valkey_password,
        store_check,
        broker_check,
    ));

    shutdown.cancelled().await;
    Notifier.stopping();
    tracing::info!("draining");
    let result = servers
        .drain(config.drain_timeout)
        .await
        .map_err(RunError::from);
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(1), tasks.wait()).await;
    tracing::info!("stopped");
    result
}

/// Where the API keys come from: the configured file, else the systemd
/// credential named "api-keys" (re-evaluated on every reload).
fn api_keys_file(config: &Config) -> Option<std::path::PathBuf> {
    config
        .api_keys_file
        .clone()
        .or_else(|| virtufin_common::config::credential("api-keys"))
}

/// The reload of the API keys: the same loader as at start; a file that
/// does not load, or that would turn auth off while keys are in force (an
/// emptied file), is refused and the keys in force stay.
fn reload_keys_part(config: Config, keys: SharedKeys) -> virtufin_common::reload::Part {
    virtufin_common::reload::Part::new("API keys", move || {
        let file = api_keys_file(&config);
        let shown = file
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "the environment".to_owned());
        let new = ApiKeys::load(file.as_deref()).map_err(|e| e.to_string())?;
        if keys.current().enabled() && !new.enabled() {
            return Err(format!(
                "{shown} now has no key, which would turn authentication off; \
                 restart the api to run without keys deliberately"
            ));
        }
        let names: Vec<String> = new.names().into_iter().map(str::to_owned).collect();
        keys.replace(new);
        Ok(format!("API keys from {shown}: {names:?}"))
    })
}

/// CORS for browsers, off unless origins are configured ("*" = any).
fn cors_layer(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let origins: Vec<&String> = origins.iter().filter(|o| !o.is_empty()).collect();
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| *o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| o.parse().ok()))
    };
    let h = |s: &'static str| axum::http::HeaderName::from_static(s);
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([
                axum::http::Method::GET,
                axum::http::Method::POST,
                axum::http::Method::DELETE,
                axum::http::Method::OPTIONS,
            ])
            .allow_headers([
                h("content-type"),
                h("x-api-key"),
                h("x-grpc-web"),
                h("x-user-agent"),
                h("grpc-timeout"),
            ])
            .expose_headers([
                h("grpc-status"),
                h("grpc-message"),
                h("grpc-status-details-bin"),
            ])
            .max_age(Duration::from_secs(600)),
    )
}

async fn connect_and_probe(
    app: Arc<App>,
    config: Config,
    valkey_password: (Option<String>, Option<String>),
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
                o.password.clone_from(&valkey_password.0);
                o.sentinel_password.clone_from(&valkey_password.1);
                o.min_replicas = config.valkey_min_replicas;
                o.wait_timeout = config.valkey_wait_timeout;
                o.stream_max_len = config.stream_max_len;
                valkey::connect(o, delivery.clone()).await
            }
            BackendKind::Dapr => virtufin_store_dapr::connect(dapr_options(&config)).await,
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
