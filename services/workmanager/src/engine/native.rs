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
    process::Stdio,
    time::Duration,
};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    process::{Child, Command},
};
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use virtufin_worker_abi::frame::Frame;

use super::EngineError;

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
pub struct NativeEngine {
    child: Child,
    conn: Framed<UnixStream, LengthDelimitedCodec>,
    worker: String,
}

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
        let sock_path = dir.join("host.sock");
        let _ = tokio::fs::remove_file(&sock_path).await;
        let listener = UnixListener::bind(&sock_path)
            .map_err(|e| EngineError::Start(format!("{}: {e}", sock_path.display())))?;
        let mut child = Command::new(&options.host)
            .arg("--socket")
            .arg(&sock_path)
            .arg("--library")
            .arg(&library)
            .arg("--memory-limit")
            .arg(options.memory_limit_bytes.to_string())
            .arg("--max-frame")
            .arg(options.max_frame_bytes.to_string())
            .env_clear()
            .env("VIRTUFIN_WORKER_ID", worker)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                EngineError::Start(format!(
                    "cannot run the worker host {} (set VIRTUFIN_WORKER_HOST): {e}",
                    options.host.display()
                ))
            })?;
        if let Some(stderr) = child.stderr.take() {
            let w = worker.to_owned();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    tracing::warn!(worker = %w, "native worker: {l}");
                }
            });
        }
        let stream = tokio::select! {
            a = listener.accept() => a.map(|(s, _)| s).map_err(|e| EngineError::Start(e.to_string()))?,
            s = child.wait() => return Err(EngineError::Start(format!(
                "the worker host exited before connecting ({})",
                s.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string())
            ))),
            _ = tokio::time::sleep(options.ready_timeout) => return Err(EngineError::Start(format!(
                "the worker host did not connect within {:?}", options.ready_timeout
            ))),
        };
        let _ = tokio::fs::remove_file(&sock_path).await;
        let mut engine = Self {
            child,
            conn: Framed::new(stream, super::codec(options.max_frame_bytes)),
            worker: worker.to_owned(),
        };
        match engine.recv(options.ready_timeout).await? {
            Frame::Ready => Ok(engine),
            Frame::Error {
                error_type,
                message,
            } => Err(EngineError::Load {
                error_type,
                message,
            }),
            f => Err(EngineError::Protocol(format!("expected ready, got {f:?}"))),
        }
    }

    async fn send(&mut self, frame: &Frame) -> Result<(), EngineError> {
        match self.conn.send(Bytes::from(frame.to_bytes())).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.crashed(e.to_string()).await),
        }
    }

    async fn recv(&mut self, timeout: Duration) -> Result<Frame, EngineError> {
        match tokio::time::timeout(timeout, self.conn.next()).await {
            Err(_) => Err(EngineError::Timeout(timeout)),
            Ok(None) => Err(self
                .crashed("the worker host closed its socket".into())
                .await),
            Ok(Some(Err(e))) => Err(self.crashed(e.to_string()).await),
            Ok(Some(Ok(b))) => Frame::from_bytes(&b)
                .map_err(|e| EngineError::Protocol(format!("a frame is not a known frame: {e}"))),
        }
    }

    /// The error for a host that went away, with its exit status (a
    /// signal, for a crash) when it can be had within a moment: the socket
    /// closes just before the process is reaped.
    async fn crashed(&mut self, why: String) -> EngineError {
        let status = tokio::time::timeout(Duration::from_millis(200), self.child.wait()).await;
        EngineError::Crashed(match status {
            Ok(Ok(s)) => format!("{why} (process {s})"),
            _ => why,
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
        self.send(&Frame::Process { event }).await?;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let f = match self.recv(left).await {
                Err(EngineError::Timeout(_)) => return Err(EngineError::Timeout(timeout)),
                other => other?,
            };
            match f {
                Frame::Result {
                    event,
                    error_message,
                } => {
                    if let Some(m) = error_message {
                        tracing::warn!(worker = %self.worker, "the worker answered with an error beside its event: {m}");
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
                    let w = &self.worker;
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
                    self.send(&answer).await?;
                }
                f => return Err(EngineError::Protocol(format!("expected result, got {f:?}"))),
            }
        }
    }

    /// `ping` → `pong` within `timeout`: the host is alive and not hung.
    pub async fn ping(&mut self, timeout: Duration) -> Result<(), EngineError> {
        self.send(&Frame::Ping).await?;
        match self.recv(timeout).await? {
            Frame::Pong => Ok(()),
            f => Err(EngineError::Protocol(format!("expected pong, got {f:?}"))),
        }
    }

    /// Asks the host to stop; kills it if it does not within 2 s.
    pub async fn shutdown(mut self) {
        let _ = self.send(&Frame::Shutdown).await;
        if tokio::time::timeout(Duration::from_secs(2), self.child.wait())
            .await
            .is_err()
        {
            tracing::warn!(worker = %self.worker, "the worker host ignored shutdown; killing it");
            let _ = self.child.kill().await;
        }
    }

    /// Kills the host at once (a hang or a timeout).
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}
