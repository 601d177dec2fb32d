//! One trace across the api, the workmanager and a worker: the caller's
//! `traceparent` (gRPC metadata) reaches the event the api publishes, the
//! workmanager's handling of it, the worker's answer, the lifecycle events
//! and every service's log lines (`trace_id=`, `TRACE_ID=` in the journal).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use base64::Engine as _;
use common::*;
use serde_json::json;
use virtufin_api_client::{TraceContext, pb as api_pb};

/// The trace id of an event's `traceparent` (asserting it is valid).
fn trace_of(ev: &api_pb::TopicEventRequest) -> TraceContext {
    let tp = ext(ev, "traceparent").expect("the event has a traceparent");
    assert_eq!(
        ext(ev, "traceid").as_deref(),
        Some(tp.as_str()),
        "mirrored for daprd"
    );
    TraceContext::parse(&tp, None).unwrap()
}

fn with_traceparent<T>(msg: T, tp: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("traceparent", tp.parse().unwrap());
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_trace_across_the_api_the_workmanager_and_the_worker() {
    virtufin_testkit::logs::capture();
    let lines_with = virtufin_testkit::logs::lines_with;
    let create_trace = TraceContext::new_root();
    let event_trace = TraceContext::new_root();
    let fail_trace = TraceContext::new_root();

    let s = stack().await;
    let mut wm = wm(&s, |_| {}).await;
    // The workmanager as a Gateway backend of the api (hot reload).
    gateway_backend(&s, &wm).await;
    let mut status = subscribe(&s.api, virtufin_workmanager::STATUS_TOPIC).await;
    let mut inputs = subscribe(&s.api, "trace-in").await;
    let mut answers = subscribe(&s.api, "trace-out").await;

    // CreateWorker through the api's Gateway, in the caller's trace.
    let code = "def Process(event):\n    if event['data'].get('fail'):\n        raise ValueError('asked to fail')\n    return {'type': 'trace-out', 'data': {'ok': True}}\n";
    let req = with_traceparent(
        api_pb::InvokeJsonRequest {
            service: "workmanager".into(),
            method: "CreateWorker".into(),
            request_data: json!({"codeSource": {"content": base64::engine::general_purpose::STANDARD.encode(code)},
                "mimeType": "text/x-python", "topic": "trace-in"})
            .to_string(),
            timeout_ms: 0,
        },
        &create_trace.to_header(),
    );
    let r = s.api.gateway().invoke_json(req).await.unwrap().into_inner();
    let id = serde_json::from_str::<serde_json::Value>(&r.response_data).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let t1 = format!("trace_id={}", create_trace.trace_id_hex());
    // The api's Gateway call, the workmanager's call and the api's state
    // writes that call made: all in the caller's trace.
    let api_gw = lines_with(&["gateway call", "CreateWorker", &t1]);
    assert_eq!(api_gw.len(), 1, "{api_gw:?}");
    let wm_created = lines_with(&["worker created", &id, &t1]);
    assert_eq!(wm_created.len(), 1, "{wm_created:?}");
    let api_saves = lines_with(&["state saved", "service=\"workmanager\"", &t1]);
    assert!(
        !api_saves.is_empty(),
        "the workmanager's writes carry the trace to the api"
    );
    let created = loop {
        let ev = next(&mut status).await;
        let d: serde_json::Value = serde_json::from_slice(&ev.data).unwrap();
        if d["worker_id"] == id.as_str() {
            break ev;
        }
    };
    assert!(created.r#type.ends_with(".created"), "{}", created.r#type);
    assert_eq!(
        trace_of(&created).trace_id,
        create_trace.trace_id,
        "lifecycle event"
    );

    wm.client
        .start_worker(virtufin_proto::workmanager::v1::StartWorkerRequest { id: id.clone() })
        .await
        .unwrap();
    assert_eq!(lifecycle(&mut status, &id).await.0, "started");

    // An event published in a trace of its own (gRPC metadata only).
    s.api
        .pubsub()
        .publish_event(with_traceparent(
            api_pb::PublishEventRequest {
                topic: "trace-in".into(),
                data: r#"{"n":1}"#.into(),
                metadata: Default::default(),
            },
            &event_trace.to_header(),
        ))
        .await
        .unwrap();
    // (a) the published event: the caller's trace, the api's span as parent.
    let delivered = trace_of(&next(&mut inputs).await);
    assert_eq!(delivered.trace_id, event_trace.trace_id);
    assert_ne!(
        delivered.span_id, event_trace.span_id,
        "the api's span, under the caller's"
    );
    // (b) the worker's answer: same trace, the workmanager's span for it.
    let answer = next(&mut answers).await;
    let answered = trace_of(&answer);
    assert_eq!(answered.trace_id, event_trace.trace_id);
    assert_ne!(
        answered.span_id, delivered.span_id,
        "the workmanager's span, under the api's"
    );

    // A failing event: the error lifecycle event and the workmanager's log
    // line about it are in the event's trace.
    s.api
        .pubsub()
        .publish_event(with_traceparent(
            api_pb::PublishEventRequest {
                topic: "trace-in".into(),
                data: r#"{"fail":true}"#.into(),
                metadata: Default::default(),
            },
            &fail_trace.to_header(),
        ))
        .await
        .unwrap();
    let error = loop {
        let ev = next(&mut status).await;
        if ev.r#type.ends_with(".error") {
            break ev;
        }
    };
    assert_eq!(trace_of(&error).trace_id, fail_trace.trace_id);
    // (c) the workmanager's log line for it.
    let t3 = format!("trace_id={}", fail_trace.trace_id_hex());
    until(|| async { !lines_with(&["lifecycle", "event=\"error\"", &t3]).is_empty() }).await;
    assert!(
        lines_with(&[&t1, &t3]).is_empty(),
        "no line mixes two traces"
    );
    wm.stop().await;
}
