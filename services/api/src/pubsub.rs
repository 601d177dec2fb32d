//! The Pubsub service: publish, the plain and the acknowledged
//! subscription streams, and Unsubscribe.

use std::{
    collections::{HashMap, VecDeque},
    pin::Pin,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use virtufin_common::trace::TraceContext;
use virtufin_proto::api::v1::{
    EventStatus, PublishEventRequest, PublishEventResponse, PublishEventsRequest,
    PublishEventsResponse, StatusResponse, SubscribeRequest, SubscribeTopicEventsInitialResponse,
    SubscribeTopicEventsRequest, SubscribeTopicEventsResponse, TopicEventRequest,
    UnsubscribeRequest, pubsub_server::Pubsub,
    subscribe_topic_events_request::SubscribeTopicEventsRequestType as Req,
    subscribe_topic_events_response::SubscribeTopicEventsResponseType as Resp,
};
use virtufin_store::{Outcome, Subscription, SubscriptionSpec};

use crate::{
    App, cloudevent,
    error::{ApiError, StoreResultExt},
    validate,
};

/// One open subscription stream, as listed by `/v1/pubsub/subscriptions`.
#[derive(Debug, Clone, Serialize)]
pub struct SubscriptionInfo {
    pub id: u64,
    pub topic: String,
    pub group: String,
    pub subscriber: String,
    pub acknowledged: bool,
    pub since: String,
}

/// The open subscription streams of this api, so that Unsubscribe can end
/// them. A stream leaves it when it ends for any reason (client gone,
/// Unsubscribe, shutdown).
#[derive(Debug, Default)]
pub struct Registry {
    next: std::sync::atomic::AtomicU64,
    open: Mutex<HashMap<u64, (SubscriptionInfo, CancellationToken)>>,
}

impl Registry {
    fn add(
        &self,
        spec: &SubscriptionSpec,
        acknowledged: bool,
        parent: &CancellationToken,
    ) -> (u64, CancellationToken) {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let token = parent.child_token();
        let info = SubscriptionInfo {
            id,
            topic: spec.topic.clone(),
            group: spec.group.clone(),
            subscriber: spec.subscriber.clone(),
            acknowledged,
            since: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        };
        self.lock().insert(id, (info, token.clone()));
        (id, token)
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Ends every stream of `spec`; returns how many.
    fn cancel(&self, spec: &SubscriptionSpec) -> usize {
        let g = self.lock();
        let hits: Vec<_> = g
            .values()
            .filter(|(i, _)| {
                i.topic == spec.topic && i.group == spec.group && i.subscriber == spec.subscriber
            })
            .collect();
        for (_, t) in &hits {
            t.cancel();
        }
        hits.len()
    }

    pub fn list(&self) -> Vec<SubscriptionInfo> {
        let mut v: Vec<_> = self.lock().values().map(|(i, _)| i.clone()).collect();
        v.sort_by_key(|i| i.id);
        v
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<u64, (SubscriptionInfo, CancellationToken)>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Removes a stream from the registry when its task ends, however it ends.
struct Registered {
    registry: Arc<Registry>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.remove(self.id);
    }
}

/// Publish and subscription checks shared by gRPC and REST.
pub fn subscription_spec(
    topic: &str,
    subscriber: &str,
    group: &str,
) -> Result<SubscriptionSpec, ApiError> {
    validate::topic(topic)?;
    validate::member("subscriber", subscriber)?;
    let group = if group.is_empty() { subscriber } else { group };
    validate::member("group", group)?;
    Ok(SubscriptionSpec {
        topic: topic.to_owned(),
        group: group.to_owned(),
        subscriber: subscriber.to_owned(),
    })
}

/// Publishes one event; returns its CloudEvent id. `trace` is the call's
/// span (see [`cloudevent::build`] for which traceparent the event gets).
pub async fn publish(
    app: &App,
    topic: &str,
    data: &str,
    metadata: &HashMap<String, String>,
    trace: &TraceContext,
) -> Result<String, ApiError> {
    validate::topic(topic)?;
    validate::value_size("data", data.len(), app.limits.max_event_bytes)?;
    let (id, bytes) = cloudevent::build(
        topic,
        data,
        metadata,
        &app.event_defaults,
        app.limits.max_metadata_entries,
        trace,
    )?;
    let backend = app.backend()?;
    backend.pubsub.publish(topic, &bytes).await.api()?;
    app.metrics.published(topic);
    tracing::debug!(topic, id = %id, "published");
    Ok(id)
}

/// Publishes several events in order; all are checked before any is
/// published. Returns their CloudEvent ids.
pub async fn publish_many(
    app: &App,
    events: &[PublishEventRequest],
    trace: &TraceContext,
) -> Result<Vec<String>, ApiError> {
    if events.len() > MAX_BATCH {
        return Err(ApiError::invalid(format!(
            "{} events in one call; the limit is {MAX_BATCH}",
            events.len()
        )));
    }
    let mut ids = Vec::with_capacity(events.len());
    let mut built = Vec::with_capacity(events.len());
    let mut total = 0usize;
    for (i, e) in events.iter().enumerate() {
        let at = |err: ApiError| ApiError {
            message: format!("event {i}: {}", err.message),
            ..err
        };
        validate::topic(&e.topic).map_err(at)?;
        validate::value_size("data", e.data.len(), app.limits.max_event_bytes).map_err(at)?;
        total += e.data.len();
        let (id, bytes) = cloudevent::build(
            &e.topic,
            &e.data,
            &e.metadata,
            &app.event_defaults,
            app.limits.max_metadata_entries,
            trace,
        )
        .map_err(at)?;
        ids.push(id);
        built.push((e.topic.clone(), bytes));
    }
    validate::value_size(
        "the batch's data",
        total,
        app.limits.max_event_bytes.saturating_mul(4),
    )?;
    let backend = app.backend()?;
    backend.pubsub.publish_batch(&built).await.api()?;
    for (topic, _) in &built {
        app.metrics.published(topic);
    }
    Ok(ids)
}

/// Most events in one PublishEvents call.
pub const MAX_BATCH: usize = 1000;

type EventStream = Pin<Box<dyn Stream<Item = Result<TopicEventRequest, Status>> + Send>>;
type AckStream = Pin<Box<dyn Stream<Item = Result<SubscribeTopicEventsResponse, Status>> + Send>>;

/// The gRPC Pubsub service.
#[derive(Clone)]
pub struct PubsubService {
    pub app: Arc<App>,
}

impl PubsubService {
    /// Joins the group and registers the stream (so Unsubscribe and
    /// shutdown can end it); the guard unregisters it when the task ends.
    async fn open(
        &self,
        spec: &SubscriptionSpec,
        acknowledged: bool,
    ) -> Result<(Subscription, CancellationToken, Registered), ApiError> {
        let backend = self.app.backend()?;
        let sub = backend.pubsub.subscribe(spec.clone()).await.api()?;
        let (id, token) = self
            .app
            .subscriptions
            .add(spec, acknowledged, &self.app.shutdown);
        let guard = Registered {
            registry: self.app.subscriptions.clone(),
            id,
        };
        Ok((sub, token, guard))
    }
}

#[tonic::async_trait]
impl Pubsub for PubsubService {
    async fn publish_event(
        &self,
        req: Request<PublishEventRequest>,
    ) -> Result<Response<PublishEventResponse>, Status> {
        let trace = TraceContext::of(&req);
        let r = req.into_inner();
        let id = publish(&self.app, &r.topic, &r.data, &r.metadata, &trace).await?;
        Ok(Response::new(PublishEventResponse {
            success: true,
            id,
            message: format!("Event published to {}", r.topic),
        }))
    }

    async fn publish_events(
        &self,
        req: Request<PublishEventsRequest>,
    ) -> Result<Response<PublishEventsResponse>, Status> {
        let trace = TraceContext::of(&req);
        let r = req.into_inner();
        let ids = publish_many(&self.app, &r.events, &trace).await?;
        Ok(Response::new(PublishEventsResponse { ids }))
    }

    type SubscribeStream = EventStream;

    async fn subscribe(
        &self,
        req: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let r = req.into_inner();
        let spec = subscription_spec(&r.topic, &r.subscriber, &r.group)?;
        let (mut sub, token, guard) = self.open(&spec, false).await?;
        let (tx, rx) = mpsc::channel(16);
        let pubsub_name = self.app.event_defaults.pubsub_name.clone();
        tracing::info!(topic = %spec.topic, group = %spec.group, subscriber = %spec.subscriber, "subscribed");
        let app = self.app.clone();
        tokio::spawn(async move {
            let _guard = guard;
            loop {
                let d = tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tx.closed() => break,
                    d = sub.next() => d,
                };
                match d {
                    None => break,
                    Some(Err(e)) => {
                        tracing::warn!(topic = %spec.topic, error = %e, "subscription read failed; retrying")
                    }
                    Some(Ok(d)) => {
                        let ev = cloudevent::to_topic_event(
                            &spec.topic,
                            &d.entry_id,
                            &d.data,
                            &pubsub_name,
                        );
                        // Handed to the stream = delivered (see the proto).
                        if tx.send(Ok(ev)).await.is_err() {
                            break;
                        }
                        sub.settle(&d.entry_id, Outcome::Success);
                        app.metrics.delivered(&spec.topic, &spec.group, d.attempt);
                    }
                }
            }
            sub.close().await;
            tracing::info!(topic = %spec.topic, group = %spec.group, subscriber = %spec.subscriber, "subscription ended");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn unsubscribe(
        &self,
        req: Request<UnsubscribeRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let r = req.into_inner();
        let spec = subscription_spec(&r.topic, &r.subscriber, &r.group)?;
        let n = self.app.subscriptions.cancel(&spec);
        tracing::info!(topic = %spec.topic, group = %spec.group, subscriber = %spec.subscriber, ended = n, "unsubscribed");
        Ok(Response::new(StatusResponse {
            success: true,
            status: "OK".into(),
            message: format!("{n} subscription stream(s) ended"),
            etag: String::new(),
        }))
    }

    type SubscribeTopicEventsStream = AckStream;

    async fn subscribe_topic_events(
        &self,
        req: Request<Streaming<SubscribeTopicEventsRequest>>,
    ) -> Result<Response<Self::SubscribeTopicEventsStream>, Status> {
        let mut inbound = req.into_inner();
        let first = match inbound.message().await? {
            Some(SubscribeTopicEventsRequest {
                subscribe_topic_events_request_type: Some(Req::InitialRequest(r)),
            }) => r,
            Some(_) => {
                return Err(ApiError::invalid(
                    "the first message must be initial_request {topic, subscriber, group}",
                )
                .into());
            }
            None => {
                return Err(
                    ApiError::invalid("the stream ended before its initial_request").into(),
                );
            }
        };
        let spec = subscription_spec(&first.topic, &first.subscriber, &first.group)?;
        let (mut sub, token, guard) = self.open(&spec, true).await?;
        let (tx, rx) = mpsc::channel(16);
        let initial = SubscribeTopicEventsResponse {
            subscribe_topic_events_response_type: Some(Resp::InitialResponse(
                SubscribeTopicEventsInitialResponse {
                    topic: spec.topic.clone(),
                    subscriber: spec.subscriber.clone(),
                    group: spec.group.clone(),
                },
            )),
        };
        let _ = tx.send(Ok(initial)).await;
        let pubsub_name = self.app.event_defaults.pubsub_name.clone();
        tracing::info!(topic = %spec.topic, group = %spec.group, subscriber = %spec.subscriber, "subscribed with acknowledgements");
        let app = self.app.clone();
        tokio::spawn(async move {
            let _guard = guard;
            // CloudEvent id -> entry ids in flight (ids need not be unique).
            let mut in_flight: HashMap<String, VecDeque<String>> = HashMap::new();
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tx.closed() => break,
                    m = inbound.next() => match m {
                        Some(Ok(SubscribeTopicEventsRequest { subscribe_topic_events_request_type: Some(Req::EventProcessed(ack)) })) => {
                            let entry = in_flight.get_mut(&ack.id).and_then(VecDeque::pop_front);
                            if in_flight.get(&ack.id).is_some_and(VecDeque::is_empty) {
                                in_flight.remove(&ack.id);
                            }
                            match entry {
                                Some(entry) => {
                                    let outcome = match EventStatus::try_from(ack.status) {
                                        Ok(EventStatus::Success) => Outcome::Success,
                                        Ok(EventStatus::Retry) => Outcome::Retry,
                                        Ok(EventStatus::Drop) => Outcome::Drop,
                                        Err(_) => {
                                            tracing::warn!(id = %ack.id, status = ack.status, "unknown ack status; treating as RETRY");
                                            Outcome::Retry
                                        }
                                    };
                                    sub.settle(&entry, outcome);
                                    app.metrics.acknowledged(&spec.topic, &spec.group, outcome);
                                    app.metrics.pending_add(&spec.topic, &spec.group, -1);
                                }
                                None => tracing::debug!(id = %ack.id, "ack for an event not in flight; ignored"),
                            }
                        }
                        Some(Ok(_)) => tracing::debug!("ignoring a second initial_request"),
                        // The client half-closed or went away: end here;
                        // unsettled events are delivered again later.
                        Some(Err(_)) | None => break,
                    },
                    d = sub.next() => match d {
                        None => break,
                        Some(Err(e)) => tracing::warn!(topic = %spec.topic, error = %e, "subscription read failed; retrying"),
                        Some(Ok(d)) => {
                            let ev = cloudevent::to_topic_event(&spec.topic, &d.entry_id, &d.data, &pubsub_name);
                            in_flight.entry(ev.id.clone()).or_default().push_back(d.entry_id.clone());
                            app.metrics.delivered(&spec.topic, &spec.group, d.attempt);
                            app.metrics.pending_add(&spec.topic, &spec.group, 1);
                            let msg = SubscribeTopicEventsResponse { subscribe_topic_events_response_type: Some(Resp::EventMessage(ev)) };
                            if tx.send(Ok(msg)).await.is_err() {
                                break;
                            }
                        }
                    },
                }
            }
            // What was never acknowledged is no longer pending here (the
            // broker delivers it again).
            let left: usize = in_flight.values().map(VecDeque::len).sum();
            app.metrics.pending_add(
                &spec.topic,
                &spec.group,
                -i64::try_from(left).unwrap_or(i64::MAX),
            );
            sub.close().await;
            tracing::info!(topic = %spec.topic, group = %spec.group, subscriber = %spec.subscriber, "acknowledged subscription ended");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
