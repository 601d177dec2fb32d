//! W3C `traceparent`/`tracestate` as callers send them (gRPC metadata,
//! HTTP headers, the CloudEvent extension): what parses must write back a
//! header that parses to the same trace, and a child keeps the trace id.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtufin_common::trace::TraceContext;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The first line is the traceparent, the rest (if any) the tracestate.
    let (parent, state) = match text.split_once('\n') {
        Some((p, s)) => (p, Some(s)),
        None => (text, None),
    };
    let incoming = TraceContext::incoming(Some(parent), state);
    let header = incoming.to_header();
    let again = TraceContext::parse(&header, incoming.tracestate.as_deref())
        .unwrap_or_else(|e| panic!("our own header {header:?} does not parse: {e}"));
    assert_eq!(again.trace_id, incoming.trace_id);
    assert_eq!(again.span_id, incoming.span_id);
    assert_eq!(again.flags, incoming.flags);
    // What is passed on stays as it is when passed on again.
    assert_eq!(again.tracestate, incoming.tracestate);
    if let Ok(ctx) = TraceContext::parse(parent, state) {
        assert_eq!(ctx.child().trace_id, ctx.trace_id);
    }
});
