//! A connection opened by a call with a `traceparent` lives in that trace:
//! its lifecycle events, the frames it forwards later (whatever call asked
//! for the forwarding), its log lines and its calls to the api.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use virtufin_api_client::{TraceContext, pb};
use virtufin_proto::websocketmanager::v1 as ws;
use virtufin_testkit::ValkeyServer;

async fn next_full(s: &mut tonic::Streaming<pb::TopicEventRequest>) -> pb::TopicEventRequest {
    tokio::time::timeout(WAIT, s.message())
        .await
        .expect("event in time")
        .unwrap()
        .expect("stream open")
}

fn trace_of(ev: &pb::TopicEventRequest) -> TraceContext {
    let tp = ev
        .extensions
        .as_ref()
        .and_then(|e| e.fields.get("traceparent"))
        .and_then(|v| {
            virtufin_proto::json::from_prost(v)
                .as_str()
                .map(str::to_owned)
        })
        .expect("the event has a traceparent");
    TraceContext::parse(&tp, None).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lives_in_the_trace_of_the_call_that_opened_it() {
    virtufin_testkit::logs::capture();
    let valkey = ValkeyServer::start();
    let api = Api::start(&valkey).await;
    let mut status = subscribe(&api.client, "websocketmanager.connectionstatus", "st").await;
    let mut feed = subscribe(&api.client, "traced-feed", "feed").await;
    let wsm = Wsm::start(api.addr, "inst-t").await;
    let mut c = wsm.client().await;
    let peer = EchoPeer::start().await;

    let caller = TraceContext::new_root();
    let mut req = tonic::Request::new(ws::ConnectRequest {
        url: peer.url(),
        auto_reconnect: false,
    });
    req.metadata_mut()
        .insert("traceparent", caller.to_header().parse().unwrap());
    let id = c.connect(req).await.unwrap().into_inner().id;

    let connected = loop {
        let ev = next_full(&mut status).await;
        let d: serde_json::Value = serde_json::from_slice(&ev.data).unwrap();
        if d["connection_id"] == id.as_str() {
            break ev;
        }
    };
    let conn = trace_of(&connected);
    assert_eq!(conn.trace_id, caller.trace_id, "the Connect call's trace");
    assert_ne!(conn.span_id, caller.span_id, "the connection's own span");

    // Forwarding asked for by calls without a trace: the frames still
    // belong to the connection's.
    c.start_publish(ws::StartPublishRequest {
        id: id.clone(),
        topic: "traced-feed".into(),
    })
    .await
    .unwrap();
    c.send_raw(ws::SendRawRequest {
        id: id.clone(),
        message: "tick".into(),
        content_type: "text/plain".into(),
        message_bytes: Vec::new(),
    })
    .await
    .unwrap();
    let frame = next_full(&mut feed).await;
    assert_eq!(trace_of(&frame).to_header(), conn.to_header());

    // Log lines: the websocketmanager's for the connection, and the api's
    // for the writes it made (its calls carry the trace).
    let t = format!("trace_id={}", caller.trace_id_hex());
    let lines_with = virtufin_testkit::logs::lines_with;
    wait_until(|| async { !lines_with(&["lifecycle", &id, &t]).is_empty() }).await;
    wait_until(|| async {
        !lines_with(&["state saved", "service=\"websocketmanager\"", &t]).is_empty()
    })
    .await;
    wsm.stop().await;
    api.stop().await;
}
