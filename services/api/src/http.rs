//! The HTTP side: `/health`, `/health/live` and REST routes for State (and
//! a read-only list of open subscriptions).

use std::{collections::HashMap, sync::Arc};

use axum::{
    Extension, Json, Router,
    body::Bytes,
    extract::{Path, Query, State},
    http::StatusCode,
    response::IntoResponse,
    routing::{get, post},
};
use serde::Deserialize;
use serde_json::json;

use virtufin_common::auth::{Caller, SharedKeys, http_auth};

use crate::{App, error::ApiError, gateway::GatewayApi, state::StateApi};

#[derive(Clone)]
struct Ctx {
    app: Arc<App>,
    state: StateApi,
}

pub fn router(
    app: Arc<App>,
    state: StateApi,
    gateway: GatewayApi,
    keys: SharedKeys,
    cors: Option<tower_http::cors::CorsLayer>,
) -> Router {
    let health = app.health.router();
    let metrics = app.metrics.base.clone();
    let health_too = app.health.clone();
    // Everything but health is behind the key check.
    let api = Router::new()
        .route("/v1/state/save-state", post(save))
        .route("/v1/state/register-keys", post(register))
        .route("/v1/state/{service}", get(get_all))
        .route("/v1/state/{service}/{*key}", get(get_one).delete(delete))
        .route("/v1/pubsub/subscriptions", get(subscriptions))
        .with_state(Ctx { app, state })
        .merge(crate::gateway::routes(gateway))
        .layer(axum::middleware::from_fn_with_state(keys, http_auth));
    let router = metrics.instrument(api.merge(health), health_too);
    match cors {
        Some(c) => router.layer(c),
        None => router,
    }
}

/// Parses a JSON body with a message that says what is wrong with it.
fn body<T: serde::de::DeserializeOwned>(bytes: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::invalid(format!("malformed JSON body: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SaveBody {
    service: String,
    key: String,
    value: String,
    #[serde(default)]
    etag: String,
    #[serde(default, alias = "includeValue")]
    include_value: bool,
}

async fn save(
    State(c): State<Ctx>,
    Extension(caller): Extension<Caller>,
    b: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let r: SaveBody = body(&b)?;
    let etag = c
        .state
        .save(
            &caller,
            &r.service,
            &r.key,
            &r.value,
            &r.etag,
            r.include_value,
        )
        .await?;
    Ok(Json(json!({
        "status": {"success": true, "status": "OK", "message": format!("State saved for {}/{}", r.service, r.key)},
        "etag": etag,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    service: String,
    keys: Vec<String>,
}

async fn register(
    State(c): State<Ctx>,
    Extension(caller): Extension<Caller>,
    b: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let r: RegisterBody = body(&b)?;
    let added = c.state.register(&caller, &r.service, &r.keys).await?;
    Ok(Json(json!({
        "status": {"success": true, "status": "OK", "message": format!("{added} new key(s) registered for {}", r.service)},
    })))
}

async fn get_one(
    State(c): State<Ctx>,
    Extension(caller): Extension<Caller>,
    Path((service, key)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    match c.state.get(&caller, &service, &key).await? {
        Some(v) => Ok(Json(json!({"key": key, "value": v.value, "etag": v.etag}))),
        None => Err(ApiError::not_found(format!(
            "no state stored for {service}/{key}"
        ))),
    }
}

async fn get_all(
    State(c): State<Ctx>,
    Extension(caller): Extension<Caller>,
    Path(service): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let values = c.state.get_all(&caller, &service).await?;
    Ok(Json(json!({ "values": values })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DeleteQuery {
    #[serde(default, alias = "includeValue")]
    include_value: bool,
    #[serde(default)]
    etag: String,
}

async fn delete(
    State(c): State<Ctx>,
    Extension(caller): Extension<Caller>,
    Path((service, key)): Path<(String, String)>,
    q: Result<Query<DeleteQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::invalid(format!("bad query string: {e}")))?;
    let deleted = c
        .state
        .delete(&caller, &service, &key, &q.etag, q.include_value)
        .await?;
    let (code, message) = if deleted {
        (StatusCode::OK, format!("State deleted for {service}/{key}"))
    } else {
        (
            StatusCode::NOT_FOUND,
            format!("no state stored for {service}/{key}"),
        )
    };
    Ok((
        code,
        Json(
            json!({"status": {"success": deleted, "status": if deleted {"OK"} else {"NOT_FOUND"}, "message": message}}),
        ),
    ))
}

async fn subscriptions(State(c): State<Ctx>) -> impl IntoResponse {
    let list = c.app.subscriptions.list();
    let mut by_topic: HashMap<&str, usize> = HashMap::new();
    for s in &list {
        *by_topic.entry(s.topic.as_str()).or_default() += 1;
    }
    Json(json!({ "count": list.len(), "subscriptions": list }))
}
