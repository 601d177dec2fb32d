//! virtufin-api's third backend: state and pub/sub through a Dapr sidecar
//! (daprd) over its gRPC runtime API, with the `dapr` crate's generated
//! client. Components: a state store (`statestore`) and a pub/sub
//! (`pubsub`), as `packaging/dapr/resources` renders them.
//!
//! Mapping from our contract, and where daprd (state.redis, pubsub.redis)
//! needs help to keep it (each checked against real daprd in the tests):
//! - etags are state.redis versions (decimal numbers). A save or delete
//!   with an etag that is not one can never match: refused as a mismatch
//!   without asking daprd (which would answer INVALID_ARGUMENT).
//! - saves go with unspecified concurrency: FIRST_WRITE would leave a
//!   `first-write` marker on the key that makes every later save without an
//!   etag fail. state.redis accepts any etag for a key that does not exist,
//!   so an etag-guarded save reads the key first (not atomic with the save:
//!   a concurrent delete can let it recreate the key).
//! - daprd returns no new etag and no "deleted" flag: a save reads the etag
//!   back, a delete reads first (again not atomic).
//! - events are published as ready CloudEvents
//!   (`application/cloudevents+json`), so daprd keeps our attributes; bytes
//!   that are not a CloudEvent travel base64 in one of type
//!   `com.virtufin.api.raw` and are unwrapped on delivery.
//! - subscriptions use `SubscribeTopicEventsAlpha1`, one long-lived stream
//!   per topic shared by the topic's subscribers in this api (the `hub`
//!   module says why: daprd loses events when a stream ends). pubsub.redis
//!   has one consumer group per daprd (its app id): a topic serves one group
//!   at a time; a second is refused (FAILED_PRECONDITION) instead of
//!   silently getting some of the events.
//! - RETRY is kept here: the event is handed out again after the retry
//!   delay, and daprd hears only SUCCESS or DROP (to daprd, RETRY is a
//!   handler error, which pubsub.redis acknowledges: the event would be
//!   lost). The in-flight limit is applied here too (daprd pushes).
//! - sets (registered keys) are JSON lists in state with etag retries.
//! - every state and publish call carries the api's trace context (the
//!   span of the call being served) as `traceparent` metadata, so daprd's
//!   spans join the caller's trace; the event itself carries its
//!   `traceparent` and, mirrored, `traceid`, which daprd keeps.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
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
    Backend, Outcome, PubSub, Result, StateStore, StoreError, Subscription, SubscriptionSpec,
    Versioned,
};

mod hub;

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
    /// Delay before an event settled with RETRY is handed out again.
    pub retry_delay: Duration,
    /// Most events handed to one subscriber and not settled yet.
    pub max_in_flight: usize,
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
            retry_delay: Duration::from_secs(1),
            max_in_flight: 256,
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
    /// Create-only writes, one at a time: state.redis cannot create "if
    /// absent", so the read and the write must not interleave with another
    /// creator's (every write to this daprd comes through this api).
    creating: Arc<tokio::sync::Mutex<()>>,
    /// Each topic's subscription hub (one daprd stream per topic).
    hubs: Arc<tokio::sync::Mutex<HashMap<String, hub::Hub>>>,
    http: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Empty<Bytes>,
    >,
}

/// A call to daprd carrying the trace context in force (the api's span
/// for the call being served) as `traceparent` metadata, so daprd's own
/// spans join the caller's trace.
fn traced<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(ctx) = virtufin_common::trace::current() {
        ctx.inject(req.metadata_mut());
    }
    req
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

/// state.redis versions are decimal numbers; anything else never matches.
fn check_etag(key: &str, etag: &str) -> Result<()> {
    if etag.is_empty() || etag.len() > 20 || !etag.bytes().all(|b| b.is_ascii_digit()) {
        return Err(StoreError::EtagMismatch {
            key: key.to_owned(),
        });
    }
    Ok(())
}

/// Unspecified concurrency: daprd checks an etag when one is given, and
/// state.redis leaves no `first-write` marker behind (FIRST_WRITE would,
/// and every later save without an etag would then fail).
fn state_options() -> common_v1::StateOptions {
    common_v1::StateOptions {
        concurrency: common_v1::state_options::StateConcurrency::ConcurrencyUnspecified as i32,
        consistency: common_v1::state_options::StateConsistency::ConsistencyStrong as i32,
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
    let proved = async {
        store.healthz().await?;
        store.state_round_trip().await?;
        store.pubsub_round_trip().await
    }
    .await;
    if let Err(e) = proved {
        // A failed attempt must not leave its topic streams behind: a hub
        // task holds the store, and so the map holding its own handle, and
        // would run for good; pubsub.redis hands each event to one of
        // daprd's streams, so a stream nobody reads takes the next
        // attempts' probe events and the api never becomes ready (seen in
        // the chain test after daprd was frozen and thawed).
        store.hubs.lock().await.clear();
        return Err(e);
    }
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
            creating: Arc::default(),
            hubs: Arc::default(),
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
        // A probe can be taken by a daprd stream of this topic that is
        // ending (the previous api's, or an earlier attempt's): pubsub.redis
        // keeps reading for it a while, answers "subscription is closed" and
        // acknowledges the event. One lost probe must not fail the attempt
        // (each failed attempt would end a stream that takes the next
        // attempt's probe), so a new one goes out every PROBE_REPEAT until
        // one of them comes back.
        let mut sent = HashSet::new();
        let mut repeat = tokio::time::interval(PROBE_REPEAT);
        let wait = async {
            loop {
                tokio::select! {
                    _ = repeat.tick() => {
                        let id = uuid::Uuid::new_v4().to_string();
                        let ce = serde_json::json!({"specversion":"1.0","id":id,"source":"virtufin-api","type":"com.virtufin.api.health","datacontenttype":"text/plain","data":"probe"});
                        let bytes = serde_json::to_vec(&ce).map_err(|e| StoreError::Backend(e.to_string()))?;
                        self.publish("virtufin.api.health", &bytes).await?;
                        sent.insert(id);
                    }
                    d = sub.next() => {
                        let Some(d) = d else {
                            return Err(StoreError::Unavailable(
                                "the probe subscription ended".into(),
                            ));
                        };
                        let d = d?;
                        sub.settle(&d.entry_id, Outcome::Success);
                        if sent.contains(&d.entry_id) {
                            return Ok(());
                        }
                    }
                }
            }
        };
        let r = tokio::time::timeout(self.options.timeout, wait)
            .await
            .map_err(|_| {
                StoreError::Unavailable("a pub/sub round trip through daprd took too long".into())
            })?;
        sub.close().await;
        r
    }

    /// Writes through daprd. With `etag`, only if the key exists with that
    /// version (daprd alone would also accept any etag on a missing key).
    async fn save(&self, key: &str, value: &str, etag: Option<&str>) -> Result<()> {
        let mut etag = etag;
        let _creating = match etag {
            Some(virtufin_store::CREATE_ONLY) => Some(self.creating.lock().await),
            _ => None,
        };
        if let Some(e) = etag {
            check_etag(key, e)?;
            let exists = self.get(key).await?.is_some();
            if exists == (e == virtufin_store::CREATE_ONLY) {
                return Err(StoreError::EtagMismatch {
                    key: key.to_owned(),
                });
            }
            if e == virtufin_store::CREATE_ONLY {
                // Create only: state.redis cannot say "if absent"; the read
                // above, under `creating`, stands in.
                etag = None;
            }
        }
        let item = common_v1::StateItem {
            key: key.to_owned(),
            value: value.as_bytes().to_vec(),
            etag: etag.map(|e| common_v1::Etag {
                value: e.to_owned(),
            }),
            metadata: HashMap::new(),
            options: Some(state_options()),
        };
        self.client
            .clone()
            .save_state(traced(rt::SaveStateRequest {
                store_name: self.options.state_store.clone(),
                states: vec![item],
            }))
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
            .get_state(traced(rt::GetStateRequest {
                store_name: self.options.state_store.clone(),
                key: key.to_owned(),
                consistency: 0,
                metadata: HashMap::new(),
            }))
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
            .get_bulk_state(traced(rt::GetBulkStateRequest {
                store_name: self.options.state_store.clone(),
                keys: keys.to_vec(),
                parallelism: 0,
                metadata: HashMap::new(),
            }))
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
        self.save(key, value, etag).await?;
        // daprd does not return the new etag: read it back.
        Ok(self.get(key).await?.map(|v| v.etag).unwrap_or_default())
    }

    async fn delete(&self, key: &str, etag: Option<&str>) -> Result<bool> {
        if let Some(e) = etag {
            check_etag(key, e)?;
        }
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
            .delete_state(traced(rt::DeleteStateRequest {
                store_name: self.options.state_store.clone(),
                key: key.to_owned(),
                etag: etag.map(|e| common_v1::Etag {
                    value: e.to_owned(),
                }),
                options: Some(state_options()),
                metadata: HashMap::new(),
            }))
            .await
            .map_err(|s| with_key(status_err(s), key))?;
        Ok(true)
    }

    async fn set_add(&self, key: &str, members: &[String]) -> Result<usize> {
        if members.is_empty() {
            return Ok(0);
        }
        let skey = Self::sets_key(key);
        let mut added = None;
        for _ in 0..32 {
            let current = self.get(&skey).await?;
            let (mut set, etag): (BTreeSet<String>, Option<String>) = match &current {
                Some(v) => (
                    serde_json::from_str(&v.value).map_err(|e| {
                        StoreError::Backend(format!("the set {key} is not a JSON list: {e}"))
                    })?,
                    Some(v.etag.clone()),
                ),
                None => (BTreeSet::new(), None),
            };
            let before = set.len();
            set.extend(members.iter().cloned());
            let new = set.len() - before;
            // The count of the first attempt: members another writer added
            // meanwhile were not added by this call.
            let added = *added.get_or_insert(new);
            if new == 0 {
                return Ok(added);
            }
            let body =
                serde_json::to_string(&set).map_err(|e| StoreError::Backend(e.to_string()))?;
            match self.save(&skey, &body, etag.as_deref()).await {
                // state.redis cannot create a key only if absent: two first
                // writers may both succeed, so go round again to check that
                // the members stuck.
                Ok(()) if etag.is_none() => continue,
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

/// How often the readiness probe publishes again while none came back.
const PROBE_REPEAT: Duration = Duration::from_millis(500);

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

/// Rebuilds the CloudEvent (JSON) that daprd handed over field by field,
/// with the payload where Dapr puts it for its content type (so the api
/// reads it back exactly as from the direct backends).
fn envelope(ev: rt::TopicEventRequest) -> Vec<u8> {
    use base64::Engine;
    use virtufin_store::content_type::{DataEncoding, encoding};
    let mut m = Map::new();
    if let Some(ext) = ev.extensions {
        for (k, v) in ext.fields {
            let v = virtufin_proto::json::from_prost(&v);
            // daprd fills trace fields a publisher left out with "".
            if matches!(k.as_str(), "traceid" | "traceparent" | "tracestate") && v == "" {
                continue;
            }
            m.insert(k, v);
        }
    }
    let ct = ev.data_content_type.clone();
    let as_json = || serde_json::from_slice::<Value>(&ev.data).ok();
    let as_text = || {
        std::str::from_utf8(&ev.data)
            .ok()
            .map(|s| Value::String(s.to_owned()))
    };
    let data = match encoding(&ct) {
        DataEncoding::Json if ev.data.is_empty() => None,
        DataEncoding::Json => as_json(),
        DataEncoding::Text => as_text(),
        DataEncoding::Base64 => None,
    };
    match data {
        Some(v) => {
            m.insert("data".into(), v);
        }
        None if ev.data.is_empty() => {}
        None => {
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
            .publish_event(traced(rt::PublishEventRequest {
                pubsub_name: self.options.pubsub.clone(),
                topic: topic.to_owned(),
                data: data.to_vec(),
                data_content_type: "application/cloudevents+json".into(),
                metadata: HashMap::new(),
            }))
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
        // One daprd stream per topic, opened once (see the hub module); the
        // lock is held while it opens so two first subscribers share it.
        let hub = {
            let mut hubs = self.hubs.lock().await;
            match hubs.get(&spec.topic) {
                Some(h) if h.is_alive() => h.clone(),
                _ => {
                    let h = hub::Hub::open(self, &spec.topic).await?;
                    hubs.insert(spec.topic.clone(), h.clone());
                    h
                }
            }
        };
        hub.subscribe(&spec, self.options.max_in_flight).await
    }

    async fn ping(&self) -> Result<()> {
        self.healthz().await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod trace_tests {
    use virtufin_common::trace::{self, TraceContext};

    #[tokio::test]
    async fn calls_to_daprd_carry_the_current_trace() {
        assert!(super::traced(()).metadata().get("traceparent").is_none());
        let ctx = TraceContext::new_root();
        let req = trace::scope(ctx.clone(), async { super::traced(()) }).await;
        assert_eq!(
            req.metadata().get("traceparent").unwrap().to_str().unwrap(),
            ctx.to_header()
        );
    }
}
