//! The api's metrics beyond every service's (see `virtufin_common::metrics`):
//! the pub/sub flow per topic and group. Topic and group labels are
//! bounded ([`Bounded`]).

use std::sync::Arc;

use virtufin_common::metrics::{Bounded, Counters, Gauges, Metrics};
use virtufin_store::Outcome;

/// The api's metric families.
#[derive(Debug)]
pub struct ApiMetrics {
    pub base: Arc<Metrics>,
    published: Counters,
    delivered: Counters,
    redelivered: Counters,
    acknowledged: Counters,
    pending: Gauges,
    topics: Bounded,
    groups: Bounded,
}

impl ApiMetrics {
    pub fn new() -> Self {
        let base = Metrics::new("virtufin-api", env!("CARGO_PKG_VERSION"));
        let published = Counters::default();
        base.register(
            "pubsub_published_events",
            "Events published (accepted by the broker), by topic",
            published.clone(),
        );
        let delivered = Counters::default();
        base.register(
            "pubsub_delivered_events",
            "Events handed to a subscription stream of this api, redeliveries included, by topic and group",
            delivered.clone(),
        );
        let redelivered = Counters::default();
        base.register(
            "pubsub_redelivered_events",
            "Deliveries that were not an event's first (after RETRY, a lost subscriber or the processing timeout), by topic and group",
            redelivered.clone(),
        );
        let acknowledged = Counters::default();
        base.register(
            "pubsub_acknowledged_events",
            "Acknowledgements of SubscribeTopicEvents streams, by topic, group and status (SUCCESS, RETRY, DROP)",
            acknowledged.clone(),
        );
        let pending = Gauges::default();
        base.register(
            "pubsub_pending_events",
            "Events delivered by this api on an acknowledged stream and not yet acknowledged, by topic and group",
            pending.clone(),
        );
        Self {
            base,
            published,
            delivered,
            redelivered,
            acknowledged,
            pending,
            topics: Bounded::default(),
            groups: Bounded::default(),
        }
    }

    fn topic(&self, topic: &str) -> Vec<(&'static str, String)> {
        vec![("topic", self.topics.label(topic))]
    }

    fn topic_group(&self, topic: &str, group: &str) -> Vec<(&'static str, String)> {
        vec![
            ("topic", self.topics.label(topic)),
            ("group", self.groups.label(group)),
        ]
    }

    pub fn published(&self, topic: &str) {
        self.published.get_or_create(&self.topic(topic)).inc();
    }

    /// One delivery; `attempt` > 1 is a redelivery.
    pub fn delivered(&self, topic: &str, group: &str, attempt: u32) {
        let l = self.topic_group(topic, group);
        self.delivered.get_or_create(&l).inc();
        if attempt > 1 {
            self.redelivered.get_or_create(&l).inc();
        }
    }

    /// Now in flight on an acknowledged stream.
    pub fn pending_add(&self, topic: &str, group: &str, n: i64) {
        self.pending
            .get_or_create(&self.topic_group(topic, group))
            .inc_by(n);
    }

    pub fn acknowledged(&self, topic: &str, group: &str, outcome: Outcome) {
        let mut l = self.topic_group(topic, group);
        let status = match outcome {
            Outcome::Success => "SUCCESS",
            Outcome::Retry => "RETRY",
            Outcome::Drop => "DROP",
        };
        l.push(("status", status.to_owned()));
        self.acknowledged.get_or_create(&l).inc();
    }
}

impl Default for ApiMetrics {
    fn default() -> Self {
        Self::new()
    }
}
