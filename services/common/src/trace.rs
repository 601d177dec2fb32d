//! W3C trace context (<https://www.w3.org/TR/trace-context/>): the
//! `traceparent` a caller sends becomes the parent of this service's span,
//! and that span's context travels on in the events the service publishes
//! and the calls it makes, so one request can be followed across the
//! services in the journal (`TRACE_ID=`).
//!
//! No OpenTelemetry: nothing here exports spans; the ids are logged (the
//! span fields `trace_id` and `span_id`) and propagated, which is all the
//! services need to tie their log lines together.
//!
//! Parsing follows the spec strictly for version `00`: exactly 55
//! characters, lowercase hex, trace id and parent id not all zeros. A
//! header of a later version (`01`…`fe`) is read by the spec's
//! forward-compatibility rule — its first 55 characters as version 00,
//! then either the end or a `-` — and propagated as version 00 (the only
//! one we can write). Version `ff` is invalid. An invalid `traceparent`
//! never fails a call: it is ignored (a new root trace starts) and logged
//! at debug; its `tracestate` is dropped with it, as the spec requires.
//! A valid `tracestate` is passed on unchanged (up to
//! [`MAX_TRACESTATE_BYTES`] of visible ASCII and spaces, else dropped).

use std::{fmt::Write as _, future::Future};

/// The header / metadata key carrying the trace context.
pub const TRACEPARENT: &str = "traceparent";
/// The header / metadata key carrying vendor state, passed on unchanged.
pub const TRACESTATE: &str = "tracestate";
/// The CloudEvent extension attribute carrying the trace context (as
/// `PublishEvent` metadata: `ce-traceparent`).
pub const CE_TRACEPARENT: &str = "ce-traceparent";
/// The CloudEvent extension attribute carrying vendor state.
pub const CE_TRACESTATE: &str = "ce-tracestate";
/// Longest `tracestate` passed on (the api's limit for one metadata
/// value); a longer one is dropped.
pub const MAX_TRACESTATE_BYTES: usize = 4096;

/// Why a `traceparent` was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraceParseError {
    #[error(
        "traceparent must be 55 characters for version 00 (at least 55 for later ones), got {0}"
    )]
    Length(usize),
    #[error("traceparent version '{0}' is not valid")]
    Version(String),
    #[error("traceparent is not version-traceid-parentid-flags in lowercase hex")]
    Format,
    #[error("traceparent has an all-zero trace id")]
    ZeroTraceId,
    #[error("traceparent has an all-zero parent id")]
    ZeroParentId,
}

/// One span's place in a trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    /// The span this one is a child of (all zeros for a root span).
    pub parent_span: [u8; 8],
    pub span_id: [u8; 8],
    /// The trace flags (bit 0: sampled), passed on as received.
    pub flags: u8,
    /// The caller's `tracestate`, passed on unchanged.
    pub tracestate: Option<String>,
}

fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

/// Lowercase hex only (the spec: "HEXDIGLC").
fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let b = s.as_bytes();
    if b.len() != N * 2 {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = (digit(b[2 * i])? << 4) | digit(b[2 * i + 1])?;
    }
    Some(out)
}

fn random16() -> [u8; 16] {
    // A v4 UUID: 122 random bits, the 7 rightmost bytes all random (what
    // trace-context level 2 asks of a random trace id).
    uuid::Uuid::new_v4().into_bytes()
}

fn random_span_id() -> [u8; 8] {
    loop {
        let u = random16();
        // Skip the UUID's version (byte 6) and variant (byte 8) bits.
        let id = [u[0], u[1], u[2], u[3], u[4], u[5], u[9], u[10]];
        if id != [0; 8] {
            return id;
        }
    }
}

impl TraceContext {
    /// Parses a `traceparent` (and its `tracestate`): the caller's span,
    /// whose [`child`](Self::child) this service's span becomes.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Result<Self, TraceParseError> {
        let tp = traceparent.trim_matches([' ', '\t']);
        if !tp.is_ascii() {
            return Err(TraceParseError::Format);
        }
        let version = tp.get(..2).ok_or(TraceParseError::Length(tp.len()))?;
        let version = unhex::<1>(version)
            .map(|v| v[0])
            .ok_or_else(|| TraceParseError::Version(version.to_owned()))?;
        match version {
            0xff => return Err(TraceParseError::Version("ff".into())),
            0 if tp.len() != 55 => return Err(TraceParseError::Length(tp.len())),
            // A later version: its first 55 characters as version 00,
            // followed by the end or a '-'.
            _ if tp.len() < 55 || (tp.len() > 55 && tp.as_bytes()[55] != b'-') => {
                return Err(TraceParseError::Length(tp.len()));
            }
            _ => {}
        }
        let b = tp.as_bytes();
        if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return Err(TraceParseError::Format);
        }
        let trace_id = unhex::<16>(&tp[3..35]).ok_or(TraceParseError::Format)?;
        let span_id = unhex::<8>(&tp[36..52]).ok_or(TraceParseError::Format)?;
        let flags = unhex::<1>(&tp[53..55]).ok_or(TraceParseError::Format)?[0];
        if trace_id == [0; 16] {
            return Err(TraceParseError::ZeroTraceId);
        }
        if span_id == [0; 8] {
            return Err(TraceParseError::ZeroParentId);
        }
        // Of a later version only the flags version 00 knows (sampled).
        let flags = if version == 0 { flags } else { flags & 0x01 };
        Ok(Self {
            trace_id,
            parent_span: [0; 8],
            span_id,
            flags,
            tracestate: tracestate.and_then(clean_tracestate),
        })
    }

    /// The context of a call that carried `traceparent`/`tracestate`: a
    /// child of the caller's span, or, without a (valid) traceparent, a
    /// new root. An invalid one is logged at debug, never refused.
    pub fn incoming(traceparent: Option<&str>, tracestate: Option<&str>) -> Self {
        match traceparent {
            None => Self::new_root(),
            Some(tp) => match Self::parse(tp, tracestate) {
                Ok(parent) => parent.child(),
                Err(e) => {
                    tracing::debug!(traceparent = %crate::validate::clip(tp), error = %e, "invalid traceparent ignored; starting a new trace");
                    Self::new_root()
                }
            },
        }
    }

    /// A new trace: random trace and span ids, sampled (every span of
    /// ours is logged).
    pub fn new_root() -> Self {
        Self {
            trace_id: random16(),
            parent_span: [0; 8],
            span_id: random_span_id(),
            flags: 0x01,
            tracestate: None,
        }
    }

    /// A span under this one: same trace, flags and tracestate, a new span
    /// id.
    pub fn child(&self) -> Self {
        Self {
            trace_id: self.trace_id,
            parent_span: self.span_id,
            span_id: random_span_id(),
            flags: self.flags,
            tracestate: self.tracestate.clone(),
        }
    }

    /// `traceparent` naming this span as the parent (version 00).
    pub fn to_header(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.span_id),
            self.flags
        )
    }

    /// The trace id as 32 lowercase hex digits (the `TRACE_ID=` journal
    /// field).
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// The span id as 16 lowercase hex digits.
    pub fn span_id_hex(&self) -> String {
        hex(&self.span_id)
    }

    /// The parent span's id (16 zeros for a root).
    pub fn parent_span_hex(&self) -> String {
        hex(&self.parent_span)
    }

    /// A `tracing` span carrying this context's ids, for work that is not
    /// a gRPC or HTTP call (an event being handled, a connection).
    pub fn span(&self, what: &str) -> tracing::Span {
        tracing::info_span!(
            "trace",
            what,
            trace_id = %self.trace_id_hex(),
            span_id = %self.span_id_hex()
        )
    }

    /// Puts `traceparent` (and `tracestate`) in a gRPC request's metadata.
    pub fn inject(&self, md: &mut tonic::metadata::MetadataMap) {
        if let Ok(v) = self.to_header().parse() {
            md.insert(TRACEPARENT, v);
        }
        match self.tracestate.as_deref().and_then(|s| s.parse().ok()) {
            Some(v) => {
                md.insert(TRACESTATE, v);
            }
            None => {
                md.remove(TRACESTATE);
            }
        }
    }

    /// Stamps `ce-traceparent` (and `ce-tracestate`) on `PublishEvent`
    /// metadata, unless the event already names a traceparent.
    pub fn stamp(&self, metadata: &mut std::collections::HashMap<String, String>) {
        if metadata
            .keys()
            .any(|k| k.eq_ignore_ascii_case(CE_TRACEPARENT))
        {
            return;
        }
        metadata.insert(CE_TRACEPARENT.to_owned(), self.to_header());
        metadata.retain(|k, _| !k.eq_ignore_ascii_case(CE_TRACESTATE));
        if let Some(ts) = &self.tracestate {
            metadata.insert(CE_TRACESTATE.to_owned(), ts.clone());
        }
    }

    /// The context of a gRPC request: what the trace layer put in its
    /// extensions, else the one in force in this task, else a new root.
    pub fn of<T>(req: &tonic::Request<T>) -> Self {
        req.extensions()
            .get::<Self>()
            .cloned()
            .or_else(current)
            .unwrap_or_else(Self::new_root)
    }

    /// From HTTP headers or gRPC metadata (which are HTTP headers): a child
    /// of the caller's span or a new root. Several `traceparent` headers
    /// are invalid (the spec); several `tracestate` headers are joined.
    pub fn from_headers(h: &http::HeaderMap) -> Self {
        let mut tps = h.get_all(TRACEPARENT).iter();
        let tp = match (tps.next(), tps.next()) {
            (Some(v), None) => Some(v.to_str().unwrap_or("\u{fffd}")),
            (None, _) => None,
            (Some(_), Some(_)) => {
                tracing::debug!("several traceparent headers ignored; starting a new trace");
                return Self::new_root();
            }
        };
        let states: Vec<&str> = h
            .get_all(TRACESTATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        let ts = (!states.is_empty()).then(|| states.join(","));
        Self::incoming(tp, ts.as_deref())
    }
}

/// A tracestate fit to pass on: visible ASCII and spaces, bounded; else
/// none (the spec lets a vendor drop what it cannot keep).
fn clean_tracestate(s: &str) -> Option<String> {
    let s = s.trim_matches([' ', '\t']);
    let ok = !s.is_empty()
        && s.len() <= MAX_TRACESTATE_BYTES
        && s.bytes()
            .all(|b| b == b' ' || b == b'\t' || b.is_ascii_graphic());
    ok.then(|| s.to_owned())
}

tokio::task_local! {
    static CURRENT: TraceContext;
}

/// The trace context in force in this task: set by the trace layer around
/// every gRPC and HTTP call, and by the services around the work they do
/// for one event. Outgoing api calls (`virtufin-api-client`) and the dapr
/// backend's calls to daprd carry it.
pub fn current() -> Option<TraceContext> {
    CURRENT.try_with(TraceContext::clone).ok()
}

/// Runs `f` with `ctx` as the [`current`] context.
pub fn scope<F: Future>(
    ctx: TraceContext,
    f: F,
) -> tokio::task::futures::TaskLocalFuture<TraceContext, F> {
    CURRENT.scope(ctx, f)
}

/// Runs `f` (synchronous) with `ctx` as the [`current`] context.
pub fn sync_scope<R>(ctx: TraceContext, f: impl FnOnce() -> R) -> R {
    CURRENT.sync_scope(ctx, f)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const TP: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn parses_the_spec_example_and_writes_it_back() {
        let c = TraceContext::parse(TP, Some("congo=t61rcWkgMzE")).unwrap();
        assert_eq!(c.trace_id_hex(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(c.span_id_hex(), "b7ad6b7169203331");
        assert_eq!(c.flags, 1);
        assert_eq!(c.to_header(), TP);
        assert_eq!(c.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
    }

    #[test]
    fn a_child_keeps_the_trace_and_names_its_parent() {
        let parent = TraceContext::parse(TP, Some("a=1")).unwrap();
        let c = parent.child();
        assert_eq!(c.trace_id, parent.trace_id);
        assert_eq!(c.parent_span, parent.span_id);
        assert_ne!(c.span_id, parent.span_id);
        assert_ne!(c.span_id, [0; 8]);
        assert_eq!((c.flags, c.tracestate.as_deref()), (1, Some("a=1")));
        let h = c.to_header();
        assert!(h.starts_with("00-0af7651916cd43dd8448eb211c80319c-"), "{h}");
        assert_eq!(TraceContext::parse(&h, None).unwrap().span_id, c.span_id);
    }

    #[test]
    fn roots_are_fresh_and_valid() {
        let (a, b) = (TraceContext::new_root(), TraceContext::new_root());
        assert_ne!(a.trace_id, b.trace_id);
        assert_eq!(a.parent_span, [0; 8]);
        let back = TraceContext::parse(&a.to_header(), None).unwrap();
        assert_eq!((back.trace_id, back.span_id), (a.trace_id, a.span_id));
    }

    #[test]
    fn refuses_bad_headers() {
        let tail = format!("{TP}-");
        let upper = TP.to_uppercase();
        let bad = [
            ("", "empty"),
            ("00", "short"),
            (&TP[..54], "one short"),
            (tail.as_str(), "version 00 with a tail"),
            (upper.as_str(), "uppercase hex"),
            (
                "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
                "uppercase trace id",
            ),
            (
                "00-00000000000000000000000000000000-b7ad6b7169203331-01",
                "zero trace id",
            ),
            (
                "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
                "zero parent id",
            ),
            (
                "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                "version ff",
            ),
            (
                "0g-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                "version not hex",
            ),
            (
                "00_0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                "wrong separator",
            ),
            (
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333-101",
                "short parent id",
            ),
            (
                "00-0af7651916cd43dd8448eb211c80319g-b7ad6b7169203331-01",
                "not hex",
            ),
            (
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0x",
                "flags not hex",
            ),
            (
                "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01x",
                "later version, no dash",
            ),
            (
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\u{e9}",
                "non-ASCII",
            ),
        ];
        for (h, why) in bad {
            assert!(TraceContext::parse(h, None).is_err(), "{why}: {h}");
        }
    }

    #[test]
    fn later_versions_parse_forward_compatibly() {
        let v = "cc-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-03-what-the-future-adds";
        let c = TraceContext::parse(v, None).unwrap();
        assert_eq!(c.trace_id_hex(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(c.flags, 1, "only the sampled flag is known");
        assert!(c.to_header().starts_with("00-"), "propagated as version 00");
        let exact = "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        assert!(TraceContext::parse(exact, None).is_ok());
    }

    #[test]
    fn an_invalid_traceparent_starts_a_new_trace_and_drops_its_state() {
        let c = TraceContext::incoming(Some("00-garbage"), Some("a=1"));
        assert_eq!(c.parent_span, [0; 8]);
        assert_eq!(c.tracestate, None);
        let c = TraceContext::incoming(Some(TP), Some("a=1"));
        assert_eq!(c.trace_id_hex(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(c.parent_span_hex(), "b7ad6b7169203331");
    }

    #[test]
    fn tracestate_passes_unchanged_or_not_at_all() {
        let s = "rojo=00f067aa0ba902b7, congo=t61rcWkgMzE";
        let c = TraceContext::parse(TP, Some(s)).unwrap();
        assert_eq!(c.tracestate.as_deref(), Some(s));
        let long = "a=".to_owned() + &"x".repeat(MAX_TRACESTATE_BYTES);
        assert_eq!(
            TraceContext::parse(TP, Some(&long)).unwrap().tracestate,
            None
        );
        assert_eq!(
            TraceContext::parse(TP, Some("a=\u{1}")).unwrap().tracestate,
            None
        );
    }

    #[test]
    fn headers_several_traceparents_are_invalid_several_tracestates_join() {
        let mut h = http::HeaderMap::new();
        h.append(TRACEPARENT, TP.parse().unwrap());
        h.append(TRACESTATE, "a=1".parse().unwrap());
        h.append(TRACESTATE, "b=2".parse().unwrap());
        let c = TraceContext::from_headers(&h);
        assert_eq!(c.trace_id_hex(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(c.tracestate.as_deref(), Some("a=1,b=2"));
        h.append(TRACEPARENT, TP.parse().unwrap());
        let c = TraceContext::from_headers(&h);
        assert_ne!(c.trace_id_hex(), "0af7651916cd43dd8448eb211c80319c");
    }

    #[test]
    fn stamp_keeps_a_given_traceparent() {
        let c = TraceContext::parse(TP, Some("a=1")).unwrap();
        let mut md = std::collections::HashMap::new();
        c.stamp(&mut md);
        assert_eq!(md.get(CE_TRACEPARENT).map(String::as_str), Some(TP));
        assert_eq!(md.get(CE_TRACESTATE).map(String::as_str), Some("a=1"));
        let other = TraceContext::new_root();
        other.stamp(&mut md);
        assert_eq!(md.get(CE_TRACEPARENT).map(String::as_str), Some(TP));
    }

    #[tokio::test]
    async fn current_is_the_scoped_context() {
        assert_eq!(current(), None);
        let c = TraceContext::new_root();
        let seen = scope(c.clone(), async { current() }).await;
        assert_eq!(seen, Some(c));
    }
}
