//! REST routes mirroring the RPCs, plus `/health` and `/health/live`.

use std::{collections::HashMap, sync::Arc};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, State},
    http::HeaderMap,
    response::IntoResponse,
    routing::{get, post},
};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::json;
use virtufin_common::{ApiError, Health, audit::Origin};

use crate::manager::{NewWorker, Record, Shared};

pub fn router(shared: Arc<Shared>, health: &Health) -> Router {
    let router = Router::new()
        .route("/v1/workers", post(create).get(list))
        .route("/v1/workers/recover", post(recover))
        .route("/v1/workers/{id}", get(one).delete(delete))
        .route("/v1/workers/{id}/start", post(start))
        .route("/v1/workers/{id}/stop", post(stop))
        .route("/v1/workers/{id}/code", axum::routing::put(load_code))
        .route("/v1/workers/{id}/history", get(history))
        .route("/v1/workers/{id}/tags", get(tags).put(set_tags))
        .route("/v1/workers/{id}/tags/{key}", get(tag).put(set_tag))
        .with_state(shared.clone())
        .merge(health.router());
    shared.metrics.base.instrument(router, health.clone())
}

fn body<T: serde::de::DeserializeOwned>(bytes: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::invalid(format!("malformed JSON body: {e}")))
}

/// Code as text (`code`) or bytes (`code_base64`).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Code {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    code_base64: Option<String>,
    #[serde(default)]
    url: String,
    #[serde(default)]
    sha256: String,
}

impl Code {
    fn bytes(&self) -> Result<Vec<u8>, ApiError> {
        match (&self.code, &self.code_base64) {
            (Some(c), None) => Ok(c.clone().into_bytes()),
            (None, Some(b)) => base64::engine::general_purpose::STANDARD
                .decode(b.as_bytes())
                .map_err(|e| ApiError::invalid(format!("code_base64 is not base64: {e}"))),
            (None, None) => Ok(Vec::new()),
            (Some(_), Some(_)) => Err(ApiError::invalid("give code or code_base64, not both")),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    #[serde(flatten)]
    code: Code,
    mime_type: String,
    topic: String,
    #[serde(default)]
    group: String,
    #[serde(default)]
    config: HashMap<String, String>,
    #[serde(default)]
    tags: HashMap<String, String>,
}

fn view(r: &Record) -> serde_json::Value {
    json!({
        "id": r.id, "mime_type": r.mime_type, "language": r.language, "topic": r.topic,
        "group": r.group, "created_at": r.created_at, "status": r.status,
        "config": r.config, "tags": r.tags, "versions": r.history.len(),
    })
}

async fn create(
    State(s): State<Arc<Shared>>,
    h: HeaderMap,
    b: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let r: CreateBody = body(&b)?;
    let id = s
        .create(
            NewWorker {
                content: r.code.bytes()?,
                url: r.code.url,
                sha256: r.code.sha256,
                mime_type: r.mime_type,
                topic: r.topic,
                group: r.group,
                config: r.config,
                tags: r.tags,
            },
            &Origin::of_headers(&h),
        )
        .await?;
    Ok(Json(json!({ "id": id })))
}

async fn list(State(s): State<Arc<Shared>>) -> Result<impl IntoResponse, ApiError> {
    let workers: Vec<_> = s.list().await?.iter().map(view).collect();
    Ok(Json(json!({ "workers": workers })))
}

async fn one(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(view(&s.record(&id).await?)))
}

async fn delete(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    h: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    s.delete(&id, &Origin::of_headers(&h)).await?;
    Ok(Json(json!({})))
}

async fn start(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    h: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    s.start(&id, &Origin::of_headers(&h)).await?;
    Ok(Json(json!({})))
}

async fn stop(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    h: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    s.stop(&id, &Origin::of_headers(&h)).await?;
    Ok(Json(json!({})))
}

async fn recover(State(s): State<Arc<Shared>>) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(json!({ "recovered_count": s.recover().await? })))
}

async fn load_code(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    h: HeaderMap,
    b: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let c: Code = body(&b)?;
    s.load_code(&id, &c.bytes()?, &c.url, &c.sha256, &Origin::of_headers(&h))
        .await?;
    Ok(Json(json!({})))
}

async fn history(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let entries: Vec<_> = s
        .history(&id)
        .await?
        .into_iter()
        .map(|(at, code)| json!({"created_at": at, "code_base64": base64::engine::general_purpose::STANDARD.encode(code)}))
        .collect();
    Ok(Json(json!({ "entries": entries })))
}

async fn tags(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(json!({ "tags": s.record(&id).await?.tags })))
}

async fn set_tags(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    h: HeaderMap,
    b: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Tags {
        tags: HashMap<String, String>,
    }
    let t: Tags = body(&b)?;
    s.set_tags(&id, t.tags, &Origin::of_headers(&h)).await?;
    Ok(Json(json!({})))
}

async fn tag(
    State(s): State<Arc<Shared>>,
    Path((id, key)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    match s.record(&id).await?.tags.get(&key) {
        Some(v) => Ok(Json(json!({ "value": v }))),
        None => Err(ApiError::not_found(format!(
            "worker {id} has no tag '{key}'"
        ))),
    }
}

async fn set_tag(
    State(s): State<Arc<Shared>>,
    Path((id, key)): Path<(String, String)>,
    h: HeaderMap,
    b: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Value {
        value: String,
    }
    let v: Value = body(&b)?;
    s.set_tags(
        &id,
        [(key, v.value)].into_iter().collect(),
        &Origin::of_headers(&h),
    )
    .await?;
    Ok(Json(json!({})))
}
