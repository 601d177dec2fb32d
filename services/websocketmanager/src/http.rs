//! REST routes mirroring the RPCs, plus `/health` and `/health/live`.

use std::sync::Arc;

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, State},
    response::IntoResponse,
    routing::post,
};
use serde::Deserialize;
use serde_json::json;
use virtufin_common::{ApiError, Health};

use crate::{
    grpc::{payload, send_timeout},
    manager::Shared,
};

pub fn router(shared: Arc<Shared>, health: &Health) -> Router {
    let router = Router::new()
        .route("/v1/connections", post(connect).get(list))
        .route("/v1/connections/{id}", axum::routing::delete(disconnect))
        .route("/v1/connections/{id}/publish", post(start_publish))
        .route("/v1/connections/{id}/stop-publish", post(stop_publish))
        .route("/v1/connections/{id}/send", post(send))
        .route("/v1/connections/{id}/send-raw", post(send_raw))
        .with_state(shared.clone())
        .merge(health.router());
    shared.metrics.base.instrument(router, health.clone())
}

fn body<T: serde::de::DeserializeOwned>(bytes: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::invalid(format!("malformed JSON body: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConnectBody {
    url: String,
    #[serde(default, alias = "autoReconnect")]
    auto_reconnect: bool,
}

async fn connect(State(s): State<Arc<Shared>>, b: Bytes) -> Result<impl IntoResponse, ApiError> {
    let r: ConnectBody = body(&b)?;
    let (id, status) = s.connect(&r.url, r.auto_reconnect).await?;
    Ok(Json(json!({"id": id, "status": status.as_str()})))
}

async fn list(State(s): State<Arc<Shared>>) -> Result<impl IntoResponse, ApiError> {
    let connections = s.list().await?;
    Ok(Json(json!({ "connections": connections })))
}

async fn disconnect(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    s.disconnect(&id).await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    topic: String,
}

async fn start_publish(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    b: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let r: PublishBody = body(&b)?;
    s.start_publish(&id, &r.topic).await?;
    Ok(Json(json!({})))
}

async fn stop_publish(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    s.stop_publish(&id).await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendBody {
    message: String,
    #[serde(default, alias = "timeoutMs")]
    timeout_ms: i32,
    #[serde(default, alias = "contentType")]
    content_type: String,
}

async fn send(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    b: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let r: SendBody = body(&b)?;
    let _ = r.content_type;
    let timeout = send_timeout(&s, r.timeout_ms)?;
    let reply = s.send(&id, payload(r.message, Vec::new()), timeout).await?;
    Ok(Json(json!({"response": String::from_utf8_lossy(&reply)})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendRawBody {
    message: String,
    #[serde(default, alias = "contentType")]
    content_type: String,
}

async fn send_raw(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    b: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let r: SendRawBody = body(&b)?;
    s.send_raw(&id, payload(r.message, Vec::new()), &r.content_type)
        .await?;
    Ok(Json(json!({})))
}
