//! Keeps the standard `grpc.health.v1` service in step with readiness.

use tokio_util::sync::CancellationToken;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::Health;

/// Reports `services` (and "", the server as a whole) SERVING while
/// `health` is ready, NOT_SERVING otherwise and after shutdown.
pub async fn follow(
    reporter: HealthReporter,
    health: Health,
    services: &[&str],
    shutdown: CancellationToken,
) {
    let mut rx = health.ready_watch();
    loop {
        let status = if *rx.borrow_and_update() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for s in services {
            reporter.set_service_status(*s, status).await;
        }
        tokio::select! {
            _ = shutdown.cancelled() => {
                for s in services {
                    reporter.set_service_status(*s, ServingStatus::NotServing).await;
                }
                return;
            }
            r = rx.changed() => if r.is_err() { return },
        }
    }
}
