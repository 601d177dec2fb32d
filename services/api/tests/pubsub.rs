//! Pubsub over gRPC on both backends: the CloudEvent envelope, groups,
//! Unsubscribe, the acknowledged mode, and bad input.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{collections::HashMap, time::Duration};

use common::{CONTENT_TYPES, Kind, ready, start};
use tonic::{Code, Streaming};
use virtufin_api_client::pb::{
    self, subscribe_topic_events_request::SubscribeTopicEventsRequestType as Req,
    subscribe_topic_events_response::SubscribeTopicEventsResponseType as Resp,
};

const WAIT: Duration = Duration::from_secs(10);

fn md(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn subscribe(
    api: &common::TestApi,
    topic: &str,
    subscriber: &str,
    group: &str,
) -> Streaming<pb::TopicEventRequest> {
    api.client
        .pubsub()
        .subscribe(pb::SubscribeRequest {
            topic: topic.into(),
            subscriber: subscriber.into(),
            group: group.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn next(s: &mut Streaming<pb::TopicEventRequest>) -> pb::TopicEventRequest {
    tokio::time::timeout(WAIT, s.message())
        .await
        .expect("event in time")
        .unwrap()
        .expect("stream open")
}

fn ext(ev: &pb::TopicEventRequest, name: &str) -> Option<String> {
    ev.extensions
        .as_ref()?
        .fields
        .get(name)
        .and_then(|v| match &v.kind {
            Some(prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
            _ => None,
        })
}

async fn envelope_and_extensions(kind: Kind) {
    let api = start(kind).await;
    ready(&api).await;
    let mut s = subscribe(&api, "orders", "reader", "g").await;
    let id = api
        .client
        .publish(
            "orders",
            r#"{"n":1}"#,
            md(&[
                ("ce-type", "com.example.order"),
                ("ce-source", "urn:shop"),
                ("ce-correlationid", "corr-7"),
                ("ce-traceparent", TRACEPARENT),
                ("not-ce", "ignored"),
            ]),
        )
        .await
        .unwrap();
    let ev = next(&mut s).await;
    assert_eq!(ev.id, id);
    assert!(uuid_like(&id), "a missing ce-id is filled: {id}");
    assert_eq!(
        (
            ev.r#type.as_str(),
            ev.source.as_str(),
            ev.spec_version.as_str()
        ),
        ("com.example.order", "urn:shop", "1.0")
    );
    assert_eq!(ev.data_content_type, "application/json");
    assert_eq!(ev.data, br#"{"n":1}"#);
    assert_eq!(ev.topic, "orders");
    assert_eq!(ev.pubsub_name, "pubsub");
    assert_eq!(ext(&ev, "correlationid").as_deref(), Some("corr-7"));
    // Kept as given (daprd would replace it with its own without traceid).
    assert_eq!(ext(&ev, "traceparent").as_deref(), Some(TRACEPARENT));
    assert!(
        ext(&ev, "time").is_some_and(|t| t.ends_with('Z')),
        "time filled in"
    );
    assert!(ext(&ev, "not-ce").is_none());
    // Plain text stays text.
    api.client
        .publish("orders", "hello", md(&[("ce-id", "t-1")]))
        .await
        .unwrap();
    let ev = next(&mut s).await;
    assert_eq!(
        (
            ev.id.as_str(),
            ev.data_content_type.as_str(),
            ev.data.as_slice()
        ),
        ("t-1", "text/plain", &b"hello"[..])
    );
    api.stop().await;
}

const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

async fn data_of_every_content_type_arrives_unchanged(kind: Kind) {
    let api = start(kind).await;
    ready(&api).await;
    let mut s = subscribe(&api, "typed", "reader", "g").await;
    for (i, (ct, data)) in CONTENT_TYPES.iter().enumerate() {
        api.client
            .publish(
                "typed",
                data,
                md(&[("ce-datacontenttype", ct), ("ce-id", &format!("c{i}"))]),
            )
            .await
            .unwrap();
    }
    // By id: the dapr backend does not keep publish order.
    let mut by_id = HashMap::new();
    for _ in CONTENT_TYPES {
        let ev = next(&mut s).await;
        by_id.insert(ev.id.clone(), ev);
    }
    for (i, (ct, data)) in CONTENT_TYPES.iter().enumerate() {
        let ev = by_id
            .remove(&format!("c{i}"))
            .unwrap_or_else(|| panic!("c{i} ({ct}) was delivered"));
        assert_eq!(ev.data_content_type, *ct);
        assert_eq!(
            String::from_utf8_lossy(&ev.data),
            *data,
            "{ct}: the subscriber gets the bytes that were published"
        );
    }
    api.stop().await;
}

fn uuid_like(s: &str) -> bool {
    s.len() == 36 && s.chars().filter(|c| *c == '-').count() == 4
}

async fn groups_fan_out_and_members_share(kind: Kind) {
    let api = start(kind).await;
    ready(&api).await;
    let mut a1 = subscribe(&api, "fan", "a1", "A").await;
    let mut a2 = subscribe(&api, "fan", "a2", "A").await;
    if kind == Kind::Dapr {
        // daprd has one consumer group per topic: a second group is refused
        // (not silently given some of the events).
        let err = api
            .client
            .pubsub()
            .subscribe(pb::SubscribeRequest {
                topic: "fan".into(),
                subscriber: "b1".into(),
                group: "B".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("group 'A'"), "{}", err.message());
    }
    let mut b = if kind == Kind::Dapr {
        None
    } else {
        Some(subscribe(&api, "fan", "b1", "B").await)
    };
    let n = 20;
    for i in 0..n {
        api.client
            .publish("fan", &format!("{i}"), md(&[("ce-id", &format!("e{i}"))]))
            .await
            .unwrap();
    }
    let expected: Vec<String> = (0..n).map(|i| format!("e{i}")).collect();
    if let Some(b) = b.as_mut() {
        let mut group_b = Vec::new();
        for _ in 0..n {
            group_b.push(next(b).await.id);
        }
        assert_eq!(group_b, expected, "group B gets every event, in order");
    }
    let mut group_a = Vec::new();
    while group_a.len() < n {
        let ev = tokio::select! { e = next(&mut a1) => e, e = next(&mut a2) => e };
        group_a.push(ev.id);
    }
    group_a.sort();
    let mut sorted = expected.clone();
    sorted.sort();
    assert_eq!(
        group_a, sorted,
        "group A's members share the events, none twice"
    );
    api.stop().await;
}

async fn unsubscribe_ends_matching_streams_only(kind: Kind) {
    let api = start(kind).await;
    ready(&api).await;
    let mut gone = subscribe(&api, "u", "test", "smoke").await;
    let mut stays = subscribe(&api, "u", "other", "smoke").await;
    let r = api
        .client
        .pubsub()
        .unsubscribe(pb::UnsubscribeRequest {
            topic: "u".into(),
            subscriber: "test".into(),
            group: "smoke".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.success);
    assert!(r.message.starts_with("1 "), "{}", r.message);
    let end = tokio::time::timeout(WAIT, gone.message())
        .await
        .expect("stream ends in time");
    assert!(matches!(end, Ok(None)), "ended cleanly: {end:?}");
    api.client
        .publish("u", "after", HashMap::new())
        .await
        .unwrap();
    assert_eq!(next(&mut stays).await.data, b"after");
    let list: serde_json::Value = reqwest::get(api.http_url("/v1/pubsub/subscriptions"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["count"], 1, "{list}");
    assert_eq!(list["subscriptions"][0]["subscriber"], "other");
    api.stop().await;
}

async fn open_ack_stream(
    api: &common::TestApi,
    topic: &str,
    subscriber: &str,
) -> (
    tokio::sync::mpsc::Sender<pb::SubscribeTopicEventsRequest>,
    Streaming<pb::SubscribeTopicEventsResponse>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(pb::SubscribeTopicEventsRequest {
        subscribe_topic_events_request_type: Some(Req::InitialRequest(pb::SubscribeRequest {
            topic: topic.into(),
            subscriber: subscriber.into(),
            group: "workers".into(),
        })),
    })
    .await
    .unwrap();
    let mut stream = api
        .client
        .pubsub()
        .subscribe_topic_events(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    match tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap()
    {
        Some(pb::SubscribeTopicEventsResponse {
            subscribe_topic_events_response_type: Some(Resp::InitialResponse(r)),
        }) => {
            assert_eq!((r.topic.as_str(), r.group.as_str()), (topic, "workers"));
        }
        other => panic!("expected the initial response, got {other:?}"),
    }
    (tx, stream)
}

async fn next_ack_event(
    s: &mut Streaming<pb::SubscribeTopicEventsResponse>,
) -> pb::TopicEventRequest {
    match tokio::time::timeout(WAIT, s.message())
        .await
        .expect("event in time")
        .unwrap()
    {
        Some(pb::SubscribeTopicEventsResponse {
            subscribe_topic_events_response_type: Some(Resp::EventMessage(e)),
        }) => e,
        other => panic!("expected an event, got {other:?}"),
    }
}

fn ack(id: &str, status: pb::EventStatus) -> pb::SubscribeTopicEventsRequest {
    pb::SubscribeTopicEventsRequest {
        subscribe_topic_events_request_type: Some(Req::EventProcessed(
            pb::SubscribeTopicEventsAck {
                id: id.into(),
                status: status as i32,
            },
        )),
    }
}

async fn unacknowledged_event_comes_back(kind: Kind) {
    let api = start(kind).await;
    ready(&api).await;
    let (tx, mut s) = open_ack_stream(&api, "jobs", "w1").await;
    api.client
        .publish("jobs", "job-1", md(&[("ce-id", "j1")]))
        .await
        .unwrap();
    let ev = next_ack_event(&mut s).await;
    assert_eq!(ev.id, "j1");
    // The consumer dies before acknowledging.
    drop(tx);
    drop(s);
    let (tx, mut s) = open_ack_stream(&api, "jobs", "w2").await;
    let again = next_ack_event(&mut s).await;
    assert_eq!(
        (again.id.as_str(), again.data.as_slice()),
        ("j1", &b"job-1"[..])
    );
    tx.send(ack("j1", pb::EventStatus::Success)).await.unwrap();
    // RETRY brings an event back; DROP and SUCCESS do not.
    api.client
        .publish("jobs", "job-2", md(&[("ce-id", "j2")]))
        .await
        .unwrap();
    api.client
        .publish("jobs", "job-3", md(&[("ce-id", "j3")]))
        .await
        .unwrap();
    let e2 = next_ack_event(&mut s).await;
    let e3 = next_ack_event(&mut s).await;
    // Either order: the dapr backend does not keep publish order.
    let mut pair = [e2.id.as_str(), e3.id.as_str()];
    pair.sort_unstable();
    assert_eq!(pair, ["j2", "j3"]);
    tx.send(ack("j2", pb::EventStatus::Retry)).await.unwrap();
    tx.send(ack("j3", pb::EventStatus::Drop)).await.unwrap();
    let e2again = next_ack_event(&mut s).await;
    assert_eq!(e2again.id, "j2");
    tx.send(ack("j2", pb::EventStatus::Success)).await.unwrap();
    // Nothing else arrives, even past the processing timeout (500 ms here).
    let quiet = tokio::time::timeout(Duration::from_millis(1200), s.message()).await;
    assert!(quiet.is_err(), "nothing more expected: {quiet:?}");
    api.stop().await;
}

async fn ack_stream_needs_an_initial_request(kind: Kind) {
    let api = start(kind).await;
    ready(&api).await;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(ack("x", pb::EventStatus::Success)).await.unwrap();
    let err = api
        .client
        .pubsub()
        .subscribe_topic_events(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("initial_request"),
        "{}",
        err.message()
    );
    api.stop().await;
}

async fn bad_pubsub_input(kind: Kind) {
    let api = start_with_limit(kind).await;
    ready(&api).await;
    let mut p = api.client.pubsub();
    let publish = |topic: &str, data: &str, m: HashMap<String, String>| pb::PublishEventRequest {
        topic: topic.into(),
        data: data.into(),
        metadata: m,
    };
    let cases = vec![
        publish("", "x", HashMap::new()),
        publish("bad topic", "x", HashMap::new()),
        publish("t", &"x".repeat(300), HashMap::new()),
        publish(
            "t",
            "not json",
            md(&[("ce-datacontenttype", "application/json")]),
        ),
        publish("t", "x", md(&[("ce-specversion", "0.3")])),
        publish("t", "x", md(&[("ce-time", "noon")])),
        publish("t", "x", md(&[("ce-Not_Valid", "x")])),
    ];
    for c in cases {
        let err = p.publish_event(c.clone()).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{c:?}");
    }
    for (topic, sub) in [("", "s"), ("t", ""), ("t t", "s"), ("t", "s s")] {
        let err = p
            .subscribe(pb::SubscribeRequest {
                topic: topic.into(),
                subscriber: sub.into(),
                group: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{topic:?} {sub:?}");
    }
    // None of the refused publishes reached the topic.
    let mut s = subscribe(&api, "t", "check", "check").await;
    api.client
        .publish("t", "only", HashMap::new())
        .await
        .unwrap();
    assert_eq!(next(&mut s).await.data, b"only");
    api.stop().await;
}

async fn start_with_limit(kind: Kind) -> common::TestApi {
    common::start_with(kind, |c| c.max_event_bytes = 256).await
}

async fn batches_are_ordered_and_all_or_nothing(kind: Kind) {
    let api = start(kind).await;
    ready(&api).await;
    let mut s = subscribe(&api, "batch", "r", "g").await;
    let ev = |topic: &str, id: &str| pb::PublishEventRequest {
        topic: topic.into(),
        data: id.into(),
        metadata: md(&[("ce-id", id)]),
    };
    let mut p = api.client.pubsub();
    let err = p
        .publish_events(pb::PublishEventsRequest {
            events: vec![ev("batch", "x1"), ev("bad topic", "x2")],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("event 1:"), "{}", err.message());
    let ids = p
        .publish_events(pb::PublishEventsRequest {
            events: (0..5).map(|i| ev("batch", &format!("b{i}"))).collect(),
        })
        .await
        .unwrap()
        .into_inner()
        .ids;
    assert_eq!(ids, vec!["b0", "b1", "b2", "b3", "b4"]);
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(next(&mut s).await.id);
    }
    if kind == Kind::Dapr {
        // pubsub.redis hands a stream's entries to concurrent workers:
        // delivery order is not kept (a stated limit of the dapr backend;
        // an ordered assertion here failed in CI).
        got.sort();
    }
    assert_eq!(
        got,
        ["b0", "b1", "b2", "b3", "b4"],
        "every event of the batch (in order but on dapr), and x1 was never published"
    );
    api.stop().await;
}

/// The trace context of an event: a call's `traceparent` (gRPC metadata)
/// is the parent of the api's span, which the event names; a valid one the
/// publisher put in the event itself is kept; an invalid one never fails
/// the call. `traceid` mirrors `traceparent` (daprd keeps both).
async fn events_carry_the_callers_trace(kind: Kind) {
    use virtufin_api_client::TraceContext;
    let api = start(kind).await;
    ready(&api).await;
    let mut s = subscribe(&api, "traced", "reader", "g").await;
    let caller = TraceContext::parse(TRACEPARENT, Some("vendor=1")).unwrap();
    fn traced<T>(e: T, tp: &str) -> tonic::Request<T> {
        let mut r = tonic::Request::new(e);
        r.metadata_mut().insert("traceparent", tp.parse().unwrap());
        r.metadata_mut()
            .insert("tracestate", "vendor=1".parse().unwrap());
        r
    }
    let event = |id: &str, extra: &[(&str, &str)]| {
        let mut m = md(&[("ce-id", id)]);
        m.extend(md(extra));
        pb::PublishEventRequest {
            topic: "traced".into(),
            data: "x".into(),
            metadata: m,
        }
    };
    let own = "00-11111111111111111111111111111111-2222222222222222-00";
    api.client
        .pubsub()
        .publish_event(traced(event("one", &[]), TRACEPARENT))
        .await
        .unwrap();
    api.client
        .pubsub()
        .publish_events(traced(
            pb::PublishEventsRequest {
                events: vec![
                    event("two", &[]),
                    event("own", &[("ce-traceparent", own)]),
                    event("bad", &[("ce-traceparent", "00-nonsense")]),
                ],
            },
            TRACEPARENT,
        ))
        .await
        .unwrap();
    // An invalid traceparent on the call: a new trace, not an error.
    api.client
        .pubsub()
        .publish_event(traced(event("root", &[]), "00-zz"))
        .await
        .unwrap();
    let mut by_id = HashMap::new();
    for _ in 0..5 {
        let ev = next(&mut s).await;
        let tp = ext(&ev, "traceparent").expect("every event has a traceparent");
        assert_eq!(
            ext(&ev, "traceid"),
            Some(tp.clone()),
            "{}: traceid mirrors it",
            ev.id
        );
        by_id.insert(
            ev.id.clone(),
            (
                TraceContext::parse(&tp, None).unwrap(),
                ext(&ev, "tracestate"),
            ),
        );
    }
    for id in ["one", "two", "bad"] {
        let (c, state) = &by_id[id];
        assert_eq!(c.trace_id, caller.trace_id, "{id}: the caller's trace");
        assert_ne!(
            c.span_id, caller.span_id,
            "{id}: the api's span, not the caller's"
        );
        assert_eq!(
            state.as_deref(),
            Some("vendor=1"),
            "{id}: tracestate passed on"
        );
    }
    assert_eq!(by_id["one"].0.flags, caller.flags);
    assert_eq!(
        by_id["own"].0.to_header(),
        own,
        "the publisher's own is kept"
    );
    assert_ne!(by_id["root"].0.trace_id, caller.trace_id, "a new trace");
    assert_eq!(
        by_id["root"].1, None,
        "no tracestate without a valid traceparent"
    );
    api.stop().await;
}

both_backends!(
    events_carry_the_callers_trace,
    batches_are_ordered_and_all_or_nothing,
    envelope_and_extensions,
    data_of_every_content_type_arrives_unchanged,
    groups_fan_out_and_members_share,
    unsubscribe_ends_matching_streams_only,
    unacknowledged_event_comes_back,
    ack_stream_needs_an_initial_request,
    bad_pubsub_input,
);
