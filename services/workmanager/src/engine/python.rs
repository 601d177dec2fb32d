//! The Python engine: one persistent `python3` process per worker, spoken
//! to over a Unix socket with frames of a 4-byte big-endian length and
//! UTF-8 JSON (`ready`, `process`, `result`, `ping`, `pong`, `shutdown`,
//! `error`). Worker code written for the original — a module defining
//! `Process(event)` that returns a CloudEvent-shaped dict or None — runs
//! unchanged.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::Value;
use tokio::process::Command;
use virtufin_worker_abi::frame::Frame;

use super::{EngineError, process::WorkerProcess};

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
pub struct PythonEngine(WorkerProcess);

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
        let mut cmd = Command::new(&options.python);
        // -I: isolated (no environment variables, no user site, no current
        // directory on the path); -B: no .pyc files.
        cmd.arg("-I")
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
            .env_clear();
        WorkerProcess::start(
            cmd,
            &sock_path,
            worker,
            "python worker",
            options.ready_timeout,
            options.max_frame_bytes,
        )
        .await
        .map(Self)
    }

    /// Hands one event to `Process(event)`; its answer, or None.
    pub async fn process(
        &mut self,
        event: Value,
        timeout: Duration,
    ) -> Result<Option<Value>, EngineError> {
        self.0.send(&Frame::Process { event }).await?;
        match self.0.recv(timeout).await? {
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
