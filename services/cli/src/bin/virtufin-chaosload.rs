//! A steady load on virtufin-api with exact accounting, for the chain
//! test's chaos pass: state writes (`chaos/k<n>` = `v<n>`) and events
//! (`chaos-events`, data `n`, CloudEvent id `chaos-<n>`), one after the
//! other, each recorded as acknowledged only when the api confirmed it.
//! Two audit subscribers (acknowledged streams, groups of their own) record
//! every delivery of `chaos-events` and of the worker's answers on
//! `chaos-answers` (data: the input's `n`), reconnecting whenever the api
//! goes away.
//!
//! On SIGTERM the load stops; the auditors keep reading until every
//! acknowledged event and its answer has arrived (or `--settle` passes);
//! every acknowledged write is read back; one JSON line reports
//! acknowledged vs readable/delivered/answered, the lost ones and the
//! duplicates (at-least-once delivery allows those).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use clap::Parser;
use serde_json::json;
use virtufin_api_client::ApiClient;
use virtufin_proto::api::v1::{
    EventStatus, SubscribeRequest, SubscribeTopicEventsAck, SubscribeTopicEventsRequest,
    subscribe_topic_events_request::SubscribeTopicEventsRequestType as Req,
    subscribe_topic_events_response::SubscribeTopicEventsResponseType as Resp,
};

#[derive(Debug, Parser)]
#[command(
    name = "virtufin-chaosload",
    about = "State writes and events with exact accounting, until SIGTERM"
)]
struct Args {
    /// The api's gRPC address.
    #[arg(long, default_value = "127.0.0.1:5002")]
    grpc: String,
    #[arg(long, env = "VIRTUFIN_API_KEY")]
    api_key: Option<String>,
    /// Pause between two writes (and between two events).
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    pause: Duration,
    /// A call without an answer by then is not acknowledged.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    call_timeout: Duration,
    /// After SIGTERM, longest wait for the outstanding deliveries.
    #[arg(long, default_value = "150s", value_parser = humantime::parse_duration)]
    settle: Duration,
    /// Written once both audit streams are open and a write and an event
    /// were acknowledged.
    #[arg(long)]
    ready_file: Option<std::path::PathBuf>,
}

const SERVICE: &str = "chaos";
const EVENTS: &str = "chaos-events";
const ANSWERS: &str = "chaos-answers";

#[derive(Debug, Default)]
struct Tally {
    writes_acked: Vec<u64>,
    writes_failed: u64,
    events_acked: BTreeSet<u64>,
    events_failed: u64,
    /// n -> deliveries, per audited topic.
    delivered: BTreeMap<&'static str, BTreeMap<u64, u64>>,
    /// Deliveries per CloudEvent `source`, per audited topic (which
    /// workmanager instance answered, when a worker names its host there).
    by_source: BTreeMap<&'static str, BTreeMap<String, u64>>,
    /// Longest time without an acknowledged write.
    longest_write_gap: Duration,
    longest_event_gap: Duration,
}

struct Shared {
    stop: AtomicBool,
    tally: Mutex<Tally>,
}

impl Shared {
    fn tally(&self) -> std::sync::MutexGuard<'_, Tally> {
        self.tally.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every acknowledged event delivered on `topic`.
    fn all_seen(&self, topic: &'static str) -> bool {
        let t = self.tally();
        let seen = t.delivered.get(topic);
        t.events_acked
            .iter()
            .all(|n| seen.is_some_and(|s| s.contains_key(n)))
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    let api = ApiClient::lazy(&args.grpc)?.with_key(args.api_key.as_deref())?;
    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        tally: Mutex::new(Tally::default()),
    });
    // The audit groups exist before the first event: a group created
    // later would start after it.
    let (sub_tx, mut sub_rx) = tokio::sync::mpsc::channel::<()>(2);
    let mut auditors = Vec::new();
    for topic in [EVENTS, ANSWERS] {
        let (api, shared, ready) = (api.clone(), shared.clone(), sub_tx.clone());
        auditors.push(tokio::spawn(audit(api, topic, shared, ready)));
    }
    drop(sub_tx);
    for _ in 0..2 {
        match tokio::time::timeout(Duration::from_secs(60), sub_rx.recv()).await {
            Ok(Some(())) => {}
            _ => anyhow::bail!("the audit subscriptions did not open within 60 s"),
        }
    }
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(2);
    let writer = {
        let api = api.clone();
        tokio::spawn(steady(
            args.clone(),
            shared.clone(),
            ready_tx.clone(),
            Kind::Write,
            move |n| {
                let api = api.clone();
                async move {
                    api.save(SERVICE, &format!("k{n}"), &format!("v{n}"), "")
                        .await
                        .is_ok()
                }
            },
        ))
    };
    let publisher = {
        let api = api.clone();
        tokio::spawn(steady(
            args.clone(),
            shared.clone(),
            ready_tx.clone(),
            Kind::Event,
            move |n| {
                let api = api.clone();
                async move {
                    let meta = HashMap::from([("ce-id".to_owned(), format!("chaos-{n}"))]);
                    api.publish(EVENTS, &n.to_string(), meta).await.is_ok()
                }
            },
        ))
    };
    drop(ready_tx);
    if let Some(path) = args.ready_file.clone() {
        tokio::spawn(async move {
            // A write and an event acknowledged.
            for _ in 0..2 {
                if ready_rx.recv().await.is_none() {
                    return;
                }
            }
            let _ = std::fs::write(&path, "ready\n");
        });
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    term.recv().await;
    shared.stop.store(true, Ordering::Relaxed);
    let _ = writer.await;
    let _ = publisher.await;
    let t0 = Instant::now();
    while !(shared.all_seen(EVENTS) && shared.all_seen(ANSWERS)) && t0.elapsed() < args.settle {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let settled_in = t0.elapsed();
    for a in auditors {
        a.abort();
    }

    // Every acknowledged write read back (retried: the api may still be
    // coming back from the last fault).
    let acked = shared.tally().writes_acked.clone();
    let mut lost_writes = Vec::new();
    for n in &acked {
        let mut got = None;
        for _ in 0..50 {
            match api.get(SERVICE, &format!("k{n}")).await {
                Ok(v) => {
                    got = Some(v);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        if got.flatten().map(|(v, _)| v) != Some(format!("v{n}")) {
            lost_writes.push(*n);
        }
    }

    let t = shared.tally();
    let topic_report = |topic: &'static str| {
        let seen = t.delivered.get(topic).cloned().unwrap_or_default();
        let lost: Vec<u64> = t
            .events_acked
            .iter()
            .filter(|n| !seen.contains_key(n))
            .copied()
            .collect();
        let duplicates: u64 = seen.values().map(|c| c.saturating_sub(1)).sum();
        json!({
            "delivered_unique": seen.len(),
            "lost": lost.len(),
            "lost_examples": lost.iter().take(10).collect::<Vec<_>>(),
            "duplicates": duplicates,
            "by_source": t.by_source.get(topic).cloned().unwrap_or_default(),
        })
    };
    let report = json!({
        "writes": {
            "acknowledged": acked.len(),
            "not_acknowledged": t.writes_failed,
            "lost": lost_writes.len(),
            "lost_examples": lost_writes.iter().take(10).collect::<Vec<_>>(),
            "longest_gap_ms": t.longest_write_gap.as_millis(),
        },
        "events": {
            "acknowledged": t.events_acked.len(),
            "not_acknowledged": t.events_failed,
            "longest_gap_ms": t.longest_event_gap.as_millis(),
            "delivered": topic_report(EVENTS),
            "answered": topic_report(ANSWERS),
        },
        "settled_in_ms": settled_in.as_millis(),
    });
    println!("{report}");
    Ok(())
}

/// What a [`steady`] loop does.
#[derive(Clone, Copy)]
enum Kind {
    Write,
    Event,
}

/// Calls `call(1)`, `call(2)`, … every `--pause` until stopped, recording
/// each `n` as acknowledged (the call returned true within
/// `--call-timeout`) or not, and the longest time between two
/// acknowledged calls.
async fn steady<F, Fut>(
    args: Arc<Args>,
    shared: Arc<Shared>,
    ready: tokio::sync::mpsc::Sender<()>,
    kind: Kind,
    call: F,
) where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let (mut n, mut last_ok, mut first) = (0u64, Instant::now(), true);
    while !shared.stop.load(Ordering::Relaxed) {
        n += 1;
        let ok = matches!(
            tokio::time::timeout(args.call_timeout, call(n)).await,
            Ok(true)
        );
        {
            let mut t = shared.tally();
            let gap = last_ok.elapsed();
            match (kind, ok) {
                (Kind::Write, true) => {
                    t.writes_acked.push(n);
                    t.longest_write_gap = t.longest_write_gap.max(gap);
                }
                (Kind::Event, true) => {
                    t.events_acked.insert(n);
                    t.longest_event_gap = t.longest_event_gap.max(gap);
                }
                (Kind::Write, false) => t.writes_failed += 1,
                (Kind::Event, false) => t.events_failed += 1,
            }
        }
        if ok {
            last_ok = Instant::now();
            if std::mem::take(&mut first) {
                let _ = ready.try_send(());
            }
        }
        tokio::time::sleep(args.pause).await;
    }
}

/// Reads `topic` in the group `chaos-audit` forever, acknowledging every
/// event and counting it by its `n`; reopens the stream when it ends.
async fn audit(
    api: ApiClient,
    topic: &'static str,
    shared: Arc<Shared>,
    ready: tokio::sync::mpsc::Sender<()>,
) {
    let mut first = true;
    loop {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let initial = SubscribeTopicEventsRequest {
            subscribe_topic_events_request_type: Some(Req::InitialRequest(SubscribeRequest {
                topic: topic.into(),
                subscriber: "chaos-audit".into(),
                group: "chaos-audit".into(),
            })),
        };
        if tx.send(initial).await.is_err() {
            return;
        }
        let stream = api
            .pubsub()
            .subscribe_topic_events(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await;
        let mut inbound = match stream {
            Ok(s) => s.into_inner(),
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        while let Ok(Some(m)) = inbound.message().await {
            match m.subscribe_topic_events_response_type {
                Some(Resp::InitialResponse(_)) if std::mem::take(&mut first) => {
                    let _ = ready.try_send(());
                }
                Some(Resp::InitialResponse(_)) => {}
                Some(Resp::EventMessage(ev)) => {
                    let n = String::from_utf8_lossy(&ev.data)
                        .trim()
                        .trim_matches('"')
                        .parse::<u64>()
                        .ok();
                    if let Some(n) = n {
                        let mut t = shared.tally();
                        *t.delivered.entry(topic).or_default().entry(n).or_default() += 1;
                        *t.by_source
                            .entry(topic)
                            .or_default()
                            .entry(ev.source.clone())
                            .or_default() += 1;
                    }
                    let ack = SubscribeTopicEventsRequest {
                        subscribe_topic_events_request_type: Some(Req::EventProcessed(
                            SubscribeTopicEventsAck {
                                id: ev.id,
                                status: EventStatus::Success as i32,
                            },
                        )),
                    };
                    if tx.send(ack).await.is_err() {
                        break;
                    }
                }
                None => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
