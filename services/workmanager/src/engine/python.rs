//! The Python engine: one persistent `python3` process per worker, spoken
//! to over a Unix socket with frames of a 4-byte big-endian length and
//! UTF-8 JSON (`ready`, `process`, `result`, `ping`, `pong`, `shutdown`,
//! `error`). Worker code written for the original — a module defining
//! `Process(event)` that returns a CloudEvent-shaped dict or None — runs
//! unchanged.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    net::{UnixListener, UnixStream},
    process::{Child, Command},
};
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use virtufin_worker_abi::frame::Frame;

use super::EngineError;

const BOOTSTRAP: &str = include_str!("bootstrap.py");

/// How Python workers are run.
#[derive(Debug, Clone)]
pub struct PythonOptions {
    pub python: PathBuf,
    /// Modules worker code may not import.
    pub blocked_modules: Vec<String>,
    /// How long the interpreter may take to load the code and say `ready`.
    pub ready_timeout: Duration,
    /// Address-space limit of the worker process (0: none).
    pub memory_limit_bytes: u64,
    /// Largest frame accepted from a worker.
    pub max_frame_bytes: usize,
}

/// A running Python worker process.
pub struct PythonEngine {
    child: Child,
    conn: Framed<UnixStream, LengthDelimitedCodec>,
    worker: String,
}

impl PythonEngine {
    /// Writes the code into `dir`, starts the interpreter and waits for
    /// its `ready` (or the error that kept it from loading).
    pub async fn start(
        options: &PythonOptions,
        worker: &str,
        code: &[u8],
        dir: &Path,
    ) -> Result<Self, EngineError> {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| EngineError::Start(format!("{}: {e}", dir.display())))?;
        let code_path = dir.join("worker.py");
        let boot_path = dir.join("bootstrap.py");
        let sock_path = dir.join("host.sock");
        tokio::fs::write(&code_path, code)
            .await
            .map_err(|e| EngineError::Start(e.to_string()))?;
        tokio::fs::write(&boot_path, BOOTSTRAP)
            .await
            .map_err(|e| EngineError::Start(e.to_string()))?;
        let _ = tokio::fs::remove_file(&sock_path).await;
        let listener = UnixListener::bind(&sock_path)
            .map_err(|e| EngineError::Start(format!("{}: {e}", sock_path.display())))?;
        let mut child = Command::new(&options.python)
            // -I: isolated (no environment variables, no user site, no
            // current directory on the path); -B: no .pyc files.
            .arg("-I")
            .arg("-B")
            .arg(&boot_path)
            .arg("--socket")
            .arg(&sock_path)
            .arg("--code")
            .arg(&code_path)
            .arg("--blocked")
            .arg(options.blocked_modules.join(","))
            .arg("--memory-limit")
            .arg(options.memory_limit_bytes.to_string())
            .env_clear()
            .env("VIRTUFIN_WORKER_ID", worker)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                EngineError::Start(format!("cannot run {}: {e}", options.python.display()))
            })?;
        if let Some(stderr) = child.stderr.take() {
            let w = worker.to_owned();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    tracing::warn!(worker = %w, "python: {l}");
                }
            });
        }
        let accept = tokio::time::timeout(options.ready_timeout, listener.accept()).await;
        let stream = match accept {
            Ok(Ok((s, _))) => s,
            Ok(Err(e)) => return Err(EngineError::Start(e.to_string())),
            Err(_) => {
                let status = child.try_wait().ok().flatten();
                return Err(EngineError::Start(format!(
                    "the interpreter did not connect within {:?} ({})",
                    options.ready_timeout,
                    status
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "still running".into())
                )));
            }
        };
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
        self.conn
            .send(Bytes::from(frame.to_bytes()))
            .await
            .map_err(|e| self.crashed(e.to_string()))
    }

    async fn recv(&mut self, timeout: Duration) -> Result<Frame, EngineError> {
        match tokio::time::timeout(timeout, self.conn.next()).await {
            Err(_) => Err(EngineError::Timeout(timeout)),
            Ok(None) => Err(self.crashed("the worker process closed its socket".into())),
            Ok(Some(Err(e))) => Err(self.crashed(e.to_string())),
            Ok(Some(Ok(b))) => Frame::from_bytes(&b)
                .map_err(|e| EngineError::Protocol(format!("a frame is not a known frame: {e}"))),
        }
    }

    fn crashed(&mut self, why: String) -> EngineError {
        let status = self.child.try_wait().ok().flatten();
        EngineError::Crashed(match status {
            Some(s) => format!("{why} (process {s})"),
            None => why,
        })
    }

    /// Hands one event to `Process(event)`; its answer, or None.
    pub async fn process(
        &mut self,
        event: Value,
        timeout: Duration,
    ) -> Result<Option<Value>, EngineError> {
        self.send(&Frame::Process { event }).await?;
        match self.recv(timeout).await? {
            Frame::Result {
                event: Value::Null, ..
            } => Ok(None),
            Frame::Result { event, .. } => Ok(Some(event)),
            Frame::Error {
                error_type,
                message,
            } => Err(EngineError::User {
                error_type,
                message,
            }),
            f => Err(EngineError::Protocol(format!("expected result, got {f:?}"))),
        }
    }

    /// `ping` → `pong` within `timeout`: the process is alive and not hung.
    pub async fn ping(&mut self, timeout: Duration) -> Result<(), EngineError> {
        self.send(&Frame::Ping).await?;
        match self.recv(timeout).await? {
            Frame::Pong => Ok(()),
            f => Err(EngineError::Protocol(format!("expected pong, got {f:?}"))),
        }
    }

    /// Asks the process to stop; kills it if it does not within 2 s.
    pub async fn shutdown(mut self) {
        let _ = self.send(&Frame::Shutdown).await;
        if tokio::time::timeout(Duration::from_secs(2), self.child.wait())
            .await
            .is_err()
        {
            tracing::warn!(worker = %self.worker, "python worker ignored shutdown; killing it");
            let _ = self.child.kill().await;
        }
    }

    /// Kills the process at once (a hang or a timeout).
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}
