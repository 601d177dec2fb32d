//! The api's Gateway: calls methods of configured backend services without
//! compiled stubs. Backends come from a services file (hot-reloaded: a
//! broken file keeps the last good one and says why); their methods are
//! learnt by gRPC reflection; requests and answers are protobuf JSON
//! converted with `prost-reflect`. Each backend has a deadline, retries for
//! calls that are safe to repeat, and a circuit breaker.

mod backend;
pub mod breaker;
pub mod catalog;
pub mod codec;
pub mod config;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use backend::Backend;
pub use backend::{CALLER_HEADER, CORRELATION_HEADER};
use futures_util::{Stream, StreamExt};
use prost_reflect::{DynamicMessage, MessageDescriptor, MethodDescriptor, SerializeOptions};
use tokio::sync::watch;
use tonic::Status;

pub use crate::{
    breaker::Circuit,
    catalog::{Catalog, Lookup, full_method_name, message_schema},
    config::{ConfigError, ServiceConfig, ServicesFile},
};

/// Most messages a server-streaming call collects for `Invoke`.
pub const MAX_COLLECTED: usize = 10_000;

/// Why a Gateway call failed: the request itself, or the backend.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GatewayError {
    /// The caller's mistake (unknown service or method, malformed JSON).
    #[error("{}", .0.message())]
    Request(Status),
    /// What the backend answered, or that it could not be reached.
    #[error("{}", .0.message())]
    Backend(Status),
}

impl GatewayError {
    pub fn status(&self) -> &Status {
        match self {
            GatewayError::Request(s) | GatewayError::Backend(s) => s,
        }
    }

    pub fn into_status(self) -> Status {
        match self {
            GatewayError::Request(s) | GatewayError::Backend(s) => s,
        }
    }
}

/// One call through the Gateway.
#[derive(Debug, Clone, Default)]
pub struct Invocation {
    pub service: String,
    pub method: String,
    /// Protobuf JSON of the request ("" = the empty message).
    pub request_json: String,
    /// Overrides the backend's deadline.
    pub timeout: Option<Duration>,
    /// Who calls (an API key's name), passed on as `x-virtufin-caller`.
    pub caller: Option<String>,
    /// Passed on as `x-correlation-id`, to tie audit lines together.
    pub correlation_id: Option<String>,
}

/// A configured backend as listed by `ListServices`.
#[derive(Debug, Clone)]
pub struct BackendInfo {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub reflection_enabled: bool,
    pub circuit: Circuit,
    pub last_error: String,
    /// gRPC services learnt by reflection so far.
    pub grpc_services: Vec<String>,
}

/// What the services file gave, and whether its last reading failed.
#[derive(Debug, Clone, Default)]
pub struct ConfigStatus {
    pub path: Option<PathBuf>,
    pub loaded_at: Option<SystemTime>,
    /// Why the file on disk is not in use (the last good one is).
    pub error: Option<String>,
    pub generation: u64,
}

#[derive(Debug, Default)]
struct Snapshot {
    backends: BTreeMap<String, Arc<Backend>>,
    text: Option<String>,
    status: ConfigStatus,
}

/// The Gateway. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: Option<PathBuf>,
    snapshot: RwLock<Snapshot>,
    changes: watch::Sender<u64>,
}

/// Aborts a spawned task when dropped, so a stream's pump ends with the
/// stream (a caller that goes away cancels the backend call).
#[derive(Debug)]
struct CancelOnDrop(tokio::task::AbortHandle);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Gateway {
    /// A Gateway over the services file at `path` (none = no backends).
    /// The file is read at once; a missing or broken file leaves the
    /// Gateway empty, with the reason in [`Gateway::config_status`].
    pub fn new(path: Option<PathBuf>) -> Self {
        let g = Self {
            inner: Arc::new(Inner {
                path: path.clone(),
                snapshot: RwLock::new(Snapshot {
                    status: ConfigStatus {
                        path,
                        ..ConfigStatus::default()
                    },
                    ..Snapshot::default()
                }),
                changes: watch::channel(0).0,
            }),
        };
        if let Err(e) = g.reload() {
            tracing::warn!(error = %e, "services file not loaded; the gateway has no backends");
        }
        g
    }

    /// A Gateway over services given directly (tests, embedding).
    pub fn from_file(file: ServicesFile) -> Self {
        let g = Self::new(None);
        g.install(file, None);
        g
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Snapshot> {
        self.inner
            .snapshot
            .read()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Snapshot> {
        self.inner
            .snapshot
            .write()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Bumped each time the configuration or its status changes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    pub fn config_status(&self) -> ConfigStatus {
        self.read().status.clone()
    }

    /// Reads the services file again. `Ok(true)` when it changed and is now
    /// in use; on error the last good configuration stays. Blocks while the
    /// file is still being written (at most
    /// [`virtufin_common::file::MAX_WAIT`]).
    pub fn reload(&self) -> Result<bool, ConfigError> {
        let Some(path) = self.inner.path.clone() else {
            return Ok(false);
        };
        // Only a file that has stopped changing is taken; empty, missing
        // or unreadable keeps the last good configuration.
        let text = match config::read(&path) {
            Ok(t) => t,
            Err(err) => {
                self.set_error(&err);
                return Err(err);
            }
        };
        if self.read().text.as_deref() == Some(text.as_str()) {
            // The file in use is back (deleted and created again, say):
            // whatever was refused meanwhile no longer stands.
            self.clear_error();
            return Ok(false);
        }
        match config::parse(&text, &path.display().to_string()) {
            Ok(file) => {
                self.install(file, Some(text));
                tracing::info!(path = %path.display(), services = ?self.service_names(), "services file loaded");
                Ok(true)
            }
            Err(e) => {
                self.set_error(&e);
                Err(e)
            }
        }
    }

    fn set_error(&self, e: &ConfigError) {
        let msg = format!("{e}; still using the last good configuration");
        let mut s = self.write();
        // Remember the broken text so the same error is reported once.
        if s.status.error.as_deref() != Some(msg.as_str()) {
            tracing::warn!(error = %msg, "services file refused");
            s.status.error = Some(msg);
            s.status.generation += 1;
            drop(s);
            self.inner.changes.send_modify(|n| *n += 1);
        }
    }

    fn clear_error(&self) {
        let mut s = self.write();
        if s.status.error.take().is_some() {
            tracing::info!("services file readable again; its configuration is unchanged");
            s.status.generation += 1;
            drop(s);
            self.inner.changes.send_modify(|n| *n += 1);
        }
    }

    fn install(&self, file: ServicesFile, text: Option<String>) {
        let mut s = self.write();
        let mut next = BTreeMap::new();
        for cfg in file.services {
            // An unchanged backend keeps its channel, methods and circuit.
            let backend = match s.backends.get(&cfg.name) {
                Some(b) if b.config == cfg => b.clone(),
                _ => Arc::new(Backend::new(cfg.clone())),
            };
            next.insert(cfg.name.clone(), backend);
        }
        s.backends = next;
        s.text = text;
        s.status.loaded_at = Some(SystemTime::now());
        s.status.error = None;
        s.status.generation += 1;
        drop(s);
        self.inner.changes.send_modify(|n| *n += 1);
    }

    /// Re-reads the services file every `interval` until `shutdown`.
    pub async fn watch(self, interval: Duration, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(interval) => {}
            }
            // The read may wait for a file being written to hold still.
            let g = self.clone();
            let _ = tokio::task::spawn_blocking(move || g.reload()).await;
        }
    }

    pub fn path(&self) -> Option<&Path> {
        self.inner.path.as_deref()
    }

    pub fn service_names(&self) -> Vec<String> {
        self.read().backends.keys().cloned().collect()
    }

    /// The configured service's settings, if it exists.
    pub fn service_config(&self, name: &str) -> Option<ServiceConfig> {
        self.read().backends.get(name).map(|b| b.config.clone())
    }

    pub fn list(&self) -> Vec<BackendInfo> {
        self.read()
            .backends
            .values()
            .map(|b| {
                let grpc = b.config.grpc.as_ref();
                BackendInfo {
                    name: b.name().to_owned(),
                    host: grpc.map(|g| g.host.clone()).unwrap_or_default(),
                    port: grpc.map(|g| g.port).unwrap_or_default(),
                    reflection_enabled: grpc.is_some_and(|g| g.reflection_enabled),
                    circuit: b.breaker.circuit(),
                    last_error: b.breaker.last_error(),
                    grpc_services: b.cached().map(|c| c.service_names()).unwrap_or_default(),
                }
            })
            .collect()
    }

    fn backend(&self, name: &str) -> Result<Arc<Backend>, GatewayError> {
        let s = self.read();
        if name.is_empty() {
            return Err(GatewayError::Request(Status::invalid_argument(
                "service is required: a service name from the services file",
            )));
        }
        s.backends.get(name).cloned().ok_or_else(|| {
            let known: Vec<&str> = s.backends.keys().map(String::as_str).collect();
            GatewayError::Request(Status::not_found(if known.is_empty() {
                format!(
                    "unknown service '{name}': no services are configured (SERVICES_CONFIG_PATH)"
                )
            } else {
                format!("unknown service '{name}'; configured: {}", known.join(", "))
            }))
        })
    }

    /// The methods of `service`, learnt by reflection.
    pub async fn methods(&self, service: &str) -> Result<Vec<MethodDescriptor>, GatewayError> {
        let b = self.backend(service)?;
        let c = b.catalog(false).await.map_err(classify)?;
        Ok(c.methods().collect())
    }

    /// Resolves `method` of `service`.
    pub async fn method(
        &self,
        service: &str,
        method: &str,
    ) -> Result<MethodDescriptor, GatewayError> {
        let b = self.backend(service)?;
        self.resolve(&b, method).await
    }

    async fn resolve(&self, b: &Backend, method: &str) -> Result<MethodDescriptor, GatewayError> {
        if method.trim().is_empty() {
            return Err(GatewayError::Request(Status::invalid_argument(
                "method is required: \"Method\", \"Service/Method\" or \"package.Service/Method\"",
            )));
        }
        let mut refreshed = false;
        loop {
            let c = b.catalog(refreshed).await.map_err(classify)?;
            match c.find(method) {
                Lookup::Found(m) => return Ok(m),
                Lookup::Ambiguous(all) => {
                    return Err(GatewayError::Request(Status::invalid_argument(format!(
                        "method '{method}' is ambiguous on service '{}'; name one of: {}",
                        b.name(),
                        all.join(", ")
                    ))));
                }
                // The backend may have been redeployed with new methods.
                Lookup::NotFound if !refreshed => refreshed = true,
                Lookup::NotFound => {
                    let all: Vec<String> = c.methods().map(|m| full_method_name(&m)).collect();
                    return Err(GatewayError::Request(Status::not_found(format!(
                        "service '{}' has no method '{method}'; it has: {}",
                        b.name(),
                        if all.is_empty() {
                            "none".to_owned()
                        } else {
                            all.join(", ")
                        }
                    ))));
                }
            }
        }
    }

    fn prepare(method: &MethodDescriptor, json: &str) -> Result<DynamicMessage, GatewayError> {
        if method.is_client_streaming() {
            return Err(GatewayError::Request(Status::unimplemented(format!(
                "{} is client-streaming; the gateway calls unary and server-streaming methods only",
                full_method_name(method)
            ))));
        }
        parse_json(&method.input(), json).map_err(GatewayError::Request)
    }

    /// Calls a unary method, or a server-streaming one whose messages are
    /// collected into a JSON array; returns the answer as protobuf JSON.
    pub async fn invoke(&self, inv: &Invocation) -> Result<String, GatewayError> {
        let b = self.backend(&inv.service)?;
        let method = self.resolve(&b, &inv.method).await?;
        let msg = Self::prepare(&method, &inv.request_json)?;
        let timeout = inv.timeout.unwrap_or(b.config.resilience.timeout());
        let caller = Tags::of(inv);
        if method.is_server_streaming() {
            // The deadline bounds the whole collection here: the backend
            // bounds only the opening by `grpc-timeout`, so a stream that
            // never ends (Health/Watch, Subscribe) held the call forever.
            let deadline = tokio::time::Instant::now() + timeout;
            let mut stream = b
                .server_streaming(&method, msg, Some(timeout), caller)
                .await
                .map_err(GatewayError::Backend)?;
            let mut out = Vec::new();
            loop {
                let item = match tokio::time::timeout_at(deadline, stream.next()).await {
                    Ok(Some(item)) => item,
                    Ok(None) => break,
                    Err(_) => {
                        return Err(GatewayError::Backend(Status::deadline_exceeded(format!(
                            "{} did not end its stream within {timeout:?} ({} messages so far); \
                             use InvokeStream for streams that stay open",
                            full_method_name(&method),
                            out.len()
                        ))));
                    }
                };
                let m = item.map_err(GatewayError::Backend)?;
                out.push(to_json_value(&m).map_err(GatewayError::Backend)?);
                if out.len() >= MAX_COLLECTED {
                    break;
                }
            }
            serde_json::to_string(&out)
                .map_err(|e| GatewayError::Backend(Status::internal(e.to_string())))
        } else {
            let resp = b
                .unary(&method, msg, timeout, caller)
                .await
                .map_err(GatewayError::Backend)?;
            to_json(&resp).map_err(GatewayError::Backend)
        }
    }

    /// Calls a server-streaming (or unary) method and yields each answer as
    /// protobuf JSON as it arrives.
    pub async fn invoke_stream(
        &self,
        inv: &Invocation,
    ) -> Result<impl Stream<Item = Result<String, Status>> + Send + 'static, GatewayError> {
        let b = self.backend(&inv.service)?;
        let method = self.resolve(&b, &inv.method).await?;
        let msg = Self::prepare(&method, &inv.request_json)?;
        let caller = Tags::of(inv);
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<String, Status>>(16);
        if method.is_server_streaming() {
            let mut stream = b
                .server_streaming(&method, msg, inv.timeout, caller)
                .await
                .map_err(GatewayError::Backend)?;
            // A timeout the caller gave bounds the whole stream (the backend
            // only bounds its opening).
            let deadline = inv.timeout.map(|t| (tokio::time::Instant::now() + t, t));
            let pump = tokio::spawn(async move {
                loop {
                    let next = match deadline {
                        Some((at, t)) => match tokio::time::timeout_at(at, stream.next()).await {
                            Ok(next) => next,
                            Err(_) => Some(Err(Status::deadline_exceeded(format!(
                                "the stream did not end within {t:?}"
                            )))),
                        },
                        None => stream.next().await,
                    };
                    let Some(item) = next else { return };
                    let out = item.and_then(|m| to_json(&m));
                    let end = out.is_err();
                    if tx.send(out).await.is_err() || end {
                        return;
                    }
                }
            });
            let guard = CancelOnDrop(pump.abort_handle());
            Ok(tokio_stream::wrappers::ReceiverStream::new(rx)
                .map(move |x| {
                    let _keep = &guard;
                    x
                })
                .boxed())
        } else {
            let timeout = inv.timeout.unwrap_or(b.config.resilience.timeout());
            let one = b
                .unary(&method, msg, timeout, caller)
                .await
                .and_then(|m| to_json(&m))
                .map_err(GatewayError::Backend)?;
            drop(tx);
            Ok(futures_util::stream::iter([Ok(one)]).boxed())
        }
    }
}

/// What a call tells the backend about its origin.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tags<'a> {
    pub caller: Option<&'a str>,
    pub correlation_id: Option<&'a str>,
}

impl<'a> Tags<'a> {
    fn of(inv: &'a Invocation) -> Self {
        Self {
            caller: inv.caller.as_deref(),
            correlation_id: inv.correlation_id.as_deref(),
        }
    }
}

/// Maps a backend-side failure to learn methods onto the right side: a
/// configuration problem is the request's, unreachability the backend's.
fn classify(s: Status) -> GatewayError {
    match s.code() {
        tonic::Code::FailedPrecondition => GatewayError::Request(s),
        _ => GatewayError::Backend(s),
    }
}

/// Protobuf JSON → a message of type `desc` ("" = the empty message).
pub fn parse_json(desc: &MessageDescriptor, json: &str) -> Result<DynamicMessage, Status> {
    if json.trim().is_empty() {
        return Ok(DynamicMessage::new(desc.clone()));
    }
    let mut de = serde_json::Deserializer::from_str(json);
    let msg = DynamicMessage::deserialize(desc.clone(), &mut de)
        .and_then(|m| de.end().map(|()| m))
        .map_err(|e| {
            Status::invalid_argument(format!(
                "request_data is not valid JSON for {}: {e}",
                desc.full_name()
            ))
        })?;
    Ok(msg)
}

fn to_json_value(m: &DynamicMessage) -> Result<serde_json::Value, Status> {
    m.serialize_with_options(serde_json::value::Serializer, &SerializeOptions::new())
        .map_err(|e| Status::internal(format!("encoding the answer as JSON: {e}")))
}

/// A message → protobuf JSON.
pub fn to_json(m: &DynamicMessage) -> Result<String, Status> {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::new(&mut out);
    m.serialize_with_options(&mut ser, &SerializeOptions::new())
        .map_err(|e| Status::internal(format!("encoding the answer as JSON: {e}")))?;
    String::from_utf8(out).map_err(|e| Status::internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const FILE: &str = r#"{"services": [{"name": "a", "grpc": {"host": "127.0.0.1", "port": 1}}]}"#;

    /// A file deleted and created again with the same content: the error
    /// seen while it was missing must not stay (it kept `/health`
    /// Degraded for good before).
    // A runtime: backends' channels are created lazily on it.
    #[tokio::test]
    async fn the_same_file_back_clears_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("services.json");
        std::fs::write(&p, FILE).unwrap();
        let g = Gateway::new(Some(p.clone()));
        assert_eq!(g.service_names(), ["a"]);
        std::fs::remove_file(&p).unwrap();
        assert!(g.reload().is_err());
        assert!(g.config_status().error.is_some());
        assert_eq!(g.service_names(), ["a"], "the last good stays");
        std::fs::write(&p, FILE).unwrap();
        assert!(!g.reload().unwrap());
        assert_eq!(g.config_status().error, None);
    }

    /// What a reload saw mid-rewrite before the settled read: an empty
    /// file. It is refused and the last good configuration stays.
    #[tokio::test]
    async fn an_empty_file_keeps_the_last_good() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("services.json");
        std::fs::write(&p, FILE).unwrap();
        let g = Gateway::new(Some(p.clone()));
        std::fs::write(&p, "").unwrap();
        let e = g.reload().unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
        assert_eq!(g.service_names(), ["a"]);
        std::fs::write(&p, r#"{"services": []}"#).unwrap();
        assert!(g.reload().unwrap());
        assert!(g.service_names().is_empty(), "no backends, spelled out");
    }
}
