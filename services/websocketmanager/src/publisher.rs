//! Everything the websocketmanager publishes (lifecycle events and
//! forwarded frames) goes through one ordered queue to the api's
//! PublishEvents: causal order holds, a burst becomes one round trip, and
//! while the api is away the queue waits and retries instead of dropping —
//! its bound pushes back on the WebSocket readers (and so on the peers).

use std::{collections::HashMap, time::Duration};

use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use virtufin_api_client::{ApiClient, ClientError, pb::PublishEventRequest};

/// Lifecycle topic owned by the websocketmanager.
pub const STATUS_TOPIC: &str = "websocketmanager.connectionstatus";
/// CloudEvent source of everything the websocketmanager publishes.
pub const SOURCE: &str = "urn:com.virtufin.websocketmanager";
/// CloudEvent type of forwarded frames.
pub const MESSAGE_TYPE: &str = "com.virtufin.websocketmanager.message";

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

    /// A lifecycle event on `websocketmanager.connectionstatus`.
    pub async fn lifecycle(
        &self,
        kind: &str,
        connection_id: &str,
        url: &str,
        instance_id: &str,
        extra: Map<String, Value>,
    ) {
        let mut data = Map::new();
        data.insert("connection_id".into(), connection_id.into());
        data.insert("url".into(), url.into());
        data.insert("instance_id".into(), instance_id.into());
        data.extend(extra);
        let event = json_event(
            STATUS_TOPIC,
            &format!("com.virtufin.websocketmanager.connection.{kind}"),
            &Value::Object(data),
        );
        tracing::info!(connection = connection_id, event = kind, "lifecycle");
        self.publish(event).await;
    }
}

/// A CloudEvent with JSON data from the websocketmanager.
pub fn json_event(topic: &str, event_type: &str, data: &Value) -> PublishEventRequest {
    let mut metadata = HashMap::new();
    metadata.insert("ce-type".to_owned(), event_type.to_owned());
    metadata.insert("ce-source".to_owned(), SOURCE.to_owned());
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
