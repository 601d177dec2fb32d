//! One configured backend: its channel, its learnt methods and its
//! circuit breaker, and calls to it with deadline and retries.

use std::{
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use prost_reflect::{DynamicMessage, MethodDescriptor};
use tonic::{
    Code, Status,
    client::Grpc,
    metadata::AsciiMetadataValue,
    transport::{Channel, Endpoint},
};

use crate::{
    Tags,
    breaker::Breaker,
    catalog::{Catalog, DiscoverError},
    codec::DynamicCodec,
    config::ServiceConfig,
};

/// A catalog younger than this is not re-learnt when a method is missing
/// (so a stream of calls to a wrong name does not hammer reflection).
const REFRESH_AFTER: Duration = Duration::from_secs(5);

/// The header that tells a backend who called through the Gateway (the
/// same name as `virtufin_common::audit::CALLER_HEADER`).
pub const CALLER_HEADER: &str = "x-virtufin-caller";
/// The header carrying the call's correlation id.
pub const CORRELATION_HEADER: &str = "x-correlation-id";

#[derive(Debug)]
pub struct Backend {
    pub config: ServiceConfig,
    channel: Option<Channel>,
    /// The learnt methods, read on every call (a plain lock, held for a
    /// clone); `discovery` serialises learning them, so concurrent first
    /// calls ask reflection once.
    catalog: RwLock<Option<(Arc<Catalog>, Instant)>>,
    discovery: tokio::sync::Mutex<()>,
    pub breaker: Breaker,
}

/// Codes that say the backend itself is in trouble (they count against
/// its circuit); anything else is the backend answering normally.
fn is_backend_failure(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::DeadlineExceeded | Code::Internal | Code::Unknown
    )
}

/// Codes worth another attempt of a call that is safe to repeat.
fn is_retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::DeadlineExceeded | Code::Aborted | Code::ResourceExhausted
    )
}

impl Backend {
    pub fn new(config: ServiceConfig) -> Self {
        let channel = config.grpc.as_ref().and_then(|g| {
            let host = if g.host.contains(':') && !g.host.starts_with('[') {
                format!("[{}]", g.host)
            } else {
                g.host.clone()
            };
            Endpoint::from_shared(format!("http://{host}:{}", g.port))
                .ok()
                .map(|e| {
                    e.connect_timeout(Duration::from_secs(3))
                        .tcp_nodelay(true)
                        .http2_keep_alive_interval(Duration::from_secs(20))
                        .keep_alive_timeout(Duration::from_secs(20))
                        .connect_lazy()
                })
        });
        let breaker = Breaker::new(
            config.resilience.breaker_failures,
            config.resilience.cooldown(),
        );
        Self {
            config,
            channel,
            catalog: RwLock::new(None),
            discovery: tokio::sync::Mutex::new(()),
            breaker,
        }
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    fn channel(&self) -> Result<Channel, Status> {
        let name = self.name();
        let Some(grpc) = &self.config.grpc else {
            return Err(Status::failed_precondition(format!(
                "service '{name}' has no grpc section in the services file, so the gateway cannot call it"
            )));
        };
        if !grpc.reflection_enabled {
            return Err(Status::failed_precondition(format!(
                "service '{name}' has reflectionEnabled: false in the services file; the gateway learns methods by gRPC reflection and cannot call it"
            )));
        }
        self.channel.clone().ok_or_else(|| {
            Status::failed_precondition(format!(
                "service '{name}': {}:{} is not a usable address",
                grpc.host, grpc.port
            ))
        })
    }

    fn learnt(&self) -> Option<(Arc<Catalog>, Instant)> {
        self.catalog
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The catalog learnt before, if any (no network).
    pub fn cached(&self) -> Option<Arc<Catalog>> {
        self.learnt().map(|(c, _)| c)
    }

    /// The backend's methods; learnt on first use, again when `refresh`
    /// and the last answer is older than a few seconds.
    pub async fn catalog(&self, refresh: bool) -> Result<Arc<Catalog>, Status> {
        let channel = self.channel()?;
        let fresh = |l: &Option<(Arc<Catalog>, Instant)>| {
            l.as_ref()
                .filter(|(_, at)| !refresh || at.elapsed() < REFRESH_AFTER)
                .map(|(c, _)| c.clone())
        };
        if let Some(c) = fresh(&self.learnt()) {
            return Ok(c);
        }
        let _one_at_a_time = self.discovery.lock().await;
        // Another call may have learnt it while this one waited.
        if let Some(c) = fresh(&self.learnt()) {
            return Ok(c);
        }
        self.admit()?;
        let name = self.name().to_owned();
        match Catalog::discover(channel, self.config.resilience.timeout()).await {
            Ok(c) => {
                self.breaker.success();
                let c = Arc::new(c);
                *self.catalog.write().unwrap_or_else(|p| p.into_inner()) =
                    Some((c.clone(), Instant::now()));
                Ok(c)
            }
            Err(DiscoverError::NoReflection(why)) => {
                // It answered, so it is up: not a circuit failure.
                self.breaker.success();
                Err(Status::failed_precondition(format!(
                    "service '{name}' does not serve gRPC reflection (v1 or v1alpha), which the gateway needs to call it: {why}"
                )))
            }
            Err(DiscoverError::Unreachable(s)) => {
                let msg = format!("service '{name}' is unreachable: {}", s.message());
                self.breaker.failure(&msg);
                Err(Status::new(s.code(), msg))
            }
            Err(e @ DiscoverError::Bad(_)) => {
                self.breaker.neutral();
                Err(Status::internal(format!("service '{name}': {e}")))
            }
        }
    }

    /// Forgets the learnt methods (the backend changed under us).
    pub fn forget(&self) {
        *self.catalog.write().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn admit(&self) -> Result<(), Status> {
        self.breaker.admit().map_err(|r| {
            Status::unavailable(format!(
                "the circuit to service '{}' is open after {} failure(s) (last: {}); next attempt in {:.1}s",
                self.name(),
                r.failures,
                r.last_error,
                r.retry_in.as_secs_f64()
            ))
        })
    }

    /// Whether `method` may be attempted more than once.
    pub fn safe_to_retry(&self, method: &MethodDescriptor) -> bool {
        let idempotent = method
            .method_descriptor_proto()
            .options
            .as_ref()
            .and_then(|o| o.idempotency_level)
            .is_some_and(|l| l == 1 || l == 2); // NO_SIDE_EFFECTS, IDEMPOTENT
        idempotent
            || self
                .config
                .resilience
                .listed_safe(method.parent_service().full_name(), method.name())
    }

    fn request<T>(&self, msg: T, timeout: Option<Duration>, tags: Tags<'_>) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Some(t) = timeout {
            req.set_timeout(t);
        }
        for (header, value) in [
            (CALLER_HEADER, tags.caller),
            (CORRELATION_HEADER, tags.correlation_id),
        ] {
            if let Some(v) = value.and_then(|c| c.parse::<AsciiMetadataValue>().ok()) {
                req.metadata_mut().insert(header, v);
            }
        }
        // The api's span for the call being served: the backend's span
        // becomes its child.
        if let Some(ctx) = virtufin_common::trace::current() {
            ctx.inject(req.metadata_mut());
        }
        req
    }

    fn record(&self, result: &Result<(), Status>) {
        match result {
            Ok(()) => self.breaker.success(),
            Err(s) if is_backend_failure(s.code()) => {
                self.breaker.failure(s.message());
            }
            Err(_) => self.breaker.success(),
        }
    }

    /// A unary call with the backend's deadline and, when the method is safe
    /// to repeat, retries with exponential backoff.
    pub async fn unary(
        &self,
        method: &MethodDescriptor,
        msg: DynamicMessage,
        timeout: Duration,
        tags: Tags<'_>,
    ) -> Result<DynamicMessage, Status> {
        let channel = self.channel()?;
        let path = method_path(method)?;
        let r = &self.config.resilience;
        let attempts = if self.safe_to_retry(method) {
            r.retries + 1
        } else {
            1
        };
        let mut backoff = r.backoff();
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.admit()?;
            let mut grpc = Grpc::new(channel.clone());
            let call = async {
                grpc.ready()
                    .await
                    .map_err(|e| Status::unavailable(format!("connecting: {e}")))?;
                grpc.unary(
                    self.request(msg.clone(), Some(timeout), tags),
                    path.clone(),
                    DynamicCodec::new(method.output()),
                )
                .await
            };
            let result = match tokio::time::timeout(timeout, call).await {
                Ok(r) => r,
                Err(_) => Err(Status::deadline_exceeded(format!(
                    "no answer within {timeout:?}"
                ))),
            };
            self.record(&result.as_ref().map(|_| ()).map_err(Clone::clone));
            match result {
                Ok(resp) => return Ok(resp.into_inner()),
                Err(s) if attempt < attempts && is_retryable(s.code()) => {
                    tracing::debug!(service = %self.name(), method = %method.name(), attempt, error = %s.message(), "retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = backoff.saturating_mul(2);
                }
                Err(s) => {
                    if s.code() == Code::Unimplemented {
                        self.forget();
                    }
                    return Err(s);
                }
            }
        }
    }

    /// Opens a server-streaming call (no retries: messages may already have
    /// been delivered); `timeout` bounds the whole stream when given.
    pub async fn server_streaming(
        &self,
        method: &MethodDescriptor,
        msg: DynamicMessage,
        timeout: Option<Duration>,
        tags: Tags<'_>,
    ) -> Result<tonic::Streaming<DynamicMessage>, Status> {
        let channel = self.channel()?;
        let path = method_path(method)?;
        self.admit()?;
        let mut grpc = Grpc::new(channel);
        let open_timeout = timeout.unwrap_or(self.config.resilience.timeout());
        let call = async {
            grpc.ready()
                .await
                .map_err(|e| Status::unavailable(format!("connecting: {e}")))?;
            grpc.server_streaming(
                self.request(msg, timeout, tags),
                path,
                DynamicCodec::new(method.output()),
            )
            .await
        };
        let result = match tokio::time::timeout(open_timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(Status::deadline_exceeded(format!(
                "the stream did not open within {open_timeout:?}"
            ))),
        };
        self.record(&result.as_ref().map(|_| ()).map_err(Clone::clone));
        Ok(result?.into_inner())
    }
}

fn method_path(m: &MethodDescriptor) -> Result<http::uri::PathAndQuery, Status> {
    format!("/{}/{}", m.parent_service().full_name(), m.name())
        .parse()
        .map_err(|_| Status::internal(format!("method name {} is not a usable path", m.name())))
}
