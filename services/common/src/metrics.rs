//! Operational metrics: `GET /metrics` on each service's HTTP port, in the
//! OpenMetrics text format (what Prometheus scrapes natively; the format
//! that succeeded Prometheus' own text format and reads the same), from
//! the Prometheus project's own Rust client (`prometheus-client`).
//!
//! What every service exports: per-RPC request counts by gRPC status code
//! and latency histograms, the same for the HTTP routes, readiness and
//! build info. Each service registers its own families on top
//! ([`Metrics::register`]).
//!
//! Label cardinality is bounded: every label whose values come from
//! outside (an RPC path a client sent, a topic, a group, a worker id) goes
//! through a [`Bounded`] set that keeps the first [`MAX_LABEL_VALUES`]
//! distinct values and folds every later one into [`OTHER`], so a client
//! sending random names cannot grow a service's memory or a scrape
//! without limit.

use std::{
    collections::HashSet,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll},
    time::Instant,
};

use axum::{
    Router,
    extract::{MatchedPath, Request, State},
    http::{StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
    routing::get,
};
use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
        info::Info,
    },
    registry::{Metric, Registry},
};

use crate::Health;

/// Label pairs of one series.
pub type Labels = Vec<(&'static str, String)>;
/// A family of counters.
pub type Counters = Family<Labels, Counter>;
/// A family of gauges.
pub type Gauges = Family<Labels, Gauge>;
/// A family of latency histograms (seconds, [`latency_histogram`] buckets).
pub type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

/// Most distinct values one bounded label takes before later ones are
/// folded into [`OTHER`].
pub const MAX_LABEL_VALUES: usize = 200;
/// The value every label value beyond the bound becomes.
pub const OTHER: &str = "_other";

/// The `Content-Type` of `/metrics`.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Latency buckets, in seconds: 0.5 ms to ~16 s, doubling.
pub fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// A new family of latency histograms.
pub fn histograms() -> Histograms {
    Family::new_with_constructor(latency_histogram)
}

/// A label whose values come from outside: the first
/// [`MAX_LABEL_VALUES`] distinct values are kept, later ones become
/// [`OTHER`].
#[derive(Debug)]
pub struct Bounded {
    seen: Mutex<HashSet<String>>,
    max: usize,
}

impl Default for Bounded {
    fn default() -> Self {
        Self::new(MAX_LABEL_VALUES)
    }
}

impl Bounded {
    pub fn new(max: usize) -> Self {
        Self {
            seen: Mutex::new(HashSet::new()),
            max,
        }
    }

    /// `value` itself while there is room (or it was seen before), else
    /// [`OTHER`].
    pub fn label(&self, value: &str) -> String {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.contains(value) {
            return value.to_owned();
        }
        if seen.len() < self.max {
            seen.insert(value.to_owned());
            return value.to_owned();
        }
        OTHER.to_owned()
    }
}

type Refresh = Box<dyn Fn() + Send + Sync>;

/// One service's metrics: its registry and the families every service has.
pub struct Metrics {
    registry: Mutex<Registry>,
    /// Run before each scrape: gauges read from state kept elsewhere.
    refresh: Mutex<Vec<Refresh>>,
    ready: Gauge,
    rpc_requests: Counters,
    rpc_duration: Histograms,
    rpc_names: Bounded,
    http_requests: Counters,
    http_duration: Histograms,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// The registry of `service` (e.g. `virtufin-api`): every name starts
    /// with `virtufin_`.
    pub fn new(service: &str, version: &str) -> Arc<Self> {
        let mut r = Registry::with_prefix("virtufin");
        r.register(
            "build",
            "The service and its version",
            Info::new(vec![
                ("service", service.to_owned()),
                ("version", version.to_owned()),
            ]),
        );
        let ready = Gauge::default();
        r.register(
            "ready",
            "1 when the service is ready (every readiness check passes), else 0",
            ready.clone(),
        );
        let rpc_requests = Counters::default();
        r.register(
            "grpc_requests",
            "gRPC calls answered, by method (rpc) and gRPC status code",
            rpc_requests.clone(),
        );
        let rpc_duration = histograms();
        r.register(
            "grpc_request_duration_seconds",
            "gRPC call latency by method: until the last message and status (a stream's whole life)",
            rpc_duration.clone(),
        );
        let http_requests = Counters::default();
        r.register(
            "http_requests",
            "HTTP requests answered, by route, method and status",
            http_requests.clone(),
        );
        let http_duration = histograms();
        r.register(
            "http_request_duration_seconds",
            "HTTP request latency by route, until the response head",
            http_duration.clone(),
        );
        Arc::new(Self {
            registry: Mutex::new(r),
            refresh: Mutex::new(Vec::new()),
            ready,
            rpc_requests,
            rpc_duration,
            rpc_names: Bounded::default(),
            http_requests,
            http_duration,
        })
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers one more metric (or family) under `virtufin_<name>`;
    /// keep a clone of it to update it.
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        self.registry().register(name, help, metric);
    }

    /// Runs `f` before every scrape (gauges whose value lives elsewhere).
    pub fn on_scrape(&self, f: impl Fn() + Send + Sync + 'static) {
        self.refresh
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Box::new(f));
    }

    /// The registry in the OpenMetrics text format.
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        for f in self
            .refresh
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            f();
        }
        let mut out = String::new();
        encode(&mut out, &self.registry())?;
        Ok(out)
    }

    /// One gRPC call finished: `rpc` is its path (`/pkg.Service/Method`).
    pub fn grpc_call(&self, rpc: &str, code: tonic::Code, seconds: f64) {
        let rpc = self.rpc_names.label(rpc.trim_start_matches('/'));
        self.rpc_requests
            .get_or_create(&vec![("rpc", rpc.clone()), ("code", code_name(code))])
            .inc();
        self.rpc_duration
            .get_or_create(&vec![("rpc", rpc)])
            .observe(seconds);
    }

    /// `GET /metrics`, open like `/health` (Prometheus sends no API key);
    /// readiness is read from `health` at each scrape.
    pub fn router(self: &Arc<Self>, health: Health) -> Router {
        let m = self.clone();
        let ready = m.ready.clone();
        m.on_scrape(move || {
            ready.set(i64::from(health.is_ready()));
        });
        Router::new().route("/metrics", get(scrape)).with_state(m)
    }

    /// A tower layer for the gRPC server that counts and times every call.
    pub fn grpc_layer(self: &Arc<Self>) -> GrpcMetricsLayer {
        GrpcMetricsLayer(self.clone())
    }

    /// An axum middleware (`axum::middleware::from_fn_with_state`) that
    /// counts and times every HTTP request by its route pattern (never the
    /// raw path: bounded), `/metrics` itself included.
    pub async fn http_middleware(State(m): State<Arc<Self>>, req: Request, next: Next) -> Response {
        let route = req
            .extensions()
            .get::<MatchedPath>()
            .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
        let method = req.method().as_str().to_owned();
        let start = Instant::now();
        let res = next.run(req).await;
        let seconds = start.elapsed().as_secs_f64();
        m.http_requests
            .get_or_create(&vec![
                ("route", route.clone()),
                ("method", method),
                ("status", res.status().as_u16().to_string()),
            ])
            .inc();
        m.http_duration
            .get_or_create(&vec![("route", route)])
            .observe(seconds);
        res
    }

    /// Wraps `router` so that its requests are counted (see
    /// [`Self::http_middleware`]) and adds `/metrics`.
    pub fn instrument(self: &Arc<Self>, router: Router, health: Health) -> Router {
        router
            .merge(self.router(health))
            .layer(axum::middleware::from_fn_with_state(
                self.clone(),
                Self::http_middleware,
            ))
    }
}

async fn scrape(State(m): State<Arc<Metrics>>) -> Response {
    match m.render() {
        Ok(text) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot encode the metrics");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot encode the metrics: {e}"),
            )
                .into_response()
        }
    }
}

/// The gRPC status code as grpcurl and the gRPC docs spell it.
pub fn code_name(code: tonic::Code) -> String {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
    .to_owned()
}

/// See [`Metrics::grpc_layer`].
#[derive(Clone, Debug)]
pub struct GrpcMetricsLayer(Arc<Metrics>);

impl<S> tower_layer::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics {
            inner,
            metrics: self.0.clone(),
        }
    }
}

/// See [`Metrics::grpc_layer`].
#[derive(Clone, Debug)]
pub struct GrpcMetrics<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> tower_service::Service<http::Request<B>> for GrpcMetrics<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let call = Call {
            metrics: self.metrics.clone(),
            rpc: req.uri().path().to_owned(),
            start: Instant::now(),
            done: false,
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut call = call;
            let res = fut.await?;
            // A trailers-only answer (most errors) has its status in the
            // head; otherwise it comes in the trailers, at the body's end.
            if let Some(code) = status_in(res.headers()) {
                call.finish(code);
                return Ok(res);
            }
            let (parts, body) = res.into_parts();
            Ok(http::Response::from_parts(
                parts,
                tonic::body::Body::new(Observed { inner: body, call }),
            ))
        })
    }
}

fn status_in(h: &http::HeaderMap) -> Option<tonic::Code> {
    let v = h.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
    Some(tonic::Code::from_i32(v))
}

/// One call being measured: recorded once, when its status is known, or
/// as CANCELLED when the client went away before it.
struct Call {
    metrics: Arc<Metrics>,
    rpc: String,
    start: Instant,
    done: bool,
}

impl Call {
    fn finish(&mut self, code: tonic::Code) {
        if !self.done {
            self.done = true;
            self.metrics
                .grpc_call(&self.rpc, code, self.start.elapsed().as_secs_f64());
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.finish(tonic::Code::Cancelled);
    }
}

/// A response body that records its call when the trailers pass.
struct Observed {
    inner: tonic::body::Body,
    call: Call,
}

impl http_body::Body for Observed {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(status_in) {
                    this.call.finish(code);
                }
            }
            Poll::Ready(Some(Err(s))) => this.call.finish(s.code()),
            // Ended without trailers: not a proper gRPC answer.
            Poll::Ready(None) => this.call.finish(tonic::Code::Unknown),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_folds_values_beyond_the_bound() {
        let b = Bounded::new(2);
        assert_eq!(b.label("a"), "a");
        assert_eq!(b.label("b"), "b");
        assert_eq!(b.label("c"), OTHER);
        assert_eq!(b.label("a"), "a", "a value seen before stays itself");
    }

    #[test]
    fn render_has_build_info_rpc_counts_and_histograms() {
        let m = Metrics::new("virtufin-test", "1.2.3");
        m.grpc_call("/virtufin.api.v1.State/GetState", tonic::Code::Ok, 0.002);
        m.grpc_call(
            "/virtufin.api.v1.State/GetState",
            tonic::Code::NotFound,
            0.001,
        );
        let text = m.render().unwrap_or_default();
        assert!(
            text.contains(r#"virtufin_build_info{service="virtufin-test",version="1.2.3"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"virtufin_grpc_requests_total{rpc="virtufin.api.v1.State/GetState",code="NOT_FOUND"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"virtufin_grpc_request_duration_seconds_count{rpc="virtufin.api.v1.State/GetState"} 2"#
            ),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
