//! Plumbing shared by the Virtufin services: command-line/environment
//! configuration helpers, systemd readiness and watchdog, logging to the
//! journal, the HTTP health endpoints and graceful shutdown.

pub mod audit;
pub mod auth;
pub mod config;
pub mod error;
pub mod file;
pub mod grpc_health;
pub mod health;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod reload;
pub mod serve;
pub mod shutdown;
pub mod trace;
pub mod trace_layer;
pub mod validate;

pub use error::ApiError;
pub use health::{Check, Health};
pub use notify::Notifier;
