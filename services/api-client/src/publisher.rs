//! An ordered publishing queue to the api's PublishEvents, for services
//! whose events must keep causal order (lifecycle events, forwarded
//! traffic): a burst becomes one round trip, and while the api is away the
//! queue waits and retries instead of dropping — its bound pushes back on
//! the producers.
//!
//! Trace context: each event is stamped with the producer's context (the
//! task's [`trace::current`], when there is one) as `ce-traceparent`
//! unless it names one already, so it keeps its trace through the batch.
//! A batch whose events all belong to one trace is sent with that
//! `traceparent` as the call's metadata; a mixed batch with none (the
//! api's span is then a root of its own, and each event still carries
//! its own trace).

use std::{collections::HashMap, time::Duration};

use crate::{ApiClient, ClientError, TraceContext, pb::PublishEventRequest, trace};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const BATCH: usize = 256;

/// Handle to the publishing queue.
#[derive(Debug, Clone)]
pub struct Publisher {
    tx: mpsc::Sender<PublishEventRequest>,
}

impl Publisher {
    /// Starts the queue's task. It ends when every handle is gone, or at
    /// `shutdown` after one last bounded attempt to publish what is queued.
    pub fn spawn(
        api: ApiClient,
        capacity: usize,
        shutdown: CancellationToken,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let task = tokio::spawn(run(api, rx, shutdown));
        (Self { tx }, task)
    }

    /// Queues one event; waits while the queue is full. The event carries
    /// the calling task's trace context (see the module's doc).
    pub async fn publish(&self, mut event: PublishEventRequest) {
        if let Some(ctx) = trace::current() {
            ctx.stamp(&mut event.metadata);
        }
        if self.tx.send(event).await.is_err() {
            tracing::warn!("publisher stopped; event dropped");
        }
    }
}

/// A CloudEvent with JSON data.
pub fn json_event(
    topic: &str,
    source: &str,
    event_type: &str,
    data: &Value,
) -> PublishEventRequest {
    let mut metadata = HashMap::new();
    metadata.insert("ce-type".to_owned(), event_type.to_owned());
    metadata.insert("ce-source".to_owned(), source.to_owned());
    metadata.insert(
        "ce-datacontenttype".to_owned(),
        "application/json".to_owned(),
    );
    PublishEventRequest {
        topic: topic.to_owned(),
        data: data.to_string(),
        metadata,
    }
}

async fn run(
    api: ApiClient,
    mut rx: mpsc::Receiver<PublishEventRequest>,
    shutdown: CancellationToken,
) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let first = tokio::select! {
            e = rx.recv() => e,
            // On shutdown, one last attempt for what is queued, then stop.
            _ = shutdown.cancelled() => {
                while let Ok(e) = rx.try_recv() {
                    batch.push(e);
                }
                if !batch.is_empty() {
                    let last = CancellationToken::new();
                    let t = last.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(2)).await;
                        t.cancel();
                    });
                    if !send(&api, &mut batch, &last).await {
                        tracing::warn!(dropped = batch.len(), "shutting down with the api unreachable; events dropped");
                    }
                }
                return;
            }
        };
        let Some(first) = first else { return };
        batch.push(first);
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
        if !send(&api, &mut batch, &shutdown).await {
            tracing::warn!(
                dropped = batch.len() + rx.len(),
                "shutting down with the api unreachable; events dropped"
            );
            return;
        }
    }
}

/// The trace every event of `batch` belongs to, if they share one: the
/// first event's context (the api's span for the call becomes its child).
fn batch_trace(batch: &[PublishEventRequest]) -> Option<TraceContext> {
    let of = |e: &PublishEventRequest| {
        let tp = e.metadata.get(trace::CE_TRACEPARENT)?;
        TraceContext::parse(tp, e.metadata.get(trace::CE_TRACESTATE).map(String::as_str)).ok()
    };
    let first = of(batch.first()?)?;
    batch[1..]
        .iter()
        .all(|e| of(e).is_some_and(|c| c.trace_id == first.trace_id))
        .then_some(first)
}

/// Publishes `batch` (emptying it), retrying while the api is away.
/// Returns false if shutdown came first.
async fn send(
    api: &ApiClient,
    batch: &mut Vec<PublishEventRequest>,
    shutdown: &CancellationToken,
) -> bool {
    let mut backoff = Duration::from_millis(100);
    let ctx = batch_trace(batch);
    loop {
        let attempt = api.publish_many(batch.clone());
        let result = match &ctx {
            Some(c) => trace::scope(c.clone(), attempt).await,
            None => attempt.await,
        };
        match result {
            Ok(_) => {
                batch.clear();
                return true;
            }
            Err(ClientError::Status(s)) if s.code() == tonic::Code::InvalidArgument => {
                // Retrying cannot help the bad one: publish one by one and
                // drop what the api refuses.
                for e in batch.drain(..) {
                    if let Err(err) = api.publish_many(vec![e.clone()]).await {
                        tracing::error!(topic = %e.topic, error = %err, "event refused by the api; dropped");
                    }
                }
                return true;
            }
            Err(e) => {
                tracing::warn!(error = %e, pending = batch.len(), retry_in = ?backoff, "cannot publish; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return false,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ev(tp: Option<&str>) -> PublishEventRequest {
        let mut e = json_event("t", "s", "ty", &Value::Null);
        if let Some(tp) = tp {
            e.metadata.insert(trace::CE_TRACEPARENT.into(), tp.into());
        }
        e
    }

    #[test]
    fn a_batch_has_a_trace_only_when_all_its_events_share_it() {
        let a = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let a2 = "00-0af7651916cd43dd8448eb211c80319c-1111111111111111-01";
        let b = "00-1af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let t = batch_trace(&[ev(Some(a)), ev(Some(a2))]).unwrap();
        assert_eq!(t.to_header(), a);
        assert!(batch_trace(&[ev(Some(a)), ev(Some(b))]).is_none());
        assert!(batch_trace(&[ev(Some(a)), ev(None)]).is_none());
        assert!(batch_trace(&[ev(Some("bad"))]).is_none());
        assert!(batch_trace(&[]).is_none());
    }

    #[tokio::test]
    async fn events_are_stamped_with_the_producers_trace() {
        let (tx, mut rx) = mpsc::channel(4);
        let p = Publisher { tx };
        let ctx = TraceContext::new_root();
        trace::scope(ctx.clone(), p.publish(ev(None))).await;
        let e = rx.recv().await.unwrap();
        assert_eq!(
            e.metadata.get(trace::CE_TRACEPARENT),
            Some(&ctx.to_header())
        );
        p.publish(ev(None)).await;
        let e = rx.recv().await.unwrap();
        assert!(
            !e.metadata.contains_key(trace::CE_TRACEPARENT),
            "no trace, none stamped"
        );
    }
}
