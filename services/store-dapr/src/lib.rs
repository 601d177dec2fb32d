//! virtufin-api's third backend: state and pub/sub through a Dapr sidecar
//! (daprd) over its gRPC runtime API, with the `dapr` crate's generated
//! client. Components: a state store (`statestore`) and a pub/sub
//! (`pubsub`), as in the seed's deployment.
//!
//! Mapping from our contract:
//! - etags: `SaveState`/`DeleteState` with the etag and first-write
//!   concurrency; daprd answers ABORTED on a mismatch. daprd returns no new
//!   etag, so a save reads it back (not atomic with the save).
//! - `DeleteState` says nothing about whether a key existed: a read first
//!   tells (again not atomic).
//! - events are published as ready CloudEvents
//!   (`application/cloudevents+json`), so daprd keeps our attributes.
//! - subscriptions use `SubscribeTopicEventsAlpha1`: the group is the
//!   `consumerID` metadata (pubsub.redis' consumer group), our settle maps
//!   to SUCCESS / RETRY / DROP; a broken stream (daprd restarting) is
//!   opened again.
//! - sets (registered keys) are JSON lists in state with etag retries.
//! - bytes that are not a CloudEvent travel base64 in a CloudEvent of type
//!   `com.virtufin.api.raw` and are unwrapped on delivery.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
    time::Duration,
};

use async_trait::async_trait;
use bytes::Bytes;
use dapr::dapr::proto::{common::v1 as common_v1, runtime::v1 as rt};
use rt::dapr_client::DaprClient;
use serde_json::{Map, Value};
use tonic::{Code, transport::Channel};
use virtufin_store::{
    Backend, Delivery, Outcome, PubSub, Result, StateStore, StoreError, Subscription,
    SubscriptionFeed, SubscriptionSpec, Versioned,
};

/// Where daprd is and which components to use.
#[derive(Debug, Clone)]
pub struct DaprOptions {
    pub host: String,
    pub grpc_port: u16,
    pub http_port: u16,
    pub state_store: String,
    pub pubsub: String,
    /// Longest wait for one call.
    pub timeout: Duration,
}

impl DaprOptions {
    pub fn new(grpc_port: u16, http_port: u16) -> Self {
        Self {
            host: "127.0.0.1".into(),
            grpc_port,
            http_port,
            state_store: "statestore".into(),
            pubsub: "pubsub".into(),
            timeout: Duration::from_secs(5),
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "the Dapr sidecar at {}:{} (gRPC) / {} (HTTP)",
            self.host, self.grpc_port, self.http_port
        )
    }
}

/// The Dapr backend.
#[derive(Clone)]
pub struct DaprStore {
    client: DaprClient<Channel>,
    options: DaprOptions,
    http: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Empty<Bytes>,
    >,
}

fn status_err(s: tonic::Status) -> StoreError {
    match s.code() {
        Code::Aborted => StoreError::EtagMismatch { key: String::new() },
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
            StoreError::Unavailable(format!("daprd: {}", s.message()))
        }
        _ => StoreError::Backend(format!("daprd: {:?}: {}", s.code(), s.message())),
    }
}

fn with_key(e: StoreError, key: &str) -> StoreError {
    match e {
        StoreError::EtagMismatch { .. } => StoreError::EtagMismatch {
            key: key.to_owned(),
        },
        other => other,
    }
}

/// Connects and proves the sidecar works: `/v1.0/healthz`, a state round
/// trip and a pub/sub round trip.
pub async fn connect(options: DaprOptions) -> Result<Backend> {
    let store = Arc::new(DaprStore::new(options)?);
    store.healthz().await?;
    store.state_round_trip().await?;
    store.pubsub_round_trip().await?;
    Ok(Backend {
        kind: "dapr",
        state: store.clone(),
        pubsub: store,
    })
}

impl DaprStore {
    pub fn new(options: DaprOptions) -> Result<Self> {
        let endpoint = tonic::transport::Endpoint::from_shared(format!(
            "http://{}:{}",
            options.host, options.grpc_port
        ))
        .map_err(|e| StoreError::Backend(format!("invalid Dapr address: {e}")))?
        .connect_timeout(options.timeout)
        .tcp_nodelay(true);
        let client = DaprClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        let http =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        Ok(Self {
            client,
            options,
            http,
        })
    }

    /// `GET /v1.0/healthz` answers 2xx (204) when daprd is ready.
    pub async fn healthz(&self) -> Result<()> {
        let url = format!(
            "http://{}:{}/v1.0/healthz",
            self.options.host, self.options.http_port
        );
        let uri: tonic::codegen::http::Uri = url
            .parse()
            .map_err(|e| StoreError::Backend(format!("invalid Dapr health URL {url}: {e}")))?;
        let r = tokio::time::timeout(self.options.timeout, self.http.get(uri))
            .await
            .map_err(|_| {
                StoreError::Unavailable(format!(
                    "{url}: no answer within {:?}",
                    self.options.timeout
                ))
            })?
            .map_err(|e| StoreError::Unavailable(format!("{url}: {e}")))?;
        if r.status().is_success() {
            Ok(())
        } else {
            Err(StoreError::Unavailable(format!(
                "{url} answered {}",
                r.status()
            )))
        }
    }

    async fn state_round_trip(&self) -> Result<()> {
        let probe = uuid::Uuid::new_v4().to_string();
        self.set("__virtufin/health", &probe, None).await?;
        match self.get("__virtufin/health").await? {
            Some(v) if v.value == probe => Ok(()),
            other => Err(StoreError::Backend(format!(
                "state round trip through daprd read back {other:?}"
            ))),
        }
    }

    async fn pubsub_round_trip(&self) -> Result<()> {
        let spec = SubscriptionSpec {
            topic: "virtufin.api.health".into(),
            group: "virtufin-api-health".into(),
            subscriber: format!("probe-{}", uuid::Uuid::new_v4()),
        };
        let mut sub = self.subscribe(spec).await?;
        let id = uuid::Uuid::new_v4().to_string();
        let ce = serde_json::json!({"specversion":"1.0","id":id,"source":"virtufin-api","type":"com.virtufin.api.health","datacontenttype":"text/plain","data":"probe"});
        let bytes = serde_json::to_vec(&ce).map_err(|e| StoreError::Backend(e.to_string()))?;
        self.publish("virtufin.api.health", &bytes).await?;
        let wait = async {
            while let Some(d) = sub.next().await {
                let d = d?;
                sub.settle(&d.entry_id, Outcome::Success);
                if d.entry_id == id {
                    return Ok(());
                }
            }
            Err(StoreError::Unavailable(
                "the probe subscription ended".into(),
            ))
        };
        let r = tokio::time::timeout(self.options.timeout, wait)
            .await
            .map_err(|_| {
                StoreError::Unavailable("a pub/sub round trip through daprd took too long".into())
            })?;
        sub.close().await;
        r
    }

    async fn save(
        &self,
        key: &str,
        value: &str,
        etag: Option<&str>,
        first_write: bool,
    ) -> Result<()> {
        let concurrency = if etag.is_some() || first_write {
            common_v1::state_options::StateConcurrency::ConcurrencyFirstWrite
        } else {
            common_v1::state_options::StateConcurrency::ConcurrencyLastWrite
        };
        let item = common_v1::StateItem {
            key: key.to_owned(),
            value: value.as_bytes().to_vec(),
            etag: etag.map(|e| common_v1::Etag {
                value: e.to_owned(),
            }),
            metadata: HashMap::new(),
            options: Some(common_v1::StateOptions {
                concurrency: concurrency as i32,
                consistency: common_v1::state_options::StateConsistency::ConsistencyStrong as i32,
            }),
        };
        self.client
            .clone()
            .save_state(rt::SaveStateRequest {
                store_name: self.options.state_store.clone(),
                states: vec![item],
            })
            .await
            .map_err(|s| with_key(status_err(s), key))?;
        Ok(())
    }

    fn sets_key(key: &str) -> String {
        format!("__virtufin.sets/{key}")
    }
}

#[async_trait]
impl StateStore for DaprStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>> {
        let r = self
            .client
            .clone()
            .get_state(rt::GetStateRequest {
                store_name: self.options.state_store.clone(),
                key: key.to_owned(),
                consistency: 0,
                metadata: HashMap::new(),
            })
            .await
            .map_err(status_err)?
            .into_inner();
        if r.etag.is_empty() && r.data.is_empty() {
            return Ok(None);
        }
        Ok(Some(Versioned {
            value: String::from_utf8_lossy(&r.data).into_owned(),
            etag: r.etag,
        }))
    }

    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Versioned>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let r = self
            .client
            .clone()
            .get_bulk_state(rt::GetBulkStateRequest {
                store_name: self.options.state_store.clone(),
                keys: keys.to_vec(),
                parallelism: 0,
                metadata: HashMap::new(),
            })
            .await
            .map_err(status_err)?
            .into_inner();
        let mut by_key: HashMap<String, Option<Versioned>> = r
            .items
            .into_iter()
            .map(|i| {
                let v = (!(i.etag.is_empty() && i.data.is_empty())).then(|| Versioned {
                    value: String::from_utf8_lossy(&i.data).into_owned(),
                    etag: i.etag,
                });
                (i.key, v)
            })
            .collect();
        Ok(keys.iter().map(|k| by_key.remove(k).flatten()).collect())
    }

    async fn set(&self, key: &str, value: &str, etag: Option<&str>) -> Result<String> {
        self.save(key, value, etag, false).await?;
        // daprd does not return the new etag: read it back.
        Ok(self.get(key).await?.map(|v| v.etag).unwrap_or_default())
    }

    async fn delete(&self, key: &str, etag: Option<&str>) -> Result<bool> {
        let existed = self.get(key).await?.is_some();
        if !existed {
            return match etag {
                Some(_) => Err(StoreError::EtagMismatch {
                    key: key.to_owned(),
                }),
                None => Ok(false),
            };
        }
        self.client
            .clone()
            .delete_state(rt::DeleteStateRequest {
                store_name: self.options.state_store.clone(),
                key: key.to_owned(),
                etag: etag.map(|e| common_v1::Etag {
                    value: e.to_owned(),
                }),
                options: Some(common_v1::StateOptions {
                    concurrency: if etag.is_some() {
                        common_v1::state_options::StateConcurrency::ConcurrencyFirstWrite as i32
                    } else {
                        common_v1::state_options::StateConcurrency::ConcurrencyLastWrite as i32
                    },
                    consistency: common_v1::state_options::StateConsistency::ConsistencyStrong
                        as i32,
                }),
                metadata: HashMap::new(),
            })
            .await
            .map_err(|s| with_key(status_err(s), key))?;
        Ok(true)
    }

    async fn set_add(&self, key: &str, members: &[String]) -> Result<usize> {
        if members.is_empty() {
            return Ok(0);
        }
        let skey = Self::sets_key(key);
        for _ in 0..32 {
            let current = self.get(&skey).await?;
            let (mut set, etag): (BTreeSet<String>, Option<String>) = match &current {
                Some(v) => (
                    serde_json::from_str(&v.value).unwrap_or_default(),
                    Some(v.etag.clone()),
                ),
                None => (BTreeSet::new(), None),
            };
            let before = set.len();
            set.extend(members.iter().cloned());
            let added = set.len() - before;
            if added == 0 {
                return Ok(0);
            }
            let body =
                serde_json::to_string(&set).map_err(|e| StoreError::Backend(e.to_string()))?;
            // First write when creating: two creators cannot both win.
            match self
                .save(&skey, &body, etag.as_deref(), etag.is_none())
                .await
            {
                Ok(()) => return Ok(added),
                Err(StoreError::EtagMismatch { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Backend(format!(
            "the set {key} kept changing; try again"
        )))
    }

    async fn set_members(&self, key: &str) -> Result<Vec<String>> {
        match self.get(&Self::sets_key(key)).await? {
            Some(v) => serde_json::from_str(&v.value)
                .map_err(|e| StoreError::Backend(format!("the set {key} is not a JSON list: {e}"))),
            None => Ok(Vec::new()),
        }
    }

    async fn ping(&self) -> Result<()> {
        self.healthz().await
    }
}

/// The CloudEvent type that carries bytes which were not a CloudEvent
/// themselves (base64, unwrapped again on delivery).
const RAW_TYPE: &str = "com.virtufin.api.raw";

fn is_cloudevent(data: &[u8]) -> bool {
    matches!(serde_json::from_slice::<Value>(data), Ok(Value::Object(m)) if m.contains_key("specversion"))
}

fn wrap_raw(data: &[u8]) -> Result<Vec<u8>> {
    use base64::Engine;
    serde_json::to_vec(&serde_json::json!({
        "specversion": "1.0",
        "id": uuid::Uuid::new_v4().to_string(),
        "source": "virtufin-api",
        "type": RAW_TYPE,
        "datacontenttype": "application/octet-stream",
        "data_base64": base64::engine::general_purpose::STANDARD.encode(data),
    }))
    .map_err(|e| StoreError::Backend(e.to_string()))
}

/// Rebuilds the CloudEvent (JSON) that daprd handed over field by field.
fn envelope(ev: rt::TopicEventRequest) -> Vec<u8> {
    let mut m = Map::new();
    if let Some(ext) = ev.extensions {
        for (k, v) in ext.fields {
            m.insert(k, virtufin_proto::json::from_prost(&v));
        }
    }
    let ct = ev.data_content_type.clone();
    let data = if ct.contains("json") {
        serde_json::from_slice::<Value>(&ev.data).ok()
    } else {
        None
    };
    match (data, std::str::from_utf8(&ev.data)) {
        (Some(v), _) => {
            m.insert("data".into(), v);
        }
        (None, Ok(s)) => {
            m.insert("data".into(), Value::String(s.to_owned()));
        }
        (None, Err(_)) => {
            use base64::Engine;
            m.insert(
                "data_base64".into(),
                Value::String(base64::engine::general_purpose::STANDARD.encode(&ev.data)),
            );
        }
    }
    for (k, v) in [
        ("id", ev.id),
        ("source", ev.source),
        ("type", ev.r#type),
        ("specversion", ev.spec_version),
        ("datacontenttype", ct),
        ("topic", ev.topic),
        ("pubsubname", ev.pubsub_name),
    ] {
        m.insert(k.into(), Value::String(v));
    }
    serde_json::to_vec(&Value::Object(m)).unwrap_or_default()
}

#[async_trait]
impl PubSub for DaprStore {
    async fn publish(&self, topic: &str, data: &[u8]) -> Result<String> {
        let wrapped;
        let data = if is_cloudevent(data) {
            data
        } else {
            wrapped = wrap_raw(data)?;
            wrapped.as_slice()
        };
        self.client
            .clone()
            .publish_event(rt::PublishEventRequest {
                pubsub_name: self.options.pubsub.clone(),
                topic: topic.to_owned(),
                data: data.to_vec(),
                data_content_type: "application/cloudevents+json".into(),
                metadata: HashMap::new(),
            })
            .await
            .map_err(status_err)?;
        // daprd returns no entry id: the CloudEvent id stands in.
        let id = serde_json::from_slice::<Value>(data)
            .ok()
            .and_then(|v| v.get("id").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_default();
        Ok(id)
    }

    async fn subscribe(&self, spec: SubscriptionSpec) -> Result<Subscription> {
        let (feed, subscription) = Subscription::channel(64);
        let first = open_stream(self, &spec).await?;
        tokio::spawn(run_subscription(self.clone(), spec, feed, first));
        Ok(subscription)
    }

    async fn ping(&self) -> Result<()> {
        self.healthz().await
    }
}

type Outbound = tokio::sync::mpsc::Sender<rt::SubscribeTopicEventsRequestAlpha1>;

async fn open_stream(
    store: &DaprStore,
    spec: &SubscriptionSpec,
) -> Result<(
    Outbound,
    tonic::Streaming<rt::SubscribeTopicEventsResponseAlpha1>,
)> {
    use rt::subscribe_topic_events_request_alpha1::SubscribeTopicEventsRequestType as Req;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let mut metadata = HashMap::new();
    metadata.insert("consumerID".to_owned(), spec.group.clone());
    metadata.insert("virtufinMember".to_owned(), spec.subscriber.clone());
    let initial = rt::SubscribeTopicEventsRequestAlpha1 {
        subscribe_topic_events_request_type: Some(Req::InitialRequest(
            rt::SubscribeTopicEventsRequestInitialAlpha1 {
                pubsub_name: store.options.pubsub.clone(),
                topic: spec.topic.clone(),
                metadata,
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

async fn run_subscription(
    store: DaprStore,
    spec: SubscriptionSpec,
    mut feed: SubscriptionFeed,
    first: (
        Outbound,
        tonic::Streaming<rt::SubscribeTopicEventsResponseAlpha1>,
    ),
) {
    use rt::{
        subscribe_topic_events_request_alpha1::SubscribeTopicEventsRequestType as Req,
        subscribe_topic_events_response_alpha1::SubscribeTopicEventsResponseType as Resp,
        topic_event_response::TopicEventResponseStatus as St,
    };
    let (mut out, mut stream) = first;
    let mut backoff = Duration::from_millis(100);
    // Deliveries seen by this subscription and not settled for good, to
    // count redeliveries (daprd reports no delivery count).
    let mut seen: HashMap<String, u32> = HashMap::new();
    'outer: loop {
        loop {
            tokio::select! {
                _ = feed.cancel.cancelled() => break 'outer,
                a = feed.acks.recv() => {
                    let Some((id, outcome)) = a else { break 'outer };
                    if outcome != Outcome::Retry {
                        seen.remove(&id);
                    }
                    let status = match outcome { Outcome::Success => St::Success, Outcome::Retry => St::Retry, Outcome::Drop => St::Drop };
                    let msg = rt::SubscribeTopicEventsRequestAlpha1 {
                        subscribe_topic_events_request_type: Some(Req::EventProcessed(rt::SubscribeTopicEventsRequestProcessedAlpha1 {
                            id,
                            status: Some(rt::TopicEventResponse { status: status as i32 }),
                        })),
                    };
                    if out.send(msg).await.is_err() { break }
                }
                m = stream.message() => match m {
                    Ok(Some(rt::SubscribeTopicEventsResponseAlpha1 { subscribe_topic_events_response_type: Some(Resp::EventMessage(ev)) })) => {
                        backoff = Duration::from_millis(100);
                        let id = ev.id.clone();
                        let data = if ev.r#type == RAW_TYPE { Bytes::from(ev.data) } else { Bytes::from(envelope(ev)) };
                        let attempt = {
                            let n = seen.entry(id.clone()).or_insert(0);
                            *n += 1;
                            *n
                        };
                        if seen.len() > 100_000 {
                            seen.clear();
                        }
                        let d = Delivery { entry_id: id, data, attempt };
                        if feed.tx.send(Ok(d)).await.is_err() { break 'outer }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                },
            }
        }
        // The stream broke (daprd restarting): open it again.
        tracing::warn!(topic = %spec.topic, retry_in = ?backoff, "Dapr subscription stream lost; reopening");
        loop {
            tokio::select! {
                _ = feed.cancel.cancelled() => break 'outer,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
            match open_stream(&store, &spec).await {
                Ok((o, s)) => {
                    out = o;
                    stream = s;
                    tracing::info!(topic = %spec.topic, "Dapr subscription stream reopened");
                    continue 'outer;
                }
                Err(e) => {
                    let _ = feed.tx.try_send(Err(e));
                }
            }
        }
    }
    // Settlements sent before the subscriber left still go out.
    use rt::subscribe_topic_events_request_alpha1::SubscribeTopicEventsRequestType as R2;
    while let Ok((id, outcome)) = feed.acks.try_recv() {
        let status = match outcome {
            Outcome::Success => St::Success,
            Outcome::Retry => St::Retry,
            Outcome::Drop => St::Drop,
        };
        let _ = out
            .send(rt::SubscribeTopicEventsRequestAlpha1 {
                subscribe_topic_events_request_type: Some(R2::EventProcessed(
                    rt::SubscribeTopicEventsRequestProcessedAlpha1 {
                        id,
                        status: Some(rt::TopicEventResponse {
                            status: status as i32,
                        }),
                    },
                )),
            })
            .await;
    }
    // Give daprd the acks before the stream closes.
    drop(out);
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(Some(_)) = stream.message().await {}
    })
    .await;
    feed.finish();
}
