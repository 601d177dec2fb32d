//! Reading configuration files that operators change under a running
//! service (the Gateway's services file, API keys, credentials).
//!
//! A file is rewritten in place (`cat > f`, `std::fs::write`, most config
//! tools: truncate, then write), written slowly in chunks (an editor, a
//! copy over the network), renamed over (atomic), or deleted and created
//! again. A reader that happens to look in between sees an empty or
//! truncated file — and a truncated YAML file can still parse, with fewer
//! entries. [`read_settled`] only returns content that has stopped
//! changing: the file's identity, size and change times must have held
//! still for [`QUIET`] (measured by the file's change time, or watched),
//! and must be the same before and after the read. An empty file is an
//! error, never "no configuration": an intentionally empty configuration
//! is spelled out (`{"services": []}`, `{"keys": []}`).

use std::{
    io::ErrorKind,
    os::unix::fs::MetadataExt,
    path::Path,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

/// How long a file must have stopped changing before it is taken.
pub const QUIET: Duration = Duration::from_millis(200);
/// How long [`read_settled`] waits for a file that keeps changing.
pub const MAX_WAIT: Duration = Duration::from_secs(10);
/// How often a changing file is looked at again.
const STEP: Duration = Duration::from_millis(25);

/// Why a file could not be taken. The caller keeps what it had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("cannot read {path}: {reason}")]
    Io {
        path: String,
        kind: ErrorKind,
        reason: String,
    },
    #[error(
        "{path} is empty (a file being rewritten looks like this); an intentionally empty configuration must be spelled out"
    )]
    Empty { path: String },
    #[error("{path} is not UTF-8 text")]
    NotUtf8 { path: String },
    #[error("{path} kept changing for {waited_ms} ms; not taken until it holds still")]
    Unsettled { path: String, waited_ms: u128 },
}

impl ReadError {
    /// What is wrong, without the path (for messages that name the file
    /// themselves).
    pub fn reason(&self) -> String {
        match self {
            Self::Io { reason, .. } => reason.clone(),
            Self::Empty { .. } => "the file is empty (a file being rewritten looks like this); an intentionally empty configuration must be spelled out".into(),
            Self::NotUtf8 { .. } => "the file is not UTF-8 text".into(),
            Self::Unsettled { waited_ms, .. } => {
                format!("the file kept changing for {waited_ms} ms; not taken until it holds still")
            }
        }
    }
}

/// What changes when a file is written, replaced or touched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Self {
        Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }

    /// How long ago the file last changed by its change time (which, unlike
    /// the modification time, no tool can set back). Zero if it is in the
    /// future (clock skew): then the file has to be watched instead.
    fn age(&self, now: SystemTime) -> Duration {
        let (s, ns) = self.ctime;
        let Ok(s) = u64::try_from(s) else {
            return Duration::MAX;
        };
        let changed = UNIX_EPOCH + Duration::new(s, u32::try_from(ns).unwrap_or(0));
        now.duration_since(changed).unwrap_or(Duration::ZERO)
    }
}

/// The text of the file at `path` once it has stopped changing (see the
/// module docs). Follows symlinks (systemd credentials, Kubernetes config
/// maps). Blocks for up to [`QUIET`] after a change (at most [`MAX_WAIT`]
/// for a file that keeps changing): call it from a blocking context.
pub fn read_settled(path: &Path) -> Result<String, ReadError> {
    let shown = || path.display().to_string();
    let io = |e: std::io::Error| ReadError::Io {
        path: shown(),
        kind: e.kind(),
        reason: e.to_string(),
    };
    let start = Instant::now();
    // The last stamp seen and since when it has held.
    let mut seen: Option<(Stamp, Instant)> = None;
    loop {
        let stamp = Stamp::of(&std::fs::metadata(path).map_err(io)?);
        let held = match seen {
            Some((s, since)) if s == stamp => since.elapsed(),
            _ => {
                seen = Some((stamp, Instant::now()));
                Duration::ZERO
            }
        };
        if stamp.age(SystemTime::now()) >= QUIET || held >= QUIET {
            let bytes = std::fs::read(path).map_err(io)?;
            let after = std::fs::metadata(path).map(|m| Stamp::of(&m));
            // Unchanged across the read and all of it read: a whole file.
            if after.as_ref().ok() == Some(&stamp) && bytes.len() as u64 == stamp.len {
                let text =
                    String::from_utf8(bytes).map_err(|_| ReadError::NotUtf8 { path: shown() })?;
                if text.trim().is_empty() {
                    return Err(ReadError::Empty { path: shown() });
                }
                return Ok(text);
            }
            seen = None;
        }
        if start.elapsed() >= MAX_WAIT {
            return Err(ReadError::Unsettled {
                path: shown(),
                waited_ms: start.elapsed().as_millis(),
            });
        }
        std::thread::sleep(STEP);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::io::Write;

    use super::*;

    #[test]
    fn an_old_file_is_read_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, "a: 1\n").unwrap();
        // Make it old by its change time's standard: wait it out once.
        assert_eq!(read_settled(&p).unwrap(), "a: 1\n");
        let t = Instant::now();
        assert_eq!(read_settled(&p).unwrap(), "a: 1\n");
        // Not a timing assertion on speed, only that no QUIET wait is taken
        // for a file that has not changed in a long time.
        assert!(t.elapsed() < MAX_WAIT);
    }

    #[test]
    fn empty_missing_and_binary_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, "").unwrap();
        assert!(matches!(read_settled(&p), Err(ReadError::Empty { .. })));
        std::fs::write(&p, " \n\t\n").unwrap();
        assert!(matches!(read_settled(&p), Err(ReadError::Empty { .. })));
        std::fs::write(&p, [0xff, 0xfe]).unwrap();
        assert!(matches!(read_settled(&p), Err(ReadError::NotUtf8 { .. })));
        let e = read_settled(&dir.path().join("missing")).unwrap_err();
        assert!(
            matches!(
                e,
                ReadError::Io {
                    kind: ErrorKind::NotFound,
                    ..
                }
            ),
            "{e:?}"
        );
    }

    /// A writer that pauses between chunks (for less than QUIET) is waited
    /// for: the reader, started after the first chunk, gets the whole file.
    #[test]
    fn a_file_written_slowly_is_taken_only_when_complete() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let whole: String = (0..40).map(|i| format!("line {i}\n")).collect();
        let mut f = std::fs::File::create(&p).unwrap();
        let (first, rest) = whole.as_bytes().split_at(7);
        f.write_all(first).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = {
            let p = p.clone();
            std::thread::spawn(move || {
                tx.send(()).unwrap();
                read_settled(&p)
            })
        };
        rx.recv().unwrap();
        for chunk in rest.chunks(11) {
            std::thread::sleep(Duration::from_millis(10));
            f.write_all(chunk).unwrap();
        }
        drop(f);
        assert_eq!(reader.join().unwrap().unwrap(), whole);
    }
}
