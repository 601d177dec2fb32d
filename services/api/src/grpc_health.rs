//! `virtufin.api.v1.Health` and the standard `grpc.health.v1` service,
//! both following the readiness checks.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use virtufin_proto::api::v1::{HealthCheckRequest, HealthCheckResponse, health_server};

use crate::App;

pub const SERVICES: &[&str] = &[
    "",
    "virtufin.api.v1.Health",
    "virtufin.api.v1.State",
    "virtufin.api.v1.Pubsub",
];

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
