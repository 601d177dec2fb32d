//! The Gateway's gRPC and REST faces over [`virtufin_gateway::Gateway`],
//! with the caller's key binding applied and every call audit-logged.

use std::{pin::Pin, sync::Arc, time::Duration};

use axum::{
    Extension, Json, Router,
    body::Bytes,
    extract::{Path, Query, State},
    response::IntoResponse,
    routing::{get, post},
};
use futures_util::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tonic::{Request, Response, Status};
use virtufin_common::{
    Health,
    audit::Origin,
    auth::{Caller, caller_of},
};
use virtufin_gateway::{Gateway, GatewayError, Invocation, full_method_name, message_schema};
use virtufin_proto::api::v1::{
    GetMethodSchemaRequest, GetMethodSchemaResponse, InvokeJsonRequest, InvokeJsonResponse,
    InvokeRequest, InvokeResponse, ListMethodsRequest, ListMethodsResponse, ListServicesRequest,
    ListServicesResponse, MethodInfo, ServiceInfo, gateway_server,
};

use crate::error::ApiError;

/// Longest service or method name accepted.
const MAX_NAME: usize = 256;

/// "UNAVAILABLE", "NOT_FOUND", ... (the names grpcurl and other clients show).
pub fn code_name(code: tonic::Code) -> String {
    let camel = format!("{code:?}");
    let mut out = String::with_capacity(camel.len() + 4);
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

fn check_names(service: &str, method: Option<&str>) -> Result<(), ApiError> {
    if service.len() > MAX_NAME || method.is_some_and(|m| m.len() > MAX_NAME) {
        return Err(ApiError::invalid(format!(
            "service and method names are at most {MAX_NAME} characters"
        )));
    }
    Ok(())
}

fn method_info(m: &prost_reflect::MethodDescriptor) -> MethodInfo {
    MethodInfo {
        name: m.name().to_owned(),
        full_name: full_method_name(m),
        input_type: m.input().full_name().to_owned(),
        output_type: m.output().full_name().to_owned(),
        is_client_streaming: m.is_client_streaming(),
        is_server_streaming: m.is_server_streaming(),
    }
}

/// Operations shared by gRPC and REST.
#[derive(Clone)]
pub struct GatewayApi {
    pub gateway: Gateway,
}

impl GatewayApi {
    fn invocation(
        caller: &Caller,
        service: String,
        method: String,
        request_json: String,
        timeout_ms: u32,
        origin: Origin,
    ) -> Result<Invocation, ApiError> {
        check_names(&service, Some(&method))?;
        caller.require(&service)?;
        Ok(Invocation {
            service,
            method,
            request_json,
            timeout: (timeout_ms > 0).then(|| Duration::from_millis(u64::from(timeout_ms))),
            caller: Some(caller.name().to_owned()),
            correlation_id: Some(origin.correlation_id),
        })
    }

    /// Calls through the Gateway; `Ok(Err(status))` is the backend's failure.
    pub async fn invoke(
        &self,
        caller: &Caller,
        inv: &Invocation,
    ) -> Result<Result<String, Status>, ApiError> {
        let out = self.gateway.invoke(inv).await;
        tracing::info!(
            target: "audit",
            caller = caller.name(),
            service = %inv.service,
            method = %inv.method,
            correlation_id = inv.correlation_id.as_deref().unwrap_or_default(),
            outcome = %match &out { Ok(_) => "OK".to_owned(), Err(e) => code_name(e.status().code()) },
            action = "invoke",
            "gateway call"
        );
        match out {
            Ok(json) => Ok(Ok(json)),
            Err(GatewayError::Backend(s)) => Ok(Err(s)),
            Err(GatewayError::Request(s)) => Err(ApiError::new(s.code(), s.message())),
        }
    }

    pub fn services(&self, caller: &Caller) -> ListServicesResponse {
        let details: Vec<ServiceInfo> = self
            .gateway
            .list()
            .into_iter()
            .filter(|b| caller.may_touch(&b.name))
            .map(|b| ServiceInfo {
                name: b.name,
                host: b.host,
                port: u32::from(b.port),
                reflection_enabled: b.reflection_enabled,
                circuit: b.circuit.as_str().to_owned(),
                grpc_services: b.grpc_services,
            })
            .collect();
        ListServicesResponse {
            services: details.iter().map(|d| d.name.clone()).collect(),
            details,
        }
    }

    pub async fn methods(
        &self,
        caller: &Caller,
        service: &str,
    ) -> Result<Vec<MethodInfo>, ApiError> {
        check_names(service, None)?;
        caller.require(service)?;
        let methods = self.gateway.methods(service).await.map_err(to_api)?;
        Ok(methods.iter().map(method_info).collect())
    }

    pub async fn schema(
        &self,
        caller: &Caller,
        service: &str,
        method: &str,
        which: &str,
    ) -> Result<GetMethodSchemaResponse, ApiError> {
        check_names(service, Some(method))?;
        caller.require(service)?;
        let (input, output) = match which {
            "" => (true, true),
            "input" => (true, false),
            "output" => (false, true),
            other => {
                return Err(ApiError::invalid(format!(
                    "type '{other}' is not one of \"input\", \"output\" or \"\" (both)"
                )));
            }
        };
        let m = self.gateway.method(service, method).await.map_err(to_api)?;
        let render = |on: bool, d: prost_reflect::MessageDescriptor| {
            if on {
                message_schema(&d).to_string()
            } else {
                String::new()
            }
        };
        Ok(GetMethodSchemaResponse {
            method: Some(method_info(&m)),
            input_schema: render(input, m.input()),
            output_schema: render(output, m.output()),
        })
    }
}

fn to_api(e: GatewayError) -> ApiError {
    let s = e.into_status();
    ApiError::new(s.code(), s.message())
}

fn ok_response(json: String) -> InvokeResponse {
    InvokeResponse {
        success: true,
        status: "OK".into(),
        message: String::new(),
        response_data: json,
    }
}

fn failed_response(s: &Status) -> InvokeResponse {
    InvokeResponse {
        success: false,
        status: code_name(s.code()),
        message: s.message().to_owned(),
        response_data: String::new(),
    }
}

/// The two request messages that name a call (they differ only in name).
trait CallRequest {
    fn parts(self) -> (String, String, String, u32);
}

impl CallRequest for InvokeRequest {
    fn parts(self) -> (String, String, String, u32) {
        (
            self.service,
            self.method,
            self.request_data,
            self.timeout_ms,
        )
    }
}

impl CallRequest for InvokeJsonRequest {
    fn parts(self) -> (String, String, String, u32) {
        (
            self.service,
            self.method,
            self.request_data,
            self.timeout_ms,
        )
    }
}

/// The caller (from the key check) and the call a gRPC request asks for.
fn grpc_invocation<R: CallRequest>(req: Request<R>) -> Result<(Caller, Invocation), ApiError> {
    let (caller, origin) = (caller_of(&req), Origin::of(&req));
    let (service, method, json, timeout_ms) = req.into_inner().parts();
    let inv = GatewayApi::invocation(&caller, service, method, json, timeout_ms, origin)?;
    Ok((caller, inv))
}

/// The gRPC face.
#[derive(Clone)]
pub struct GatewayService(pub GatewayApi);

type InvokeStream = Pin<Box<dyn Stream<Item = Result<InvokeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl gateway_server::Gateway for GatewayService {
    async fn invoke(
        &self,
        req: Request<InvokeRequest>,
    ) -> Result<Response<InvokeResponse>, Status> {
        let (caller, inv) = grpc_invocation(req)?;
        Ok(Response::new(match self.0.invoke(&caller, &inv).await? {
            Ok(json) => ok_response(json),
            Err(s) => failed_response(&s),
        }))
    }

    async fn invoke_json(
        &self,
        req: Request<InvokeJsonRequest>,
    ) -> Result<Response<InvokeJsonResponse>, Status> {
        let (caller, inv) = grpc_invocation(req)?;
        let json = self.0.invoke(&caller, &inv).await??;
        Ok(Response::new(InvokeJsonResponse {
            success: true,
            status: "OK".into(),
            message: String::new(),
            response_data: json,
        }))
    }

    type InvokeStreamStream = InvokeStream;

    async fn invoke_stream(
        &self,
        req: Request<InvokeRequest>,
    ) -> Result<Response<Self::InvokeStreamStream>, Status> {
        let (caller, inv) = grpc_invocation(req)?;
        tracing::info!(target: "audit", caller = caller.name(), service = %inv.service, method = %inv.method, correlation_id = inv.correlation_id.as_deref().unwrap_or_default(), action = "invoke_stream", "gateway stream opened");
        let stream = self
            .0
            .gateway
            .invoke_stream(&inv)
            .await
            .map_err(|e| e.into_status())?;
        let out = stream.map(|item| match item {
            Ok(json) => Ok(ok_response(json)),
            Err(s) => Err(s),
        });
        Ok(Response::new(Box::pin(out)))
    }

    async fn list_services(
        &self,
        req: Request<ListServicesRequest>,
    ) -> Result<Response<ListServicesResponse>, Status> {
        let caller = caller_of(&req);
        Ok(Response::new(self.0.services(&caller)))
    }

    async fn list_methods(
        &self,
        req: Request<ListMethodsRequest>,
    ) -> Result<Response<ListMethodsResponse>, Status> {
        let caller = caller_of(&req);
        let methods = self.0.methods(&caller, &req.into_inner().service).await?;
        Ok(Response::new(ListMethodsResponse { methods }))
    }

    async fn get_method_schema(
        &self,
        req: Request<GetMethodSchemaRequest>,
    ) -> Result<Response<GetMethodSchemaResponse>, Status> {
        let caller = caller_of(&req);
        let r = req.into_inner();
        Ok(Response::new(
            self.0
                .schema(&caller, &r.service, &r.method, &r.r#type)
                .await?,
        ))
    }
}

// --- REST -------------------------------------------------------------

pub fn routes(api: GatewayApi) -> Router {
    Router::new()
        .route("/v1/gateway/list-services", get(rest_services))
        .route("/v1/gateway/list-methods", get(rest_methods_query))
        .route("/v1/gateway/invoke", post(rest_invoke))
        .route("/v1/grpc/{service}/methods", get(rest_methods_path))
        .route("/v1/grpc/{service}/schema/{*method}", get(rest_schema))
        .with_state(Arc::new(api))
}

type Ctx = State<Arc<GatewayApi>>;

fn methods_json(methods: Vec<MethodInfo>) -> Value {
    json!({ "methods": methods.iter().map(|m| json!({
        "name": m.name, "full_name": m.full_name, "input_type": m.input_type,
        "output_type": m.output_type, "is_client_streaming": m.is_client_streaming,
        "is_server_streaming": m.is_server_streaming,
    })).collect::<Vec<_>>() })
}

async fn rest_services(State(api): Ctx, Extension(caller): Extension<Caller>) -> impl IntoResponse {
    let r = api.services(&caller);
    let status = api.gateway.config_status();
    Json(json!({
        "services": r.services,
        "details": r.details.iter().map(|d| json!({
            "name": d.name, "host": d.host, "port": d.port,
            "reflection_enabled": d.reflection_enabled, "circuit": d.circuit,
            "grpc_services": d.grpc_services,
        })).collect::<Vec<_>>(),
        "config": {
            "path": status.path.map(|p| p.display().to_string()),
            "error": status.error,
        },
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceQuery {
    service: String,
}

async fn rest_methods_query(
    State(api): Ctx,
    Extension(caller): Extension<Caller>,
    q: Result<Query<ServiceQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Query(q) = q.map_err(|e| {
        ApiError::invalid(format!("bad query string: {e} (expected ?service=<name>)"))
    })?;
    Ok(Json(methods_json(api.methods(&caller, &q.service).await?)))
}

async fn rest_methods_path(
    State(api): Ctx,
    Extension(caller): Extension<Caller>,
    Path(service): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(methods_json(api.methods(&caller, &service).await?)))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SchemaQuery {
    #[serde(default, rename = "type")]
    which: String,
}

async fn rest_schema(
    State(api): Ctx,
    Extension(caller): Extension<Caller>,
    Path((service, method)): Path<(String, String)>,
    q: Result<Query<SchemaQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::invalid(format!("bad query string: {e}")))?;
    let r = api.schema(&caller, &service, &method, &q.which).await?;
    let parse = |s: &str| serde_json::from_str::<Value>(s).unwrap_or(Value::Null);
    let m = r.method.unwrap_or_default();
    Ok(Json(json!({
        "method": {"name": m.name, "full_name": m.full_name, "input_type": m.input_type,
                   "output_type": m.output_type, "is_client_streaming": m.is_client_streaming,
                   "is_server_streaming": m.is_server_streaming},
        "input_schema": parse(&r.input_schema),
        "output_schema": parse(&r.output_schema),
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct InvokeBody {
    service: String,
    method: String,
    /// The request as a JSON string (the gRPC field) ...
    #[serde(default, alias = "request_data")]
    request_data: Option<String>,
    /// ... or as a JSON value.
    #[serde(default)]
    request: Option<Value>,
    #[serde(default, alias = "timeout_ms")]
    timeout_ms: u32,
}

async fn rest_invoke(
    State(api): Ctx,
    Extension(caller): Extension<Caller>,
    h: axum::http::HeaderMap,
    b: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let r: InvokeBody = serde_json::from_slice(&b)
        .map_err(|e| ApiError::invalid(format!("malformed JSON body: {e}")))?;
    let json = match (r.request_data, r.request) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "give the request as either requestData (a JSON string) or request (a JSON value), not both",
            ));
        }
        (Some(s), None) => s,
        (None, Some(v)) => v.to_string(),
        (None, None) => String::new(),
    };
    let inv = GatewayApi::invocation(
        &caller,
        r.service,
        r.method,
        json,
        r.timeout_ms,
        Origin::of_headers(&h),
    )?;
    match api.invoke(&caller, &inv).await? {
        Ok(data) => {
            let value = serde_json::from_str::<Value>(&data).unwrap_or(Value::String(data.clone()));
            Ok((
                axum::http::StatusCode::OK,
                Json(
                    json!({"success": true, "status": "OK", "message": "", "response_data": data, "response": value}),
                ),
            ))
        }
        Err(s) => {
            let e = ApiError::new(s.code(), s.message());
            Ok((
                e.http_status(),
                Json(
                    json!({"success": false, "status": code_name(s.code()), "message": s.message()}),
                ),
            ))
        }
    }
}

/// Keeps `/health` in step with the Gateway: an open circuit or a refused
/// services file shows as "Degraded" (without making the api unready: the
/// api's own work does not depend on any backend).
pub async fn follow_health(
    gateway: Gateway,
    health: Health,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut changes = gateway.changes();
    let mut shown: Vec<String> = Vec::new();
    loop {
        let status = gateway.config_status();
        health.set_note(
            "services-file",
            status.path.as_ref().map(|p| match &status.error {
                Some(e) => (false, e.clone()),
                None => (true, format!("{} in use", p.display())),
            }),
        );
        let list = gateway.list();
        for old in &shown {
            if !list.iter().any(|b| &b.name == old) {
                health.set_note(&format!("gateway:{old}"), None);
            }
        }
        shown = list.iter().map(|b| b.name.clone()).collect();
        for b in list {
            let note = match b.circuit {
                virtufin_gateway::Circuit::Closed => (true, "circuit closed".to_owned()),
                c => (false, format!("circuit {}: {}", c.as_str(), b.last_error)),
            };
            health.set_note(&format!("gateway:{}", b.name), Some(note));
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = changes.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
