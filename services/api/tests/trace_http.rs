//! A W3C `traceparent` header on a REST call puts the api's log lines of
//! that call in the caller's trace, as gRPC metadata does (the same layer
//! serves both); a call without one starts a trace of its own.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Kind, ready, start};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rest_call_joins_the_callers_trace() {
    virtufin_testkit::logs::capture();
    let api = start(Kind::Memory).await;
    ready(&api).await;
    let http = reqwest::Client::new();
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let r = http
        .post(api.http_url("/v1/state/save-state"))
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .body(r#"{"service":"traced","key":"with","value":"v"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let lines = virtufin_testkit::logs::lines_with(&["state saved", "key=\"with\""]);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains(&format!("trace_id={trace_id}")),
        "the audit line is in the caller's trace: {}",
        lines[0]
    );
    assert!(
        !lines[0].contains("span_id=00f067aa0ba902b7"),
        "the api's span is a child of the caller's, not the caller's own: {}",
        lines[0]
    );

    let r = http
        .post(api.http_url("/v1/state/save-state"))
        .body(r#"{"service":"traced","key":"without","value":"v"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let lines = virtufin_testkit::logs::lines_with(&["state saved", "key=\"without\""]);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("trace_id="), "{}", lines[0]);
    assert!(
        !lines[0].contains(trace_id),
        "a call without a traceparent has a trace of its own: {}",
        lines[0]
    );
    api.stop().await;
}
