//! Engines run worker code, chosen by MIME type.

use std::time::Duration;

pub mod python;

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
