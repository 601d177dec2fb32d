//! Named readiness checks and a liveness flag, served over HTTP as
//! `/health` (readiness, 503 until every check passes) and `/health/live`.

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
};

use axum::{Json, Router, http::StatusCode, response::IntoResponse, routing::get};
use serde::Serialize;
use tokio::sync::watch;

#[derive(Debug, Clone)]
struct CheckState {
    ok: bool,
    detail: String,
}

#[derive(Debug)]
struct Inner {
    checks: RwLock<BTreeMap<String, CheckState>>,
    /// Conditions shown by `/health` that do not gate readiness (a
    /// gateway backend's open circuit): "Degraded" when not ok.
    notes: RwLock<BTreeMap<String, CheckState>>,
    live: RwLock<CheckState>,
    ready_tx: watch::Sender<bool>,
    /// Bumped on every change of any check.
    changes: watch::Sender<u64>,
}

/// The health of one service: a set of named readiness checks, all of which
/// must pass for the service to be ready, and one liveness condition.
#[derive(Debug, Clone)]
pub struct Health {
    inner: Arc<Inner>,
}

/// A handle to one named readiness check.
#[derive(Debug, Clone)]
pub struct Check {
    health: Health,
    name: String,
}

/// One check as reported by `/health`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CheckReport {
    pub status: &'static str,
    pub description: String,
}

/// What `/health` and `/health/live` answer.
#[derive(Debug, Clone, Serialize)]
pub struct HealthReport {
    pub status: &'static str,
    pub checks: BTreeMap<String, CheckReport>,
}

fn word(ok: bool) -> &'static str {
    if ok { "Healthy" } else { "Unhealthy" }
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    pub fn new() -> Self {
        let (ready_tx, _) = watch::channel(false);
        let (changes, _) = watch::channel(0);
        Self {
            inner: Arc::new(Inner {
                checks: RwLock::new(BTreeMap::new()),
                notes: RwLock::new(BTreeMap::new()),
                live: RwLock::new(CheckState {
                    ok: true,
                    detail: "running".into(),
                }),
                ready_tx,
                changes,
            }),
        }
    }

    /// Adds a readiness check that fails (with `pending`) until it is set.
    pub fn register(&self, name: &str, pending: &str) -> Check {
        self.write_checks().insert(
            name.to_owned(),
            CheckState {
                ok: false,
                detail: pending.to_owned(),
            },
        );
        self.publish();
        Check {
            health: self.clone(),
            name: name.to_owned(),
        }
    }

    /// True when every readiness check passes (and at least one exists).
    pub fn is_ready(&self) -> bool {
        let checks = self.read_checks();
        !checks.is_empty() && checks.values().all(|c| c.ok)
    }

    /// Follows readiness changes.
    pub fn ready_watch(&self) -> watch::Receiver<bool> {
        self.inner.ready_tx.subscribe()
    }

    /// Waits until the service is ready.
    pub async fn wait_ready(&self) {
        let mut rx = self.ready_watch();
        let _ = rx.wait_for(|r| *r).await;
    }

    /// Sets the liveness condition; a service that is not live should be
    /// restarted by its supervisor (the watchdog stops pinging).
    pub fn set_live(&self, ok: bool, detail: impl Into<String>) {
        let mut live = self.inner.live.write().unwrap_or_else(|p| p.into_inner());
        *live = CheckState {
            ok,
            detail: detail.into(),
        };
    }

    pub fn is_live(&self) -> bool {
        self.inner.live.read().unwrap_or_else(|p| p.into_inner()).ok
    }

    /// The first failing check and its reason, for `STATUS=` lines.
    pub fn first_failure(&self) -> Option<(String, String)> {
        self.read_checks()
            .iter()
            .find(|(_, c)| !c.ok)
            .map(|(n, c)| (n.clone(), c.detail.clone()))
    }

    /// Shows (`ok` = false: "Degraded") or clears (`None`) a condition in
    /// `/health` that does not affect readiness.
    pub fn set_note(&self, name: &str, state: Option<(bool, String)>) {
        let mut notes = self.inner.notes.write().unwrap_or_else(|p| p.into_inner());
        match state {
            Some((ok, detail)) => {
                notes.insert(name.to_owned(), CheckState { ok, detail });
            }
            None => {
                notes.remove(name);
            }
        }
    }

    pub fn readiness_report(&self) -> HealthReport {
        let mut checks: BTreeMap<_, _> = self
            .read_checks()
            .iter()
            .map(|(n, c)| {
                (
                    n.clone(),
                    CheckReport {
                        status: word(c.ok),
                        description: c.detail.clone(),
                    },
                )
            })
            .collect();
        let mut degraded = false;
        for (n, c) in self
            .inner
            .notes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            degraded |= !c.ok;
            checks.insert(
                n.clone(),
                CheckReport {
                    status: if c.ok { "Healthy" } else { "Degraded" },
                    description: c.detail.clone(),
                },
            );
        }
        let ready = self.is_ready();
        HealthReport {
            status: if ready && degraded {
                "Degraded"
            } else {
                word(ready)
            },
            checks,
        }
    }

    pub fn liveness_report(&self) -> HealthReport {
        let live = self
            .inner
            .live
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut checks = BTreeMap::new();
        checks.insert(
            "live".to_owned(),
            CheckReport {
                status: word(live.ok),
                description: live.detail,
            },
        );
        HealthReport {
            status: word(live.ok),
            checks,
        }
    }

    /// `/health` and `/health/live`, to merge into a service's HTTP router.
    pub fn router<S: Clone + Send + Sync + 'static>(&self) -> Router<S> {
        let ready = self.clone();
        let live = self.clone();
        Router::new()
            .route(
                "/health",
                get(move || async move { respond(ready.is_ready(), ready.readiness_report()) }),
            )
            .route(
                "/health/live",
                get(move || async move { respond(live.is_live(), live.liveness_report()) }),
            )
    }

    fn set(&self, name: &str, ok: bool, detail: String) {
        self.write_checks()
            .insert(name.to_owned(), CheckState { ok, detail });
        self.publish();
    }

    fn publish(&self) {
        self.inner.changes.send_modify(|n| *n = n.wrapping_add(1));
        let ready = self.is_ready();
        self.inner.ready_tx.send_if_modified(|r| {
            let changed = *r != ready;
            *r = ready;
            changed
        });
    }

    fn read_checks(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, CheckState>> {
        self.inner.checks.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_checks(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, CheckState>> {
        self.inner.checks.write().unwrap_or_else(|p| p.into_inner())
    }
}

fn respond(ok: bool, report: HealthReport) -> impl IntoResponse {
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(report))
}

impl Check {
    pub fn pass(&self, detail: impl Into<String>) {
        self.health.set(&self.name, true, detail.into());
    }

    pub fn fail(&self, reason: impl Into<String>) {
        self.health.set(&self.name, false, reason.into());
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn is_passing(&self) -> bool {
        self.health
            .read_checks()
            .get(&self.name)
            .is_some_and(|c| c.ok)
    }

    /// Waits until this check passes.
    pub async fn wait_passing(&self) {
        let mut rx = self.health.inner.changes.subscribe();
        loop {
            if self.is_passing() {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_all_checks_pass() {
        let h = Health::new();
        assert!(!h.is_ready(), "no checks means not ready");
        let a = h.register("store", "connecting");
        let b = h.register("broker", "connecting");
        let rx = h.ready_watch();
        a.pass("ok");
        assert!(!h.is_ready());
        assert_eq!(h.first_failure().map(|f| f.0), Some("broker".into()));
        b.pass("ok");
        assert!(h.is_ready());
        assert!(*rx.borrow());
        a.fail("connection refused");
        assert!(!h.is_ready());
        let r = h.readiness_report();
        assert_eq!(r.status, "Unhealthy");
        assert_eq!(r.checks["store"].description, "connection refused");
    }
}
