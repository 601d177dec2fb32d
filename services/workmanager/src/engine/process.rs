//! What every engine's worker process shares: started with its stderr in
//! our log, connected back over a Unix socket, spoken to in frames
//! (`virtufin_worker_abi::frame`), pinged, and stopped or killed.

use std::{path::Path, process::Stdio, time::Duration};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    net::{UnixListener, UnixStream},
    process::{Child, Command},
};
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use virtufin_worker_abi::frame::Frame;

use super::EngineError;

/// One worker process and its socket.
pub struct WorkerProcess {
    child: Child,
    conn: Framed<UnixStream, LengthDelimitedCodec>,
    /// The worker's id, for log lines.
    pub worker: String,
    /// What the process is called in messages ("python worker", "worker host").
    what: &'static str,
}

impl WorkerProcess {
    /// Listens on `sock` in a fresh socket file, runs `cmd` (which is told
    /// that path), waits for it to connect and say `ready` — or for the
    /// error that kept its code from loading — within `ready_timeout`.
    pub async fn start(
        mut cmd: Command,
        sock: &Path,
        worker: &str,
        what: &'static str,
        ready_timeout: Duration,
        max_frame_bytes: usize,
    ) -> Result<Self, EngineError> {
        let _ = tokio::fs::remove_file(sock).await;
        let listener = UnixListener::bind(sock)
            .map_err(|e| EngineError::Start(format!("{}: {e}", sock.display())))?;
        let mut child = cmd
            .env("VIRTUFIN_WORKER_ID", worker)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                EngineError::Start(format!(
                    "cannot run the {what} {}: {e}",
                    cmd.as_std().get_program().to_string_lossy()
                ))
            })?;
        if let Some(stderr) = child.stderr.take() {
            let w = worker.to_owned();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    tracing::warn!(worker = %w, "{what}: {l}");
                }
            });
        }
        // Biased to the connection: a process that connected, reported its
        // load error and exited is ready on both branches, and its frame
        // must be read, not lost to "exited before connecting".
        let stream = tokio::select! {
            biased;
            a = listener.accept() => a.map(|(s, _)| s).map_err(|e| EngineError::Start(e.to_string()))?,
            s = child.wait() => return Err(EngineError::Start(format!(
                "the {what} exited before connecting ({})",
                s.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string())
            ))),
            _ = tokio::time::sleep(ready_timeout) => return Err(EngineError::Start(format!(
                "the {what} did not connect within {ready_timeout:?}"
            ))),
        };
        // Connected: nothing else may come in through that path.
        let _ = tokio::fs::remove_file(sock).await;
        let mut p = Self {
            child,
            conn: Framed::new(stream, super::codec(max_frame_bytes)),
            worker: worker.to_owned(),
            what,
        };
        match p.recv(ready_timeout).await? {
            Frame::Ready => Ok(p),
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

    pub async fn send(&mut self, frame: &Frame) -> Result<(), EngineError> {
        match self.conn.send(Bytes::from(frame.to_bytes())).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.crashed(e.to_string()).await),
        }
    }

    /// The next frame within `timeout`.
    pub async fn recv(&mut self, timeout: Duration) -> Result<Frame, EngineError> {
        match tokio::time::timeout(timeout, self.conn.next()).await {
            Err(_) => Err(EngineError::Timeout(timeout)),
            Ok(None) => {
                let why = format!("the {} closed its socket", self.what);
                Err(self.crashed(why).await)
            }
            Ok(Some(Err(e))) => Err(self.crashed(e.to_string()).await),
            Ok(Some(Ok(b))) => Frame::from_bytes(&b)
                .map_err(|e| EngineError::Protocol(format!("a frame is not a known frame: {e}"))),
        }
    }

    /// The error for a process that went away, with its exit status (a
    /// signal, for a crash) when it can be had within a moment: the socket
    /// closes just before the process is reaped.
    async fn crashed(&mut self, why: String) -> EngineError {
        let status = tokio::time::timeout(Duration::from_millis(200), self.child.wait()).await;
        EngineError::Crashed(match status {
            Ok(Ok(s)) => format!("{why} (process {s})"),
            _ => why,
        })
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
            tracing::warn!(worker = %self.worker, "the {} ignored shutdown; killing it", self.what);
            let _ = self.child.kill().await;
        }
    }

    /// Kills the process at once (a hang or a timeout).
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}
