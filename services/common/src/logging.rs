//! Logging: to the journal when systemd connected stderr to it
//! (`JOURNAL_STREAM` is set), to stderr otherwise. In the journal the
//! fields of an event and of its spans are journal fields of the same name
//! in upper case, without a prefix (`trace_id` → `TRACE_ID=`).
//!
//! The filter: the contents of the file `LOG_FILTER_FILE` names, when set
//! and the file exists, else `RUST_LOG`, else `info`. A reload (SIGHUP,
//! `systemctl reload`) reads it again ([`reload_filter`]): the file is what
//! can change while the service runs (the environment cannot).

use std::sync::OnceLock;

use tracing_subscriber::{
    EnvFilter, Registry, layer::SubscriberExt, reload, util::SubscriberInitExt,
};

/// The environment variable naming the log filter file.
pub const LOG_FILTER_FILE: &str = "LOG_FILTER_FILE";

static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// The filter wanted now and where it comes from; an error names the file
/// and the bad directive.
fn wanted() -> Result<(EnvFilter, String), String> {
    if let Some(path) = std::env::var_os(LOG_FILTER_FILE).filter(|p| !p.is_empty()) {
        let path = std::path::PathBuf::from(path);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                // One directive list; lines and '#' comments allowed.
                let directives: Vec<&str> = text
                    .lines()
                    .map(|l| l.split('#').next().unwrap_or("").trim())
                    .filter(|l| !l.is_empty())
                    .collect();
                let spec = directives.join(",");
                return EnvFilter::try_new(&spec)
                    .map(|f| (f, format!("'{spec}' from {}", path.display())))
                    .map_err(|e| {
                        format!(
                            "log filter file {}: '{spec}' is not a valid filter ({e}); e.g. info or info,virtufin_api=debug",
                            path.display()
                        )
                    });
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(format!(
                    "cannot read the log filter file {}: {e}",
                    path.display()
                ));
            }
        }
    }
    match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => EnvFilter::try_new(&spec)
            .map(|f| (f, format!("'{spec}' from RUST_LOG")))
            .map_err(|e| format!("RUST_LOG='{spec}' is not a valid filter: {e}")),
        _ => Ok((EnvFilter::new("info"), "'info' (the default)".to_owned())),
    }
}

/// Installs the global subscriber. `identifier` becomes the journal's
/// `SYSLOG_IDENTIFIER`.
pub fn init(identifier: &str) {
    let (filter, bad) = match wanted() {
        Ok((f, _)) => (f, None),
        Err(e) => (EnvFilter::new("info"), Some(e)),
    };
    let (filter, handle) = reload::Layer::new(filter);
    let _ = FILTER.set(handle);
    let journald = if std::env::var_os("JOURNAL_STREAM").is_some() {
        match tracing_journald::layer() {
            // Fields unprefixed (tracing-journald's default is `F_`): a
            // span's `trace_id` is `TRACE_ID=`, an audit line's `caller` is
            // `CALLER=` (`journalctl TRACE_ID=…`). No field of ours is named
            // like a journal field (MESSAGE, PRIORITY, CODE_*, ERRNO,
            // SYSLOG_*, TARGET, SPAN_*, UNIT, TID, INVOCATION_ID, …).
            Ok(layer) => Some(
                layer
                    .with_syslog_identifier(identifier.to_owned())
                    .with_field_prefix(None),
            ),
            Err(e) => {
                eprintln!("journald unavailable ({e}); logging to stderr");
                None
            }
        }
    } else {
        None
    };
    let stderr = journald
        .is_none()
        .then(|| tracing_subscriber::fmt::layer().with_writer(std::io::stderr));
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(journald)
        .with(stderr)
        .try_init();
    if let Some(e) = bad {
        tracing::warn!("{e}; logging at 'info'");
    }
}

/// Reads the log filter again (see the module's doc) and puts it in force;
/// an invalid one is refused and the current filter stays.
pub fn reload_filter() -> Result<String, String> {
    let Some(handle) = FILTER.get() else {
        return Ok("log filter: not reloadable here".to_owned());
    };
    let (filter, from) = wanted()?;
    handle
        .reload(filter)
        .map_err(|e| format!("cannot change the log filter: {e}"))?;
    Ok(format!("log filter {from}"))
}

/// Installs a stderr subscriber for tests (idempotent).
pub fn init_for_tests() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_test_writer())
        .try_init();
}
