//! Subscriptions built on stream primitives (Valkey streams and their
//! in-memory twin): consumer groups, a pending list per group, explicit
//! acknowledgement, redelivery of what stays pending too long.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::{sync::CancellationToken, time::DelayQueue};

use crate::{
    Delivery, DeliveryOptions, Outcome, PubSub, Result, StoreError, Subscription, SubscriptionSpec,
};

/// One stream entry: its id and its `data` field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: String,
    pub data: Bytes,
}

/// The stream operations a backend provides (Redis stream semantics).
#[async_trait]
pub trait Streams: Send + Sync + 'static {
    type Reader: StreamReader;
    /// `XADD topic MAXLEN ~ n * data <data>`.
    async fn add(&self, topic: &str, data: &[u8]) -> Result<String>;
    /// Several `add`s in order (pipelined where possible).
    async fn add_many(&self, events: &[(String, Vec<u8>)]) -> Result<Vec<String>> {
        let mut ids = Vec::with_capacity(events.len());
        for (topic, data) in events {
            ids.push(self.add(topic, data).await?);
        }
        Ok(ids)
    }
    /// `XGROUP CREATE topic group 0 MKSTREAM`, tolerating an existing group.
    async fn create_group(&self, topic: &str, group: &str) -> Result<()>;
    /// A reader for new entries, on its own connection (reads block).
    async fn reader(&self, topic: &str, group: &str, consumer: &str) -> Result<Self::Reader>;
    /// The entries already delivered to `consumer` and not acknowledged.
    async fn own_pending(
        &self,
        topic: &str,
        group: &str,
        consumer: &str,
        count: usize,
    ) -> Result<Vec<Entry>>;
    async fn ack(&self, topic: &str, group: &str, ids: &[String]) -> Result<()>;
    /// Takes over `ids` for `consumer` whatever their idle time (`XCLAIM … 0`).
    async fn claim(
        &self,
        topic: &str,
        group: &str,
        consumer: &str,
        ids: &[String],
    ) -> Result<Vec<Entry>>;
    /// Takes over entries pending longer than `min_idle` in the whole group
    /// (`XAUTOCLAIM`). Entries trimmed away meanwhile are dropped from the
    /// pending list.
    async fn autoclaim(
        &self,
        topic: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<Entry>>;
    /// Removes `consumer` from the group if it holds no pending entry.
    async fn forget_consumer(&self, topic: &str, group: &str, consumer: &str) -> Result<()>;
    async fn ping(&self) -> Result<()>;
}

/// Reads new entries for one consumer of one group.
#[async_trait]
pub trait StreamReader: Send + 'static {
    /// Up to `count` new entries, waiting at most `block` for the first.
    async fn read(&mut self, count: usize, block: Duration) -> Result<Vec<Entry>>;
}

/// [`PubSub`] over any [`Streams`].
pub struct StreamPubSub<S: Streams> {
    streams: Arc<S>,
    options: DeliveryOptions,
}

impl<S: Streams> StreamPubSub<S> {
    pub fn new(streams: Arc<S>, options: DeliveryOptions) -> Self {
        Self { streams, options }
    }
}

#[async_trait]
impl<S: Streams> PubSub for StreamPubSub<S> {
    async fn publish(&self, topic: &str, data: &[u8]) -> Result<String> {
        self.streams.add(topic, data).await
    }

    async fn publish_batch(&self, events: &[(String, Vec<u8>)]) -> Result<Vec<String>> {
        self.streams.add_many(events).await
    }

    async fn subscribe(&self, spec: SubscriptionSpec) -> Result<Subscription> {
        self.streams.create_group(&spec.topic, &spec.group).await?;
        let reader = self
            .streams
            .reader(&spec.topic, &spec.group, &spec.subscriber)
            .await?;
        let (feed, subscription) = Subscription::channel(self.options.max_in_flight.clamp(1, 64));
        let worker = Worker {
            streams: self.streams.clone(),
            options: self.options.clone(),
            spec,
            out: feed.tx.clone(),
            in_flight: HashMap::new(),
            permits: Arc::new(Semaphore::new(self.options.max_in_flight.max(1))),
            retries: DelayQueue::new(),
            cancel: feed.cancel.clone(),
        };
        // A span per subscription, attached to the task (not entered
        // across awaits).
        let span = tracing::debug_span!(
            "subscription",
            topic = %worker.spec.topic,
            group = %worker.spec.group,
            subscriber = %worker.spec.subscriber
        );
        tokio::spawn(tracing::Instrument::instrument(
            worker.run(reader, feed),
            span,
        ));
        Ok(subscription)
    }

    async fn ping(&self) -> Result<()> {
        self.streams.ping().await
    }
}

struct Worker<S: Streams> {
    streams: Arc<S>,
    options: DeliveryOptions,
    spec: SubscriptionSpec,
    out: mpsc::Sender<Result<Delivery>>,
    /// Entries handed out and not settled: id -> delivery count so far.
    in_flight: HashMap<String, u32>,
    /// One permit per entry that may be in flight; the reader takes them.
    permits: Arc<Semaphore>,
    retries: DelayQueue<String>,
    cancel: CancellationToken,
}

impl<S: Streams> Worker<S> {
    async fn run(mut self, reader: S::Reader, mut feed: crate::SubscriptionFeed) {
        let acks = &mut feed.acks;
        // A subscriber that comes back first gets what it left unsettled.
        match self
            .streams
            .own_pending(
                &self.spec.topic,
                &self.spec.group,
                &self.spec.subscriber,
                self.options.max_in_flight,
            )
            .await
        {
            Ok(entries) => {
                if !self.deliver(entries, true).await {
                    self.finish().await;
                    feed.finish();
                    return;
                }
            }
            Err(e) => {
                let _ = self.out.send(Err(e)).await;
            }
        }
        let (new_tx, mut new_rx) = mpsc::channel::<Result<Vec<Entry>>>(2);
        tokio::spawn(read_loop(
            reader,
            new_tx,
            self.permits.clone(),
            self.options.clone(),
            self.cancel.clone(),
        ));
        let mut reclaim = tokio::time::interval(self.options.reclaim_interval);
        reclaim.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                _ = self.out.closed() => break,
                batch = new_rx.recv() => match batch {
                    Some(Ok(entries)) => {
                        if !self.deliver(entries, false).await { break }
                    }
                    Some(Err(e)) => {
                        if self.out.send(Err(e)).await.is_err() { break }
                    }
                    None => break,
                },
                ack = acks.recv() => match ack {
                    Some((id, outcome)) => self.settle(id, outcome, acks).await,
                    None => break,
                },
                Some(expired) = futures_next(&mut self.retries) => {
                    let id = expired.into_inner();
                    match self.streams.claim(&self.spec.topic, &self.spec.group, &self.spec.subscriber, std::slice::from_ref(&id)).await {
                        Ok(entries) => {
                            if entries.is_empty() {
                                // Trimmed away or settled elsewhere.
                                self.release(&id);
                            } else if !self.deliver(entries, true).await { break }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "retry claim failed; will retry");
                            self.retries.insert(id, self.options.retry_delay);
                        }
                    }
                }
                _ = reclaim.tick() => {
                    match self.streams.autoclaim(
                        &self.spec.topic, &self.spec.group, &self.spec.subscriber,
                        self.options.processing_timeout, self.options.max_in_flight,
                    ).await {
                        Ok(entries) if !entries.is_empty() => {
                            tracing::info!(count = entries.len(), "redelivering events left unacknowledged");
                            if !self.deliver(entries, true).await { break }
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "reclaim failed"),
                    }
                }
            }
        }
        // Settlements sent just before the subscriber left still count.
        while let Ok((id, outcome)) = acks.try_recv() {
            self.settle(id, outcome, acks).await;
        }
        self.finish().await;
        feed.finish();
    }

    /// Hands entries to the subscriber. Returns false when it is gone.
    async fn deliver(&mut self, entries: Vec<Entry>, redelivery: bool) -> bool {
        for entry in entries {
            let attempt = match self.in_flight.get_mut(&entry.id) {
                Some(n) => {
                    *n += 1;
                    *n
                }
                None => {
                    // Entries from the reader already hold a permit; others
                    // take one if they can (never block on our own acks).
                    if redelivery {
                        match self.permits.clone().try_acquire_owned() {
                            Ok(p) => p.forget(),
                            Err(_) => tracing::debug!("redelivery above the in-flight limit"),
                        }
                    }
                    self.in_flight.insert(entry.id.clone(), 1);
                    if redelivery { 2 } else { 1 }
                }
            };
            let d = Delivery {
                entry_id: entry.id,
                data: entry.data,
                attempt,
            };
            if self.out.send(Ok(d)).await.is_err() {
                return false;
            }
        }
        true
    }

    async fn settle(
        &mut self,
        id: String,
        outcome: Outcome,
        more: &mut mpsc::UnboundedReceiver<(String, Outcome)>,
    ) {
        if !self.in_flight.contains_key(&id) {
            tracing::debug!(entry = %id, "settle for an entry not in flight; ignored");
            return;
        }
        match outcome {
            Outcome::Retry => {
                self.retries.insert(id, self.options.retry_delay);
            }
            Outcome::Success | Outcome::Drop => {
                if outcome == Outcome::Drop {
                    tracing::warn!(entry = %id, "subscriber dropped an event");
                }
                // Batch the acks that are already queued into one round trip.
                let mut ids = vec![id];
                while ids.len() < 512 {
                    match more.try_recv() {
                        Ok((i, Outcome::Success | Outcome::Drop))
                            if self.in_flight.contains_key(&i) =>
                        {
                            ids.push(i)
                        }
                        Ok((i, Outcome::Retry)) if self.in_flight.contains_key(&i) => {
                            self.retries.insert(i, self.options.retry_delay);
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                ids.sort();
                ids.dedup();
                if let Err(e) = self
                    .streams
                    .ack(&self.spec.topic, &self.spec.group, &ids)
                    .await
                {
                    // Left pending: redelivered after the processing timeout.
                    tracing::warn!(error = %e, "ack failed; the events will be redelivered");
                }
                for i in &ids {
                    self.release(i);
                }
            }
        }
    }

    fn release(&mut self, id: &str) {
        if self.in_flight.remove(id).is_some() {
            self.permits.add_permits(1);
        }
    }

    async fn finish(self) {
        self.cancel.cancel();
        if let Err(e) = self
            .streams
            .forget_consumer(&self.spec.topic, &self.spec.group, &self.spec.subscriber)
            .await
        {
            tracing::debug!(error = %e, "could not remove the consumer");
        }
    }
}

async fn futures_next(
    q: &mut DelayQueue<String>,
) -> Option<tokio_util::time::delay_queue::Expired<String>> {
    if q.is_empty() {
        std::future::pending().await
    } else {
        std::future::poll_fn(|cx| q.poll_expired(cx)).await
    }
}

/// Reads new entries as long as there are permits, and passes them on.
async fn read_loop<R: StreamReader>(
    mut reader: R,
    tx: mpsc::Sender<Result<Vec<Entry>>>,
    permits: Arc<Semaphore>,
    options: DeliveryOptions,
    cancel: CancellationToken,
) {
    let batch = options.max_in_flight.clamp(1, 128);
    let mut backoff = Duration::from_millis(50);
    let mut seen_error = HashSet::new();
    loop {
        let first = tokio::select! {
            _ = cancel.cancelled() => return,
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        first.forget();
        let mut taken = 1;
        while taken < batch {
            match permits.clone().try_acquire_owned() {
                Ok(p) => {
                    p.forget();
                    taken += 1;
                }
                Err(_) => break,
            }
        }
        let res = tokio::select! {
            _ = cancel.cancelled() => return,
            r = reader.read(taken, options.read_block) => r,
        };
        match res {
            Ok(entries) => {
                backoff = Duration::from_millis(50);
                seen_error.clear();
                let unused = taken - entries.len().min(taken);
                permits.add_permits(unused);
                if !entries.is_empty() && tx.send(Ok(entries)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                permits.add_permits(taken);
                // Report each distinct failure once, then keep trying.
                if seen_error.insert(e.to_string()) && tx.send(Err(e.clone())).await.is_err() {
                    return;
                }
                tracing::warn!(error = %e, "stream read failed; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

impl From<std::convert::Infallible> for StoreError {
    fn from(e: std::convert::Infallible) -> Self {
        match e {}
    }
}
