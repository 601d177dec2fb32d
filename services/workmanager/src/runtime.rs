//! A running worker: its engine process and its acknowledged subscription
//! through the api. Each event goes to the engine; the answer is published
//! to its `type` (or the input's `replytopic`) with the input's
//! `correlationid`, and only then is the event acknowledged — so an event
//! being processed when its worker dies is delivered again.

use std::{collections::HashMap, sync::Arc, time::Duration};

use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use virtufin_api_client::pb::{
    self, EventStatus, PublishEventRequest, SubscribeTopicEventsAck, SubscribeTopicEventsRequest,
    subscribe_topic_events_request::SubscribeTopicEventsRequestType as Req,
    subscribe_topic_events_response::SubscribeTopicEventsResponseType as Resp,
};
use virtufin_api_client::trace::{self, TraceContext};

use crate::{
    engine::{Engine, EngineError, Kind},
    manager::Shared,
};

/// What a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    pub id: String,
    pub topic: String,
    pub group: String,
    pub config: HashMap<String, String>,
    pub kind: Kind,
    pub code: Vec<u8>,
    pub limits: crate::manager::Limits,
}

/// Handle to a running worker.
pub struct Running {
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    pub fn start(shared: Arc<Shared>, spec: WorkerSpec) -> Self {
        let cancel = shared.shutdown.child_token();
        let span = tracing::info_span!("worker", id = %spec.id, topic = %spec.topic);
        let task = tokio::spawn(tracing::Instrument::instrument(
            run(shared, spec, cancel.clone()),
            span,
        ));
        Self { cancel, task }
    }

    /// Stops the worker and waits for its process to end.
    pub async fn stop(self) {
        self.cancel.cancel();
        let _ = self.task.await;
    }
}

/// CloudEvent attributes with fields of their own.
const CORE: &[&str] = &[
    "id",
    "source",
    "type",
    "specversion",
    "datacontenttype",
    "data",
    "time",
    "subject",
    "dataschema",
];

/// The CloudEvent-shaped dict a worker's `Process(event)` receives, with
/// the worker's config stamped on as extension attributes (an attribute
/// the event already has wins).
pub fn event_dict(ev: &pb::TopicEventRequest, config: &HashMap<String, String>) -> Value {
    let mut m = Map::new();
    if let Some(ext) = &ev.extensions {
        for (k, v) in &ext.fields {
            m.insert(k.clone(), virtufin_proto::json::from_prost(v));
        }
    }
    for (k, v) in config {
        m.entry(k.clone())
            .or_insert_with(|| Value::String(v.clone()));
    }
    let data = if ev.data_content_type.contains("json") {
        serde_json::from_slice(&ev.data)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&ev.data).into_owned()))
    } else {
        Value::String(String::from_utf8_lossy(&ev.data).into_owned())
    };
    m.insert("id".into(), ev.id.clone().into());
    m.insert("source".into(), ev.source.clone().into());
    m.insert("type".into(), ev.r#type.clone().into());
    m.insert("specversion".into(), ev.spec_version.clone().into());
    m.insert(
        "datacontenttype".into(),
        ev.data_content_type.clone().into(),
    );
    m.insert("topic".into(), ev.topic.clone().into());
    m.insert("data".into(), data);
    Value::Object(m)
}

/// Turns a worker's answer into a publish: topic = the input's
/// `replytopic`, else the answer's `type`; `correlationid` carried over.
pub fn answer_event(input: &Value, answer: &Value) -> Result<PublishEventRequest, String> {
    let Value::Object(a) = answer else {
        return Err("the answer is not a dict".into());
    };
    let ty = a.get("type").and_then(Value::as_str).unwrap_or("");
    let reply = input
        .get("replytopic")
        .and_then(Value::as_str)
        .unwrap_or("");
    let topic = if reply.is_empty() { ty } else { reply };
    if topic.is_empty() {
        return Err("the answer has no type (and the input no replytopic) to publish to".into());
    }
    let mut md = HashMap::new();
    if !ty.is_empty() {
        md.insert("ce-type".to_owned(), ty.to_owned());
    }
    let source = a
        .get("source")
        .and_then(Value::as_str)
        .unwrap_or(crate::SOURCE);
    md.insert("ce-source".to_owned(), source.to_owned());
    if let Some(id) = a.get("id").and_then(Value::as_str) {
        md.insert("ce-id".to_owned(), id.to_owned());
    }
    let data = a.get("data").cloned().unwrap_or(Value::Null);
    let (data, ct) = match data {
        Value::String(s) => (
            s,
            a.get("datacontenttype")
                .and_then(Value::as_str)
                .unwrap_or("text/plain")
                .to_owned(),
        ),
        other => (other.to_string(), "application/json".to_owned()),
    };
    md.insert("ce-datacontenttype".to_owned(), ct);
    for (k, v) in a {
        if !CORE.contains(&k.as_str())
            && let Some(s) = v.as_str()
        {
            md.insert(format!("ce-{k}"), s.to_owned());
        }
    }
    if !md.contains_key("ce-correlationid")
        && let Some(c) = input.get("correlationid").and_then(Value::as_str)
    {
        md.insert("ce-correlationid".to_owned(), c.to_owned());
    }
    Ok(PublishEventRequest {
        topic: topic.to_owned(),
        data,
        metadata: md,
    })
}

/// The context of handling `ev`: a child of the event's `traceparent`
/// (the span that published it), or a new trace for an event without a
/// valid one.
pub fn event_trace(ev: &pb::TopicEventRequest) -> TraceContext {
    let attr = |k: &str| {
        ev.extensions
            .as_ref()?
            .fields
            .get(k)
            .and_then(|v| match &v.kind {
                Some(prost_types::value::Kind::StringValue(s)) => Some(s.as_str()),
                _ => None,
            })
    };
    TraceContext::incoming(attr(trace::TRACEPARENT), attr(trace::TRACESTATE))
}

/// The answer belongs to the handling of its input: its traceparent names
/// the workmanager's span for it, whatever trace attributes the worker's
/// answer copied from the input (which would skip that span, and a copied
/// `traceid` would no longer match).
pub fn stamp_answer(out: &mut PublishEventRequest, ctx: &TraceContext) {
    out.metadata.retain(|k, _| {
        !["ce-traceparent", "ce-tracestate", "ce-traceid"]
            .iter()
            .any(|t| k.eq_ignore_ascii_case(t))
    });
    ctx.stamp(&mut out.metadata);
}

type Inbound = tonic::Streaming<pb::SubscribeTopicEventsResponse>;

/// The worker's consumer name in its group: one per worker and instance, so
/// that instances on several hosts running the same worker are distinct
/// members of its group (a shared name would share one pending list, and a
/// restarting instance would take over events another host has in hand).
/// Characters the api does not accept in a name become `-`.
fn subscriber_name(worker: &str, instance: &str) -> String {
    let mut name = format!("worker-{worker}:");
    name.extend(instance.chars().map(|c| {
        if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-') {
            c
        } else {
            '-'
        }
    }));
    name.chars().take(128).collect()
}

async fn open(
    shared: &Shared,
    spec: &WorkerSpec,
) -> Result<(mpsc::Sender<SubscribeTopicEventsRequest>, Inbound), String> {
    let (tx, rx) = mpsc::channel(64);
    let initial = SubscribeTopicEventsRequest {
        subscribe_topic_events_request_type: Some(Req::InitialRequest(pb::SubscribeRequest {
            topic: spec.topic.clone(),
            subscriber: subscriber_name(&spec.id, &shared.instance),
            group: spec.group.clone(),
        })),
    };
    tx.send(initial).await.map_err(|e| e.to_string())?;
    let stream = shared
        .api
        .pubsub()
        .subscribe_topic_events(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    Ok((tx, stream))
}

fn ack(id: &str, status: EventStatus) -> SubscribeTopicEventsRequest {
    SubscribeTopicEventsRequest {
        subscribe_topic_events_request_type: Some(Req::EventProcessed(SubscribeTopicEventsAck {
            id: id.to_owned(),
            status: status as i32,
        })),
    }
}

async fn run(shared: Arc<Shared>, spec: WorkerSpec, cancel: CancellationToken) {
    let dir = shared.config.state_dir.join("workers").join(&spec.id);
    let mut engine: Option<Engine> = None;
    let mut attempts: HashMap<String, u32> = HashMap::new();
    let mut backoff = Duration::from_millis(100);
    let mut ping = tokio::time::interval(shared.config.ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    'subscription: loop {
        let (tx, mut inbound) = match open(&shared, &spec).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot subscribe through the api; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => break 'subscription,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break 'subscription,
                _ = ping.tick() => {
                    if let Some(mut e) = engine.take() {
                        match e.ping(shared.config.ping_timeout).await {
                            Ok(()) => engine = Some(e),
                            Err(err) => {
                                tracing::warn!(error = %err, "the worker process failed its ping; restarting it");
                                shared.worker_error(&spec, &err).await;
                                shared.metrics.restart(&spec.id);
                                e.kill().await;
                            }
                        }
                    }
                }
                m = inbound.message() => match m {
                    Ok(Some(pb::SubscribeTopicEventsResponse { subscribe_topic_events_response_type: Some(Resp::EventMessage(ev)) })) => {
                        // The event's trace: handling it is a span under
                        // the one that published it (see event_trace).
                        let ctx = event_trace(&ev);
                        let span = ctx.span("event");
                        let (status, took) = tracing::Instrument::instrument(
                            trace::scope(ctx, handle(&shared, &spec, &dir, &mut engine, &mut attempts, &ev)),
                            span,
                        )
                        .await;
                        shared.metrics.event(&spec.id, status, took);
                        if tx.send(ack(&ev.id, status)).await.is_err() {
                            break;
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => {
                        tracing::warn!("the api subscription ended; reopening");
                        break;
                    }
                },
            }
        }
    }
    if let Some(e) = engine {
        e.shutdown().await;
    }
}

/// Processes one event; returns how to acknowledge it and, when the
/// worker ran, how long it took.
async fn handle(
    shared: &Shared,
    spec: &WorkerSpec,
    dir: &std::path::Path,
    engine: &mut Option<Engine>,
    attempts: &mut HashMap<String, u32>,
    ev: &pb::TopicEventRequest,
) -> (EventStatus, Option<f64>) {
    if engine.is_none() {
        match Engine::start(
            spec.kind,
            &shared.config,
            spec.limits.memory_bytes(),
            &spec.id,
            &spec.code,
            dir,
        )
        .await
        {
            Ok(e) => *engine = Some(e),
            Err(err) => {
                tracing::warn!(error = %err, "cannot start the worker process");
                shared.worker_error(spec, &err).await;
                return (give_up_or_retry(shared, attempts, &ev.id), None);
            }
        }
    }
    let Some(e) = engine.as_mut() else {
        return (EventStatus::Retry, None);
    };
    let input = event_dict(ev, &spec.config);
    let start = std::time::Instant::now();
    let processed = e
        .process(input.clone(), spec.limits.event_timeout, &shared.api)
        .await;
    let took = Some(start.elapsed().as_secs_f64());
    let status = match processed {
        Ok(None) => {
            attempts.remove(&ev.id);
            EventStatus::Success
        }
        Ok(Some(answer)) => match answer_event(&input, &answer) {
            Ok(out) => match publish_answer(shared, out).await {
                Ok(_) => {
                    attempts.remove(&ev.id);
                    EventStatus::Success
                }
                Err(err) => {
                    tracing::warn!(error = %err, "cannot publish the answer; the event will come back");
                    EventStatus::Retry
                }
            },
            Err(why) => {
                shared.worker_error(spec, &EngineError::Protocol(why)).await;
                EventStatus::Drop
            }
        },
        Err(err) => {
            shared.worker_error(spec, &err).await;
            if err.needs_restart()
                && let Some(e) = engine.take()
            {
                shared.metrics.restart(&spec.id);
                e.kill().await;
            }
            give_up_or_retry(shared, attempts, &ev.id)
        }
    };
    (status, took)
}

/// Publishes a worker's answer in the trace of the event it answers (the
/// scope `run` sets for the handling).
async fn publish_answer(
    shared: &Shared,
    mut out: PublishEventRequest,
) -> Result<Vec<String>, virtufin_api_client::ClientError> {
    if let Some(ctx) = trace::current() {
        stamp_answer(&mut out, &ctx);
    }
    shared.api.publish_many(vec![out]).await
}

fn give_up_or_retry(shared: &Shared, attempts: &mut HashMap<String, u32>, id: &str) -> EventStatus {
    let n = attempts.entry(id.to_owned()).or_insert(0);
    *n += 1;
    if *n >= shared.config.max_attempts {
        attempts.remove(id);
        tracing::warn!(event = id, "giving up on an event after repeated failures");
        EventStatus::Drop
    } else {
        EventStatus::Retry
    }
}

#[cfg(test)]
mod subscriber_name_tests {
    use super::subscriber_name;

    #[test]
    fn names_are_per_instance_and_valid() {
        assert_eq!(subscriber_name("w1", "host-a"), "worker-w1:host-a");
        assert_ne!(
            subscriber_name("w1", "host-a"),
            subscriber_name("w1", "host-b")
        );
        assert_eq!(subscriber_name("w1", "a b/c@d"), "worker-w1:a-b-c-d");
        assert_eq!(subscriber_name("w1", &"x".repeat(300)).len(), 128);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod trace_tests {
    use super::*;

    const TP: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    fn event(ext: &[(&str, &str)]) -> pb::TopicEventRequest {
        pb::TopicEventRequest {
            extensions: Some(prost_types::Struct {
                fields: ext
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.to_string(),
                            prost_types::Value {
                                kind: Some(prost_types::value::Kind::StringValue(v.to_string())),
                            },
                        )
                    })
                    .collect(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn handling_an_event_is_a_child_of_its_traceparent() {
        let c = event_trace(&event(&[("traceparent", TP), ("tracestate", "a=1")]));
        assert_eq!(c.trace_id_hex(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(c.parent_span_hex(), "b7ad6b7169203331");
        assert_eq!(c.tracestate.as_deref(), Some("a=1"));
        let c = event_trace(&event(&[("traceparent", "bad")]));
        assert_ne!(c.trace_id_hex(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(c.parent_span, [0; 8]);
    }

    #[test]
    fn the_answer_names_the_workmanagers_span_not_a_copied_one() {
        let input = serde_json::json!({"traceparent": TP, "traceid": TP});
        let answer =
            serde_json::json!({"type": "out", "data": {}, "traceparent": TP, "traceid": TP});
        let mut out = answer_event(&input, &answer).unwrap();
        assert_eq!(
            out.metadata.get("ce-traceparent").map(String::as_str),
            Some(TP)
        );
        let ctx = TraceContext::parse(TP, None).unwrap().child();
        stamp_answer(&mut out, &ctx);
        assert_eq!(out.metadata.get("ce-traceparent"), Some(&ctx.to_header()));
        assert!(!out.metadata.contains_key("ce-traceid"));
    }
}
