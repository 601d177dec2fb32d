//! Engines run worker code, chosen by MIME type.

use std::time::Duration;

pub mod native;
mod process;
pub mod python;

/// The framing both engines speak with their worker processes: a 4-byte
/// big-endian length, then the frame (`virtufin_worker_abi::frame`).
pub(crate) fn codec(max_frame_bytes: usize) -> tokio_util::codec::LengthDelimitedCodec {
    tokio_util::codec::LengthDelimitedCodec::builder()
        .length_field_length(4)
        .big_endian()
        .max_frame_length(max_frame_bytes)
        .new_codec()
}

/// What can go wrong while running worker code.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("the worker could not be started: {0}")]
    Start(String),
    #[error("the worker code did not load: {error_type}: {message}")]
    Load { error_type: String, message: String },
    #[error("the worker raised {error_type}: {message}")]
    User { error_type: String, message: String },
    #[error("the worker did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the worker process died: {0}")]
    Crashed(String),
    #[error("the worker broke the protocol: {0}")]
    Protocol(String),
}

impl EngineError {
    /// The `error_type` of `worker.error` events.
    pub fn error_type(&self) -> String {
        match self {
            EngineError::Start(_) => "start_failed".into(),
            EngineError::Load { error_type, .. } => format!("load:{error_type}"),
            EngineError::User { error_type, .. } => error_type.clone(),
            EngineError::Timeout(_) => "timeout".into(),
            EngineError::Crashed(_) => "crashed".into(),
            EngineError::Protocol(_) => "protocol".into(),
        }
    }

    /// Whether the process must be replaced before the next event.
    pub fn needs_restart(&self) -> bool {
        matches!(
            self,
            EngineError::Timeout(_) | EngineError::Crashed(_) | EngineError::Protocol(_)
        )
    }
}

/// The engines, by MIME type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Python,
    Native,
    DotNetDll,
    CSharp,
}

impl Kind {
    pub fn from_mime(mime: &str) -> Option<Self> {
        match mime.split(';').next().unwrap_or("").trim() {
            "text/x-python" => Some(Kind::Python),
            "application/x-native-dll" => Some(Kind::Native),
            "application/x-dotnet-dll" => Some(Kind::DotNetDll),
            "text/x-csharp" => Some(Kind::CSharp),
            _ => None,
        }
    }

    pub fn language(self) -> &'static str {
        match self {
            Kind::Python => "python",
            Kind::Native => "native",
            Kind::DotNetDll => "dotnet",
            Kind::CSharp => "csharp",
        }
    }
}

/// A running worker process, whichever engine runs it. A .NET engine
/// would be a third variant: a host process speaking the same frames.
pub enum Engine {
    Python(python::PythonEngine),
    Native(native::NativeEngine),
}

impl Engine {
    /// Starts the engine `kind` on `code` in `dir`, its process limited to
    /// `memory_limit_bytes` of address space (0: none).
    pub async fn start(
        kind: Kind,
        config: &crate::Config,
        memory_limit_bytes: u64,
        worker: &str,
        code: &[u8],
        dir: &std::path::Path,
    ) -> Result<Self, EngineError> {
        match kind {
            Kind::Python => {
                let options = python::PythonOptions {
                    memory_limit_bytes,
                    ..config.python_options()
                };
                python::PythonEngine::start(&options, worker, code, dir)
                    .await
                    .map(Engine::Python)
            }
            Kind::Native => {
                let options = native::NativeOptions {
                    memory_limit_bytes,
                    ..config.native_options()
                };
                native::NativeEngine::start(&options, worker, code, dir)
                    .await
                    .map(Engine::Native)
            }
            Kind::DotNetDll | Kind::CSharp => Err(EngineError::Start(format!(
                "{} workers need a .NET host, which this workmanager does not have",
                kind.language()
            ))),
        }
    }

    pub async fn process(
        &mut self,
        event: serde_json::Value,
        timeout: Duration,
        gateway: &dyn native::GatewayCaller,
    ) -> Result<Option<serde_json::Value>, EngineError> {
        match self {
            Engine::Python(e) => e.process(event, timeout).await,
            Engine::Native(e) => e.process(event, timeout, gateway).await,
        }
    }

    pub async fn ping(&mut self, timeout: Duration) -> Result<(), EngineError> {
        match self {
            Engine::Python(e) => e.ping(timeout).await,
            Engine::Native(e) => e.ping(timeout).await,
        }
    }

    pub async fn shutdown(self) {
        match self {
            Engine::Python(e) => e.shutdown().await,
            Engine::Native(e) => e.shutdown().await,
        }
    }

    pub async fn kill(self) {
        match self {
            Engine::Python(e) => e.kill().await,
            Engine::Native(e) => e.kill().await,
        }
    }
}
