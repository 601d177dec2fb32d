//! The tower layer that puts every gRPC and HTTP call in its trace: it
//! reads `traceparent`/`tracestate` from the request's headers (gRPC
//! metadata are headers), makes this service's span a child of the
//! caller's (or starts a new trace), puts the [`TraceContext`] in the
//! request's extensions for the handler, makes it the task's
//! [`current`](crate::trace::current) context (so the calls the handler
//! makes carry it on), and runs the call in a `tracing` span with the
//! fields `trace_id` and `span_id` — every log line of the call carries
//! them (`TRACE_ID=` in the journal).
//!
//! The same layer serves tonic (`Server::layer`) and axum (`Router::layer`).

use std::task::{Context, Poll};

use tracing::instrument::{Instrument, Instrumented};

use crate::trace::{self, TraceContext};

/// See the module's doc.
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceLayer;

impl<S> tower_layer::Layer<S> for TraceLayer {
    type Service = Traced<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Traced { inner }
    }
}

/// A service wrapped by [`TraceLayer`].
#[derive(Debug, Clone)]
pub struct Traced<S> {
    inner: S,
}

impl<S, B> tower_service::Service<http::Request<B>> for Traced<S>
where
    S: tower_service::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Instrumented<tokio::task::futures::TaskLocalFuture<TraceContext, S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let ctx = TraceContext::from_headers(req.headers());
        let span = tracing::info_span!(
            "call",
            path = %req.uri().path(),
            trace_id = %ctx.trace_id_hex(),
            span_id = %ctx.span_id_hex(),
        );
        req.extensions_mut().insert(ctx.clone());
        // The handler's synchronous part runs in the span and the scope too.
        let fut = {
            let _entered = span.enter();
            trace::sync_scope(ctx.clone(), || self.inner.call(req))
        };
        trace::scope(ctx, fut).instrument(span)
    }
}
