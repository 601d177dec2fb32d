//! An ordered publishing queue to the api's PublishEvents, for services
//! whose events must keep causal order (lifecycle events, forwarded
//! traffic): a burst becomes one round trip, and while the api is away the
//! queue waits and retries instead of dropping — its bound pushes back on
//! the producers.

use std::{collections::HashMap, time::Duration};

use crate::{ApiClient, ClientError, pb::PublishEventRequest};
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

    /// Queues one event; waits while the queue is full.
    pub async fn publish(&self, event: PublishEventRequest) {
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

/// Publishes `batch` (emptying it), retrying while the api is away.
/// Returns false if shutdown came first.
async fn send(
    api: &ApiClient,
    batch: &mut Vec<PublishEventRequest>,
    shutdown: &CancellationToken,
) -> bool {
    let mut backoff = Duration::from_millis(100);
    loop {
        match api.publish_many(batch.clone()).await {
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
