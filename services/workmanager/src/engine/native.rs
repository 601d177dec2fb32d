//! The native engine: each worker's shared library (C ABI v1) is loaded by
//! its own `virtufin-worker-host` process, so a segfault, hang or leak in
//! user code ends that process, never the workmanager. Host and
//! workmanager speak the Python engine's framing (see
//! `virtufin_worker_abi::frame`); the worker's `gateway_call`s arrive as
//! `gateway` frames while an event is being processed and are answered
//! through the api's Gateway.

use std::{
    future::Future,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    pin::Pin,
    time::Duration,
};

use serde_json::Value;
use tokio::{io::AsyncWriteExt, process::Command};
use virtufin_worker_abi::frame::Frame;

use super::{EngineError, process::WorkerProcess};

/// The api's Gateway as the native engine needs it: a JSON request to a
/// backend's method, a JSON answer.
pub trait GatewayCaller: Send + Sync {
    fn invoke<'a>(
        &'a self,
        service: &'a str,
        method: &'a str,
        request_json: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send + 'a>>;
}

impl GatewayCaller for virtufin_api_client::ApiClient {
    fn invoke<'a>(
        &'a self,
        service: &'a str,
        method: &'a str,
        request_json: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send + 'a>> {
        Box::pin(async move {
            virtufin_api_client::ApiClient::invoke(self, service, method, request_json)
                .await
                .map_err(|e| match e {
                    virtufin_api_client::ClientError::Status(s) => {
                        format!("{:?}: {}", s.code(), s.message())
                    }
                    other => other.to_string(),
                })
        })
    }
}

/// How native workers are run.
#[derive(Debug, Clone)]
pub struct NativeOptions {
    /// The `virtufin-worker-host` binary.
    pub host: PathBuf,
    /// How long the host may take to load the library and say `ready`.
    pub ready_timeout: Duration,
    /// Address-space limit of the host process (0: none).
    pub memory_limit_bytes: u64,
    /// Largest frame accepted from a host.
    pub max_frame_bytes: usize,
}

/// A running worker host.
pub struct NativeEngine(WorkerProcess);

/// Writes the library where only this user can read it and nobody can
/// change it: `dir` 0700, the file 0500, replaced by rename so that a
/// host still running the old version keeps its own inode.
async fn install_library(dir: &Path, code: &[u8]) -> Result<PathBuf, EngineError> {
    let start = |e: std::io::Error, p: &Path| EngineError::Start(format!("{}: {e}", p.display()));
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| start(e, dir))?;
    tokio::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .await
        .map_err(|e| start(e, dir))?;
    let tmp = dir.join("worker.so.new");
    let path = dir.join("worker.so");
    let _ = tokio::fs::remove_file(&tmp).await;
    let mut f = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .await
        .map_err(|e| start(e, &tmp))?;
    f.write_all(code).await.map_err(|e| start(e, &tmp))?;
    f.sync_all().await.map_err(|e| start(e, &tmp))?;
    drop(f);
    tokio::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o500))
        .await
        .map_err(|e| start(e, &tmp))?;
    tokio::fs::rename(&tmp, &path)
        .await
        .map_err(|e| start(e, &path))?;
    Ok(path)
}

impl NativeEngine {
    /// Installs the library in `dir`, starts a host on it and waits for
    /// its `ready` (or the error that kept the library from loading).
    pub async fn start(
        options: &NativeOptions,
        worker: &str,
        code: &[u8],
        dir: &Path,
    ) -> Result<Self, EngineError> {
        let library = install_library(dir, code).await?;
        let mut cmd = Command::new(&options.host);
        let sock_path = dir.join("host.sock");
        cmd.arg("--socket")
            .arg(&sock_path)
            .arg("--library")
            .arg(&library)
            .arg("--memory-limit")
            .arg(options.memory_limit_bytes.to_string())
            .arg("--max-frame")
            .arg(options.max_frame_bytes.to_string())
            .env_clear()
            .current_dir(dir);
        WorkerProcess::start(
            cmd,
            &sock_path,
            worker,
            "worker host",
            options.ready_timeout,
            options.max_frame_bytes,
        )
        .await
        .map(Self)
        .map_err(|e| match e {
            EngineError::Start(m) if m.starts_with("cannot run") => {
                EngineError::Start(format!("{m} (set VIRTUFIN_WORKER_HOST)"))
            }
            e => e,
        })
    }

    /// Hands one event to the library's `Process`; its answer, or None.
    /// `gateway_call`s made meanwhile go through `gateway`; the whole
    /// exchange must end within `timeout`.
    pub async fn process(
        &mut self,
        event: Value,
        timeout: Duration,
        gateway: &dyn GatewayCaller,
    ) -> Result<Option<Value>, EngineError> {
        let deadline = tokio::time::Instant::now() + timeout;
        self.0.send(&Frame::Process { event }).await?;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let f = match self.0.recv(left).await {
                Err(EngineError::Timeout(_)) => return Err(EngineError::Timeout(timeout)),
                other => other?,
            };
            match f {
                Frame::Result {
                    event,
                    error_message,
                } => {
                    if let Some(m) = error_message {
                        tracing::warn!(worker = %self.0.worker, "the worker answered with an error beside its event: {m}");
                    }
                    return Ok(match event {
                        Value::Null => None,
                        v => Some(v),
                    });
                }
                Frame::Error {
                    error_type,
                    message,
                } => {
                    return Err(EngineError::User {
                        error_type,
                        message,
                    });
                }
                Frame::Log { level, message } => {
                    let w = &self.0.worker;
                    match level {
                        0 => tracing::trace!(worker = %w, "native worker: {message}"),
                        1 => tracing::debug!(worker = %w, "native worker: {message}"),
                        2 => tracing::info!(worker = %w, "native worker: {message}"),
                        3 => tracing::warn!(worker = %w, "native worker: {message}"),
                        _ => tracing::error!(worker = %w, "native worker: {message}"),
                    }
                }
                Frame::Gateway {
                    service,
                    method,
                    request,
                } => {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    let answer = match tokio::time::timeout(
                        left,
                        gateway.invoke(&service, &method, &request),
                    )
                    .await
                    {
                        Ok(Ok(r)) => Frame::GatewayResult {
                            response: Some(r),
                            error: None,
                        },
                        Ok(Err(e)) => Frame::GatewayResult {
                            response: None,
                            error: Some(e),
                        },
                        Err(_) => return Err(EngineError::Timeout(timeout)),
                    };
                    self.0.send(&answer).await?;
                }
                f => return Err(EngineError::Protocol(format!("expected result, got {f:?}"))),
            }
        }
    }

    pub async fn ping(&mut self, timeout: Duration) -> Result<(), EngineError> {
        self.0.ping(timeout).await
    }

    pub async fn shutdown(self) {
        self.0.shutdown().await;
    }

    pub async fn kill(self) {
        self.0.kill().await;
    }
}
