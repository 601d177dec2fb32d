//! systemd's notify protocol: `READY=1` once the readiness checks hold,
//! `STATUS=` saying what the service waits for, `WATCHDOG=1` only while the
//! service is live, `STOPPING=1` on shutdown. Outside systemd (no
//! `NOTIFY_SOCKET`) every call is a no-op.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::Health;

/// How often a changed `STATUS=` reason is passed on at the latest.
const STATUS_REFRESH: Duration = Duration::from_secs(1);

/// Sends notifications to the service manager.
#[derive(Debug, Clone, Copy, Default)]
pub struct Notifier;

impl Notifier {
    fn send(&self, states: &[NotifyState<'_>]) {
        if let Err(e) = sd_notify::notify(states) {
            tracing::warn!(error = %e, "sd_notify failed");
        }
    }

    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(status)]);
    }

    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// `RELOADING=1` with `MONOTONIC_USEC=` (which `Type=notify-reload`
    /// requires, systemd ≥ 253); `READY=1` ([`Notifier::ready`]) ends it.
    pub fn reloading(&self, status: &str) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now, NotifyState::Status(status)]),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read CLOCK_MONOTONIC for MONOTONIC_USEC");
                self.send(&[NotifyState::Reloading, NotifyState::Status(status)]);
            }
        }
    }

    /// `EXTEND_TIMEOUT_USEC=`: the start (or stop) may take `by` longer
    /// from now than `TimeoutStartSec=` allows.
    pub fn extend_timeout(&self, by: Duration, status: &str) {
        let usec = u32::try_from(by.as_micros()).unwrap_or(u32::MAX);
        self.send(&[
            NotifyState::ExtendTimeoutUsec(usec),
            NotifyState::Status(status),
        ]);
    }

    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }

    /// Follows `health`: sends `STATUS=waiting for …` while it is not ready,
    /// `READY=1` the first time it is (and `STATUS=` on every later change),
    /// and `WATCHDOG=1` at half the `WatchdogSec=` interval while it is live.
    /// Ends when `shutdown` is cancelled.
    pub async fn follow(self, health: Health, service: &str, shutdown: CancellationToken) {
        let watchdog = sd_notify::watchdog_enabled();
        let mut ready_rx = health.ready_watch();
        let mut sent_ready = false;
        let mut last_status = String::new();
        let mut tick = tokio::time::interval(
            watchdog
                .map(|d| d / 2)
                .unwrap_or(STATUS_REFRESH)
                .clamp(Duration::from_millis(10), STATUS_REFRESH),
        );
        loop {
            let status = match health.first_failure() {
                None if health.is_ready() => format!("{service} ready"),
                None => format!("{service} starting"),
                Some((check, why)) => format!("waiting for {check}: {why}"),
            };
            if health.is_ready() && !sent_ready {
                sent_ready = true;
                tracing::info!("{status}");
                self.ready(&status);
                last_status = status;
            } else if status != last_status {
                tracing::info!(status = %status, "status");
                self.status(&status);
                last_status = status;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ready_rx.changed() => {}
                _ = tick.tick() => {
                    if watchdog.is_some() {
                        if health.is_live() {
                            self.send(&[NotifyState::Watchdog]);
                        } else {
                            tracing::warn!("not live: withholding the watchdog ping");
                        }
                    }
                    // Checks' details can change without flipping readiness.
                }
            }
        }
    }
}

/// Progress of a long startup step (restoring connections, recovering
/// workers): each [`StartupProgress::step`] tells systemd, with
/// `EXTEND_TIMEOUT_USEC=`, that the start goes on for [`Self::EXTENSION`]
/// more. Only progress extends: a step that hangs lets `TimeoutStartSec=`
/// fire, so the units can keep it tight. At most one message per
/// [`Self::MIN_INTERVAL`]; nothing once `health` is ready (the start is over).
#[derive(Debug, Clone)]
pub struct StartupProgress {
    health: Option<Health>,
    last: std::sync::Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

impl StartupProgress {
    /// How much longer each step lets the start take.
    pub const EXTENSION: Duration = Duration::from_secs(20);
    /// Steps closer together than this send one message.
    pub const MIN_INTERVAL: Duration = Duration::from_secs(1);

    /// Progress reported while `health` is not yet ready.
    pub fn new(health: &Health) -> Self {
        Self {
            health: Some(health.clone()),
            last: Default::default(),
        }
    }

    /// Reports nothing (the same work done later, on request).
    pub fn none() -> Self {
        Self {
            health: None,
            last: Default::default(),
        }
    }

    /// One step done (or begun): `status` says where the startup is.
    pub fn step(&self, status: &str) {
        let Some(h) = &self.health else { return };
        if h.is_ready() {
            return;
        }
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < Self::MIN_INTERVAL) {
            return;
        }
        *last = Some(now);
        tracing::debug!(status, "startup progress: extending the start timeout");
        Notifier.extend_timeout(Self::EXTENSION, status);
    }
}

/// The receiving end of the notify protocol, for supervisors that start
/// services themselves (`virtufin up`) and for tests: a datagram socket
/// whose path goes into the child's `NOTIFY_SOCKET`.
#[derive(Debug)]
pub struct Listener {
    socket: tokio::net::UnixDatagram,
    path: std::path::PathBuf,
}

impl Listener {
    /// Binds a socket at `path` (removing a stale one first).
    pub fn bind(path: impl Into<std::path::PathBuf>) -> std::io::Result<Self> {
        let path = path.into();
        let _ = std::fs::remove_file(&path);
        let socket = tokio::net::UnixDatagram::bind(&path)?;
        Ok(Self { socket, path })
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The next notification: one datagram such as `READY=1\nSTATUS=…`.
    pub async fn recv(&self) -> std::io::Result<String> {
        let mut buf = vec![0u8; 4096];
        let n = self.socket.recv(&mut buf).await?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The value of `NAME=` in a notification, if present.
pub fn field<'a>(message: &'a str, name: &str) -> Option<&'a str> {
    message
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
}
