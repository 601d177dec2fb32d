//! Subscriptions through daprd: one long-lived `SubscribeTopicEventsAlpha1`
//! stream per topic (a hub), shared by every subscriber of the topic in
//! this api, which the hub hands events to.
//!
//! Why not one daprd stream per subscriber: when a streaming subscription
//! ends, daprd (1.17) marks it closed, waits for its deliveries in flight,
//! and only then stops pubsub.redis' loops for it; meanwhile those loops
//! keep reading the topic, the closed subscription answers "subscription is
//! closed", and pubsub.redis acknowledges — the event is lost. So a hub
//! opens its stream once and keeps it while the api runs (re-opened when
//! daprd restarts); subscribers come and go inside the api. That also lets
//! an event a leaving subscriber did not settle go to another member at
//! once, as on the other backends.
//!
//! One group per topic: pubsub.redis has one consumer group per daprd (its
//! app id) whatever a subscription asks for, so a hub serves one group at a
//! time; another group is refused while the first has members.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    time::Duration,
};

use bytes::Bytes;
use dapr::dapr::proto::runtime::v1 as rt;
use futures_util::StreamExt;
use rt::{
    subscribe_topic_events_request_alpha1::SubscribeTopicEventsRequestType as Req,
    subscribe_topic_events_response_alpha1::SubscribeTopicEventsResponseType as Resp,
    topic_event_response::TopicEventResponseStatus as St,
};
use tokio::sync::{mpsc, oneshot};
use virtufin_store::{
    Delivery, Outcome, Result, StoreError, Subscription, SubscriptionFeed, SubscriptionSpec,
};

use crate::{DaprStore, RAW_TYPE, envelope, status_err};

type Outbound = mpsc::Sender<rt::SubscribeTopicEventsRequestAlpha1>;
type Inbound = tonic::Streaming<rt::SubscribeTopicEventsResponseAlpha1>;

/// What the hub task is told.
enum Msg {
    Join {
        group: String,
        subscriber: String,
        tx: mpsc::Sender<Result<Delivery>>,
        reply: oneshot::Sender<Result<u64>>,
    },
    Settle {
        member: u64,
        id: String,
        outcome: Outcome,
    },
    Leave {
        member: u64,
        done: oneshot::Sender<()>,
    },
}

/// A handle on a topic's hub task.
#[derive(Clone)]
pub(crate) struct Hub {
    tx: mpsc::UnboundedSender<Msg>,
}

impl Hub {
    /// Opens the topic's daprd stream (an error if daprd does not take it)
    /// and starts the hub task.
    pub(crate) async fn open(store: &DaprStore, topic: &str) -> Result<Self> {
        let stream = open_stream(store, topic).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(store.clone(), topic.to_owned(), rx, Some(stream)));
        Ok(Self { tx })
    }

    pub(crate) fn is_alive(&self) -> bool {
        !self.tx.is_closed()
    }

    /// Joins the hub as a member of `spec.group`.
    pub(crate) async fn subscribe(
        &self,
        spec: &SubscriptionSpec,
        max_in_flight: usize,
    ) -> Result<Subscription> {
        // Room for every delivery a member may hold unsettled: the hub
        // never has to wait for a member to read.
        let (feed, subscription) = Subscription::channel(max_in_flight.max(1));
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Msg::Join {
                group: spec.group.clone(),
                subscriber: spec.subscriber.clone(),
                tx: feed.tx.clone(),
                reply,
            })
            .map_err(|_| gone())?;
        let member = answer.await.map_err(|_| gone())??;
        tokio::spawn(forward(self.tx.clone(), member, feed));
        Ok(subscription)
    }
}

fn gone() -> StoreError {
    StoreError::Unavailable("the topic's Dapr subscription has ended; subscribe again".into())
}

/// Carries one member's settlements to the hub and, when the member
/// leaves, tells the hub and reports the subscription finished once its
/// settlements have reached daprd.
async fn forward(hub: mpsc::UnboundedSender<Msg>, member: u64, mut feed: SubscriptionFeed) {
    loop {
        tokio::select! {
            _ = feed.cancel.cancelled() => break,
            a = feed.acks.recv() => match a {
                Some((id, outcome)) => {
                    if hub.send(Msg::Settle { member, id, outcome }).is_err() {
                        break;
                    }
                }
                None => break,
            },
        }
    }
    while let Ok((id, outcome)) = feed.acks.try_recv() {
        let _ = hub.send(Msg::Settle {
            member,
            id,
            outcome,
        });
    }
    let (done, left) = oneshot::channel();
    if hub.send(Msg::Leave { member, done }).is_ok() {
        let _ = left.await;
    }
    feed.finish();
}

async fn open_stream(store: &DaprStore, topic: &str) -> Result<(Outbound, Inbound)> {
    let (tx, rx) = mpsc::channel(256);
    let initial = rt::SubscribeTopicEventsRequestAlpha1 {
        subscribe_topic_events_request_type: Some(Req::InitialRequest(
            rt::SubscribeTopicEventsRequestInitialAlpha1 {
                pubsub_name: store.options.pubsub.clone(),
                topic: topic.to_owned(),
                // pubsub.redis ignores a per-subscription consumerID.
                metadata: HashMap::new(),
                dead_letter_topic: None,
            },
        )),
    };
    tx.send(initial)
        .await
        .map_err(|_| StoreError::Backend("subscription request channel closed".into()))?;
    let mut stream = store
        .client
        .clone()
        .subscribe_topic_events_alpha1(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(status_err)?
        .into_inner();
    // The first answer acknowledges the subscription.
    match stream.message().await.map_err(status_err)? {
        Some(_) => Ok((tx, stream)),
        None => Err(StoreError::Unavailable(
            "daprd ended the subscription at once".into(),
        )),
    }
}

struct Member {
    subscriber: String,
    tx: mpsc::Sender<Result<Delivery>>,
    /// Ids handed to this member and not settled.
    out: HashSet<String>,
}

/// The hub's state besides the daprd stream.
struct State {
    topic: String,
    max_in_flight: usize,
    retry_delay: Duration,
    group: Option<String>,
    members: BTreeMap<u64, Member>,
    next_member: u64,
    /// Where the next round-robin pick starts.
    cursor: u64,
    /// Events daprd handed over and waits to hear about, by CloudEvent id,
    /// with how often each was handed out.
    held: HashMap<String, (Bytes, u32)>,
    /// Ids waiting for a member with room (new, retried, or left behind).
    ready: VecDeque<String>,
    retries: tokio_util::time::DelayQueue<String>,
}

impl State {
    fn join(
        &mut self,
        group: String,
        subscriber: String,
        tx: mpsc::Sender<Result<Delivery>>,
    ) -> Result<u64> {
        match &self.group {
            Some(g) if *g != group && !self.members.is_empty() => {
                return Err(StoreError::Unsupported(format!(
                    "topic '{}' is being consumed by group '{g}': on the dapr backend a \
                     topic serves one group at a time (pubsub.redis has one consumer group \
                     per daprd, its app id, so a second group would get only some of the \
                     events); subscribe with group '{g}' or use the valkey backend",
                    self.topic
                )));
            }
            _ => self.group = Some(group),
        }
        let id = self.next_member;
        self.next_member += 1;
        self.members.insert(
            id,
            Member {
                subscriber,
                tx,
                out: HashSet::new(),
            },
        );
        Ok(id)
    }

    /// A member left: what it held goes to the others first.
    fn leave(&mut self, member: u64) {
        if let Some(m) = self.members.remove(&member) {
            tracing::debug!(topic = %self.topic, subscriber = %m.subscriber, unsettled = m.out.len(), "member left");
            for id in m.out {
                self.ready.push_front(id);
            }
        }
    }

    /// Hands ready events to members with room, round robin.
    fn dispatch(&mut self) {
        'events: while let Some(id) = self.ready.front().cloned() {
            if !self.held.contains_key(&id) {
                self.ready.pop_front();
                continue;
            }
            let ids: Vec<u64> = self
                .members
                .range(self.cursor..)
                .chain(self.members.range(..self.cursor))
                .map(|(k, _)| *k)
                .collect();
            for k in ids {
                let Some(m) = self.members.get_mut(&k) else {
                    continue;
                };
                if m.out.len() >= self.max_in_flight.max(1) {
                    continue;
                }
                let Some((data, attempt)) = self.held.get_mut(&id) else {
                    continue 'events;
                };
                *attempt += 1;
                let d = Delivery {
                    entry_id: id.clone(),
                    data: data.clone(),
                    attempt: *attempt,
                };
                // Never full: the channel has room for max_in_flight.
                if m.tx.try_send(Ok(d)).is_err() {
                    *attempt -= 1;
                    continue;
                }
                m.out.insert(id.clone());
                self.cursor = k + 1;
                self.ready.pop_front();
                continue 'events;
            }
            // Nobody has room: wait for a settlement or a new member.
            return;
        }
    }

    /// The stream to daprd broke: daprd delivers what it was waiting for
    /// again (after its processing timeout); members' unsettled events are
    /// forgotten here (their late settlements are ignored).
    fn forget(&mut self) {
        self.held.clear();
        self.ready.clear();
        self.retries.clear();
        for m in self.members.values_mut() {
            m.out.clear();
        }
    }
}

fn processed(id: String, status: St) -> rt::SubscribeTopicEventsRequestAlpha1 {
    rt::SubscribeTopicEventsRequestAlpha1 {
        subscribe_topic_events_request_type: Some(Req::EventProcessed(
            rt::SubscribeTopicEventsRequestProcessedAlpha1 {
                id,
                status: Some(rt::TopicEventResponse {
                    status: status as i32,
                }),
            },
        )),
    }
}

async fn run(
    store: DaprStore,
    topic: String,
    mut rx: mpsc::UnboundedReceiver<Msg>,
    mut stream: Option<(Outbound, Inbound)>,
) {
    let mut s = State {
        topic: topic.clone(),
        max_in_flight: store.options.max_in_flight,
        retry_delay: store.options.retry_delay,
        group: None,
        members: BTreeMap::new(),
        next_member: 0,
        cursor: 0,
        held: HashMap::new(),
        ready: VecDeque::new(),
        retries: tokio_util::time::DelayQueue::new(),
    };
    let mut backoff = Duration::from_millis(100);
    let mut reopen_at = tokio::time::Instant::now();
    loop {
        s.dispatch();
        // Without a stream: re-open it (daprd restarting) after the backoff.
        let Some((out, inbound)) = stream.as_mut() else {
            tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => {
                        handle(&mut s, m, None).await;
                    }
                    None => return,
                },
                _ = tokio::time::sleep_until(reopen_at) => {
                    match open_stream(&store, &topic).await {
                        Ok(st) => {
                            tracing::info!(%topic, "Dapr subscription stream reopened");
                            stream = Some(st);
                            backoff = Duration::from_millis(100);
                        }
                        Err(e) => {
                            tracing::debug!(%topic, error = %e, "Dapr subscription stream not back yet");
                            for m in s.members.values() {
                                let _ = m.tx.try_send(Err(e.clone()));
                            }
                            reopen_at = tokio::time::Instant::now() + backoff;
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                        }
                    }
                }
            }
            continue;
        };
        let mut broken = false;
        tokio::select! {
            m = rx.recv() => match m {
                Some(m) => broken = !handle(&mut s, m, Some(out)).await,
                // Every handle is gone (the store was dropped).
                None => return,
            },
            Some(expired) = s.retries.next(), if !s.retries.is_empty() => {
                s.ready.push_back(expired.into_inner());
            }
            m = inbound.message() => match m {
                Ok(Some(rt::SubscribeTopicEventsResponseAlpha1 {
                    subscribe_topic_events_response_type: Some(Resp::EventMessage(ev)),
                })) => {
                    let id = ev.id.clone();
                    if s.held.contains_key(&id) {
                        // daprd's reclaim loop re-sent an event in hand: the
                        // one answer settles it.
                        tracing::debug!(%id, %topic, "redelivery of an event in hand; not handed out twice");
                    } else {
                        let data = if ev.r#type == RAW_TYPE {
                            Bytes::from(ev.data)
                        } else {
                            Bytes::from(envelope(ev))
                        };
                        s.held.insert(id.clone(), (data, 0));
                        s.ready.push_back(id);
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => broken = true,
            },
        }
        if broken {
            tracing::warn!(%topic, retry_in = ?backoff, "Dapr subscription stream lost; reopening");
            stream = None;
            s.forget();
            reopen_at = tokio::time::Instant::now() + backoff;
        }
    }
}

/// Applies one message; false when the daprd stream turned out broken.
async fn handle(s: &mut State, m: Msg, out: Option<&mut Outbound>) -> bool {
    match m {
        Msg::Join {
            group,
            subscriber,
            tx,
            reply,
        } => {
            let _ = reply.send(s.join(group, subscriber, tx));
        }
        Msg::Leave { member, done } => {
            s.leave(member);
            let _ = done.send(());
        }
        Msg::Settle {
            member,
            id,
            outcome,
        } => {
            let Some(m) = s.members.get_mut(&member) else {
                return true;
            };
            if !m.out.remove(&id) {
                tracing::debug!(%id, "settlement of an event not handed out; ignored");
                return true;
            }
            let status = match outcome {
                // Kept here: to daprd RETRY is a handler error, which
                // pubsub.redis answers by acknowledging (losing) the event.
                Outcome::Retry => {
                    s.retries.insert(id, s.retry_delay);
                    return true;
                }
                Outcome::Success => St::Success,
                Outcome::Drop => St::Drop,
            };
            s.held.remove(&id);
            if let Some(out) = out
                && out.send(processed(id, status)).await.is_err()
            {
                return false;
            }
        }
    }
    true
}
