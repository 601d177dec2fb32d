//! Reload without restart (`Type=notify-reload`): systemd sends SIGHUP for
//! `systemctl reload`; the service answers `RELOADING=1` +
//! `MONOTONIC_USEC=`, reads again what can change while it runs (each
//! [`Part`]), says how that went in `STATUS=`, the journal and `/health`
//! (the note `reload`), and ends the reload with `READY=1`. A part that
//! fails keeps what it had: a bad file never takes a running service down
//! nor replaces good configuration.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::{Health, Notifier};

/// One thing a reload reads again: `Ok(what is in force now)` or
/// `Err(why the new one was refused)` (the old one then stays).
pub struct Part {
    pub name: &'static str,
    pub reload: Box<dyn Fn() -> Result<String, String> + Send + Sync>,
}

impl Part {
    pub fn new(
        name: &'static str,
        reload: impl Fn() -> Result<String, String> + Send + Sync + 'static,
    ) -> Self {
        Self {
            name,
            reload: Box::new(reload),
        }
    }
}

/// The parts every service has: the log filter.
pub fn common_parts() -> Vec<Part> {
    vec![Part::new("log filter", crate::logging::reload_filter)]
}

/// What one reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// `STATUS=` after the reload.
    pub status: String,
    /// Whether every part took its new configuration.
    pub ok: bool,
}

/// Runs every part once and says how it went (no notification).
pub fn reload_once(service: &str, parts: &[Part]) -> Outcome {
    let mut done = Vec::new();
    let mut refused = Vec::new();
    for p in parts {
        match (p.reload)() {
            Ok(what) => {
                tracing::info!(part = p.name, "reloaded: {what}");
                done.push(what);
            }
            Err(why) => {
                tracing::warn!(
                    part = p.name,
                    "reload refused, the previous {} stays: {why}",
                    p.name
                );
                refused.push(format!("{}: {why}", p.name));
            }
        }
    }
    if refused.is_empty() {
        Outcome {
            status: format!("{service} ready; reloaded ({})", done.join("; ")),
            ok: true,
        }
    } else {
        Outcome {
            status: format!(
                "{service} ready; reload refused, previous configuration kept: {}",
                refused.join("; ")
            ),
            ok: false,
        }
    }
}

/// Installs the SIGHUP handler now (so a reload can never kill the
/// process with SIGHUP's default action) and serves reloads until
/// `shutdown`.
pub fn on_sighup(
    service: &'static str,
    parts: Vec<Part>,
    health: Health,
    shutdown: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let mut hup = signal(SignalKind::hangup())?;
    let parts = std::sync::Arc::new(parts);
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                got = hup.recv() => if got.is_none() { return },
            }
            tracing::info!("SIGHUP: reloading");
            Notifier.reloading("reloading");
            // Reading a file waits until it has held still (settled
            // reads, up to seconds): off the async workers.
            let p = parts.clone();
            let outcome = match tokio::task::spawn_blocking(move || reload_once(service, &p)).await
            {
                Ok(o) => o,
                Err(e) => Outcome {
                    ok: false,
                    status: format!("{service}: reload failed: {e}"),
                },
            };
            health.set_note("reload", Some((outcome.ok, outcome.status.clone())));
            if outcome.ok {
                tracing::info!("{}", outcome.status);
            } else {
                tracing::warn!("{}", outcome.status);
            }
            Notifier.ready(&outcome.status);
        }
    }))
}
