//! The storage of virtufin-api: per-key state with etags, and pub/sub over
//! durable consumer groups with acknowledgements.
//!
//! Two traits, [`StateStore`] and [`PubSub`], are what the api uses. The
//! embedded [`memory`] backend and the [`valkey`] backend implement the
//! stream primitives of [`Streams`]; one engine ([`StreamPubSub`]) turns
//! those into subscriptions, so both deliver with the same semantics. The
//! Valkey layout is Dapr's own (`state.redis` hashes, `pubsub.redis`
//! streams), so data written here is readable through a Dapr sidecar and
//! back.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;

pub mod content_type;
pub mod memory;
mod streams;
pub mod valkey;

#[cfg(feature = "conformance")]
pub mod conformance;

pub use streams::{StreamPubSub, StreamReader, Streams};

/// What can go wrong in a backend.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    /// The etag given does not match the stored one (or the key is gone).
    #[error("etag mismatch for key '{key}': the value changed since it was read")]
    EtagMismatch { key: String },
    /// The backend cannot be reached right now.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// The backend answered with something unexpected.
    #[error("backend error: {0}")]
    Backend(String),
    /// The request is valid but this backend cannot serve it as asked
    /// (the message says why and what to do instead).
    #[error("{0}")]
    Unsupported(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A stored value and its etag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub value: String,
    pub etag: String,
}

/// The etag that asks a write to create the key only: versions start at
/// 1, so version "0" is the key before it exists.
pub const CREATE_ONLY: &str = "0";

/// Key/value state with optimistic concurrency.
#[async_trait]
pub trait StateStore: Send + Sync + 'static {
    async fn get(&self, key: &str) -> Result<Option<Versioned>>;
    /// Reads many keys at once; `None` where a key holds nothing.
    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Versioned>>>;
    /// Writes `value`. With `etag`, only if the stored etag still equals it
    /// (a missing key never matches), or, with [`CREATE_ONLY`], only if the
    /// key does not exist. Returns the new etag.
    async fn set(&self, key: &str, value: &str, etag: Option<&str>) -> Result<String>;
    /// Deletes the key. With `etag`, only if it still matches. Returns
    /// whether something was deleted.
    async fn delete(&self, key: &str, etag: Option<&str>) -> Result<bool>;
    /// Adds members to the set at `key` (created on first use); returns
    /// how many were new. Sets live beside the state, under keys of their
    /// own: `get`/`set` do not read them.
    async fn set_add(&self, key: &str, members: &[String]) -> Result<usize>;
    /// The members of the set at `key` (empty when it does not exist).
    async fn set_members(&self, key: &str) -> Result<Vec<String>>;
    /// Cheap round trip that proves the backend answers.
    async fn ping(&self) -> Result<()>;
}

/// One event as delivered to a subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The broker's id of the entry (a stream id on Valkey).
    pub entry_id: String,
    /// The stored bytes: a CloudEvent in JSON on every backend.
    pub data: Bytes,
    /// 1 on the first delivery, more on redeliveries.
    pub attempt: u32,
}

/// How a subscriber settles one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Handled: not delivered again.
    Success,
    /// Deliver again after the retry delay.
    Retry,
    /// Cannot be handled: discarded.
    Drop,
}

/// Who subscribes to what.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SubscriptionSpec {
    pub topic: String,
    pub group: String,
    pub subscriber: String,
}

/// Delivery tuning shared by every subscription of a backend.
#[derive(Debug, Clone)]
pub struct DeliveryOptions {
    /// An entry left unacknowledged this long is delivered again (to any
    /// member of its group). Dapr's default is 60 s.
    pub processing_timeout: Duration,
    /// How often each subscription looks for such entries (Dapr: 15 s).
    pub reclaim_interval: Duration,
    /// Delay before an event settled with [`Outcome::Retry`] comes back.
    pub retry_delay: Duration,
    /// Most events handed out and not yet settled, per subscription.
    pub max_in_flight: usize,
    /// Longest a blocking read waits before it looks around again.
    pub read_block: Duration,
}

impl Default for DeliveryOptions {
    fn default() -> Self {
        Self {
            processing_timeout: Duration::from_secs(60),
            reclaim_interval: Duration::from_secs(15),
            retry_delay: Duration::from_secs(1),
            max_in_flight: 256,
            read_block: Duration::from_secs(2),
        }
    }
}

/// An open subscription. Dropping it (or [`Subscription::close`]) ends it;
/// events it received and did not settle are delivered again later.
#[derive(Debug)]
pub struct Subscription {
    rx: tokio::sync::mpsc::Receiver<Result<Delivery>>,
    acks: tokio::sync::mpsc::UnboundedSender<(String, Outcome)>,
    guard: tokio_util::sync::DropGuard,
    done: tokio::sync::watch::Receiver<bool>,
}

impl Subscription {
    /// The next delivery; `None` once the subscription has ended. An `Err`
    /// reports a backend failure; the subscription keeps trying after it.
    pub async fn next(&mut self) -> Option<Result<Delivery>> {
        self.rx.recv().await
    }

    /// Settles a delivery by its entry id.
    pub fn settle(&self, entry_id: &str, outcome: Outcome) {
        let _ = self.acks.send((entry_id.to_owned(), outcome));
    }

    /// A handle that can settle deliveries from another task.
    pub fn settler(&self) -> Settler {
        Settler(self.acks.clone())
    }

    /// Ends the subscription and waits until every settlement sent before
    /// has reached the broker, so a subscriber that closes and comes back
    /// sees nothing it already settled. (Dropping ends it too, without
    /// waiting.)
    pub async fn close(self) {
        let Self {
            guard, mut done, ..
        } = self;
        drop(guard);
        let _ = done.wait_for(|d| *d).await;
    }
}

/// The producing side of a [`Subscription`], for backends: deliveries go
/// out through `tx`, settlements come in through `acks`, `cancel` fires
/// when the subscriber leaves, and `finish` tells `close()` that every
/// settlement has reached the broker.
#[derive(Debug)]
pub struct SubscriptionFeed {
    pub tx: tokio::sync::mpsc::Sender<Result<Delivery>>,
    pub acks: tokio::sync::mpsc::UnboundedReceiver<(String, Outcome)>,
    pub cancel: tokio_util::sync::CancellationToken,
    done: tokio::sync::watch::Sender<bool>,
}

impl SubscriptionFeed {
    /// Marks the subscription finished (settlements flushed).
    pub fn finish(&self) {
        let _ = self.done.send(true);
    }
}

impl Subscription {
    /// A connected pair: the backend keeps the feed, the caller gets the
    /// subscription. `capacity` bounds deliveries not yet taken.
    pub fn channel(capacity: usize) -> (SubscriptionFeed, Subscription) {
        let (tx, rx) = tokio::sync::mpsc::channel(capacity.max(1));
        let (ack_tx, ack_rx) = tokio::sync::mpsc::unbounded_channel();
        let cancel = tokio_util::sync::CancellationToken::new();
        let (done_tx, done_rx) = tokio::sync::watch::channel(false);
        (
            SubscriptionFeed {
                tx,
                acks: ack_rx,
                cancel: cancel.clone(),
                done: done_tx,
            },
            Subscription {
                rx,
                acks: ack_tx,
                guard: cancel.drop_guard(),
                done: done_rx,
            },
        )
    }
}

/// Settles deliveries of one subscription from anywhere.
#[derive(Debug, Clone)]
pub struct Settler(tokio::sync::mpsc::UnboundedSender<(String, Outcome)>);

impl Settler {
    pub fn settle(&self, entry_id: &str, outcome: Outcome) {
        let _ = self.0.send((entry_id.to_owned(), outcome));
    }
}

/// Publish/subscribe over durable consumer groups.
#[async_trait]
pub trait PubSub: Send + Sync + 'static {
    /// Appends `data` (a CloudEvent in JSON) to `topic`; returns the entry id.
    async fn publish(&self, topic: &str, data: &[u8]) -> Result<String>;
    /// Appends several events in order, in one round trip where the
    /// backend allows; returns their entry ids.
    async fn publish_batch(&self, events: &[(String, Vec<u8>)]) -> Result<Vec<String>> {
        let mut ids = Vec::with_capacity(events.len());
        for (topic, data) in events {
            ids.push(self.publish(topic, data).await?);
        }
        Ok(ids)
    }
    /// Joins `spec.group` as `spec.subscriber`. The group is created on
    /// first use and starts at the beginning of the topic's retained history.
    async fn subscribe(&self, spec: SubscriptionSpec) -> Result<Subscription>;
    /// Cheap round trip that proves the broker answers.
    async fn ping(&self) -> Result<()>;
}

/// A complete backend: state and pub/sub, with a name for health reports.
#[derive(Clone)]
pub struct Backend {
    pub kind: &'static str,
    pub state: Arc<dyn StateStore>,
    pub pubsub: Arc<dyn PubSub>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend").field("kind", &self.kind).finish()
    }
}
