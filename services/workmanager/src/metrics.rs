//! The workmanager's metrics beyond every service's (see
//! `virtufin_common::metrics`): per worker, events by outcome, errors by
//! kind, timeouts, process restarts and event latency. The `worker` label
//! is the worker's id, bounded ([`Bounded`]): the first
//! `MAX_LABEL_VALUES` ids keep their own series, later ones share `_other`.

use std::sync::Arc;

use virtufin_common::metrics::{Bounded, Counters, Histograms, Metrics, histograms};
use virtufin_proto::api::v1::EventStatus;

use crate::engine::EngineError;

/// The workmanager's metric families.
#[derive(Debug)]
pub struct WmMetrics {
    pub base: Arc<Metrics>,
    events: Counters,
    errors: Counters,
    timeouts: Counters,
    restarts: Counters,
    duration: Histograms,
    workers: Bounded,
}

impl WmMetrics {
    pub fn new() -> Self {
        let base = Metrics::new("virtufin-workmanager", env!("CARGO_PKG_VERSION"));
        let events = Counters::default();
        base.register(
            "worker_events",
            "Events handled by a worker, by worker and acknowledgement (SUCCESS, RETRY, DROP)",
            events.clone(),
        );
        let errors = Counters::default();
        base.register(
            "worker_errors",
            "Worker errors (each also a worker.error event), by worker and kind (start, load, user, timeout, crashed, protocol)",
            errors.clone(),
        );
        let timeouts = Counters::default();
        base.register(
            "worker_timeouts",
            "Events a worker did not answer within its event timeout, by worker",
            timeouts.clone(),
        );
        let restarts = Counters::default();
        base.register(
            "worker_restarts",
            "Worker processes killed to be started again (failed ping, timeout, crash), by worker",
            restarts.clone(),
        );
        let duration = histograms();
        base.register(
            "worker_event_duration_seconds",
            "Time a worker took for one event (its answer, error or timeout), by worker",
            duration.clone(),
        );
        Self {
            base,
            events,
            errors,
            timeouts,
            restarts,
            duration,
            workers: Bounded::default(),
        }
    }

    fn worker(&self, id: &str) -> Vec<(&'static str, String)> {
        vec![("worker", self.workers.label(id))]
    }

    pub fn event(&self, worker: &str, status: EventStatus, seconds: Option<f64>) {
        let mut l = self.worker(worker);
        if let Some(s) = seconds {
            self.duration.get_or_create(&l).observe(s);
        }
        l.push(("status", status.as_str_name().to_owned()));
        self.events.get_or_create(&l).inc();
    }

    pub fn error(&self, worker: &str, e: &EngineError) {
        let kind = match e {
            EngineError::Start(_) => "start",
            EngineError::Load { .. } => "load",
            EngineError::User { .. } => "user",
            EngineError::Timeout(_) => "timeout",
            EngineError::Crashed(_) => "crashed",
            EngineError::Protocol(_) => "protocol",
        };
        let mut l = self.worker(worker);
        if kind == "timeout" {
            self.timeouts.get_or_create(&l).inc();
        }
        l.push(("kind", kind.to_owned()));
        self.errors.get_or_create(&l).inc();
    }

    pub fn restart(&self, worker: &str) {
        self.restarts.get_or_create(&self.worker(worker)).inc();
    }
}

impl Default for WmMetrics {
    fn default() -> Self {
        Self::new()
    }
}
