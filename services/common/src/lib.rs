//! Plumbing shared by the Virtufin services: command-line/environment
//! configuration helpers, systemd readiness and watchdog, logging to the
//! journal, the HTTP health endpoints and graceful shutdown.

pub mod config;
pub mod health;
pub mod logging;
pub mod notify;
pub mod shutdown;

pub use health::{Check, Health};
pub use notify::Notifier;
