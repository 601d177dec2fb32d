//! `virtufin.api.v1.Health` and the standard `grpc.health.v1` service,
//! both following the readiness checks.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tonic_health::{ServingStatus, server::HealthReporter};
use virtufin_common::Health;
use virtufin_proto::api::v1::{HealthCheckRequest, HealthCheckResponse, health_server};

use crate::App;

const SERVICES: &[&str] = &[
    "",
    "virtufin.api.v1.Health",
    "virtufin.api.v1.State",
    "virtufin.api.v1.Pubsub",
];

/// Keeps `grpc.health.v1` in step with readiness.
pub async fn follow(reporter: HealthReporter, health: Health, shutdown: CancellationToken) {
    let mut rx = health.ready_watch();
    loop {
        let status = if *rx.borrow_and_update() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for s in SERVICES {
            reporter.set_service_status(*s, status).await;
        }
        tokio::select! {
            _ = shutdown.cancelled() => {
                for s in SERVICES {
                    reporter.set_service_status(*s, ServingStatus::NotServing).await;
                }
                return;
            }
            r = rx.changed() => if r.is_err() { return },
        }
    }
}

pub struct ApiHealth {
    pub app: Arc<App>,
}

#[tonic::async_trait]
impl health_server::Health for ApiHealth {
    async fn health_check(
        &self,
        _req: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        // Not ready is an error status, so scripts (grpcurl's exit code)
        // and clients see it without reading the body.
        if !self.app.health.is_ready() {
            let why = self
                .app
                .health
                .first_failure()
                .map(|(c, why)| format!("{c}: {why}"))
                .unwrap_or_else(|| "starting".into());
            return Err(Status::unavailable(format!(
                "virtufin-api is not ready: {why}"
            )));
        }
        let report = self.app.health.readiness_report();
        let healthy = true;
        Ok(Response::new(HealthCheckResponse {
            healthy,
            status: report.status.to_owned(),
            backend: format!("{:?}", self.app.kind).to_lowercase(),
            checks: report
                .checks
                .into_iter()
                .map(|(k, v)| {
                    let word = if v.status == "Healthy" {
                        "ok".to_owned()
                    } else {
                        v.description
                    };
                    (k, word)
                })
                .collect(),
        }))
    }
}
