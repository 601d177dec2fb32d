//! The six RPCs the double really serves.

use std::{
    collections::{HashMap, VecDeque},
    pin::Pin,
};

use dapr::dapr::proto::{common::v1 as common_v1, runtime::v1 as runtime_v1};
use serde_json::{Map, Value};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use virtufin_store::{Backend, Outcome, StoreError, SubscriptionSpec};

use runtime_v1::{
    subscribe_topic_events_request_alpha1::SubscribeTopicEventsRequestType as Req,
    subscribe_topic_events_response_alpha1::SubscribeTopicEventsResponseType as Resp,
    topic_event_response::TopicEventResponseStatus,
};

pub type EventStream = Pin<
    Box<
        dyn tokio_stream::Stream<
                Item = Result<runtime_v1::SubscribeTopicEventsResponseAlpha1, Status>,
            > + Send,
    >,
>;

/// The component names the double knows, as a default Dapr setup names them.
const STATE_STORE: &str = "statestore";
const PUBSUB: &str = "pubsub";

#[derive(Clone)]
pub struct DaprDouble {
    backend: Backend,
    app_id: String,
}

fn store_status(e: StoreError, what: &str) -> Status {
    match e {
        StoreError::EtagMismatch { .. } => {
            Status::aborted(format!("failed {what}: possible etag mismatch"))
        }
        StoreError::Unavailable(m) => Status::unavailable(m),
        StoreError::Backend(m) => Status::internal(m),
    }
}

fn check(name: &str, expected: &str, kind: &str) -> Result<(), Status> {
    if name == expected {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "{kind} {name} is not found"
        )))
    }
}

fn utf8(data: Vec<u8>) -> Result<String, Status> {
    String::from_utf8(data)
        .map_err(|_| Status::invalid_argument("the double stores UTF-8 values only"))
}

fn etag_of(e: Option<common_v1::Etag>) -> Option<String> {
    e.map(|e| e.value).filter(|v| !v.is_empty())
}

/// A stored CloudEvent (JSON) as daprd hands it to a subscriber.
fn topic_event(topic: &str, raw: &[u8]) -> runtime_v1::TopicEventRequest {
    let mut ce: Map<String, Value> = match serde_json::from_slice(raw) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    };
    let mut s = |k: &str| match ce.remove(k) {
        Some(Value::String(v)) => v,
        Some(v) => v.to_string(),
        None => String::new(),
    };
    let (id, source, ty, spec, ct, t, ps) = (
        s("id"),
        s("source"),
        s("type"),
        s("specversion"),
        s("datacontenttype"),
        s("topic"),
        s("pubsubname"),
    );
    let data = match (ce.remove("data"), ce.remove("data_base64")) {
        (_, Some(Value::String(b64))) => {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .unwrap_or_default()
        }
        (Some(Value::String(v)), _) if !ct.contains("json") => v.into_bytes(),
        (Some(v), _) => serde_json::to_vec(&v).unwrap_or_default(),
        (None, _) => Vec::new(),
    };
    runtime_v1::TopicEventRequest {
        id,
        source,
        r#type: ty,
        spec_version: spec,
        data_content_type: ct,
        data,
        topic: if t.is_empty() { topic.to_owned() } else { t },
        pubsub_name: ps,
        path: String::new(),
        extensions: Some(prost_types::Struct {
            fields: ce
                .into_iter()
                .map(|(k, v)| (k, virtufin_proto::json::to_prost(v)))
                .collect(),
        }),
    }
}

impl DaprDouble {
    pub fn new(backend: Backend, app_id: &str) -> Self {
        Self {
            backend,
            app_id: app_id.to_owned(),
        }
    }

    pub async fn get_state(
        &self,
        req: Request<runtime_v1::GetStateRequest>,
    ) -> Result<Response<runtime_v1::GetStateResponse>, Status> {
        let r = req.into_inner();
        check(&r.store_name, STATE_STORE, "state store")?;
        let v = self
            .backend
            .state
            .get(&r.key)
            .await
            .map_err(|e| store_status(e, "getting state"))?;
        let (data, etag) = v
            .map(|v| (v.value.into_bytes(), v.etag))
            .unwrap_or_default();
        Ok(Response::new(runtime_v1::GetStateResponse {
            data,
            etag,
            metadata: HashMap::new(),
        }))
    }

    pub async fn get_bulk_state(
        &self,
        req: Request<runtime_v1::GetBulkStateRequest>,
    ) -> Result<Response<runtime_v1::GetBulkStateResponse>, Status> {
        let r = req.into_inner();
        check(&r.store_name, STATE_STORE, "state store")?;
        let got = self
            .backend
            .state
            .get_many(&r.keys)
            .await
            .map_err(|e| store_status(e, "getting bulk state"))?;
        let items = r
            .keys
            .into_iter()
            .zip(got)
            .map(|(key, v)| {
                let (data, etag) = v
                    .map(|v| (v.value.into_bytes(), v.etag))
                    .unwrap_or_default();
                runtime_v1::BulkStateItem {
                    key,
                    data,
                    etag,
                    error: String::new(),
                    metadata: HashMap::new(),
                }
            })
            .collect();
        Ok(Response::new(runtime_v1::GetBulkStateResponse { items }))
    }

    pub async fn save_state(
        &self,
        req: Request<runtime_v1::SaveStateRequest>,
    ) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        check(&r.store_name, STATE_STORE, "state store")?;
        for item in r.states {
            let value = utf8(item.value)?;
            let etag = etag_of(item.etag);
            self.backend
                .state
                .set(&item.key, &value, etag.as_deref())
                .await
                .map_err(|e| store_status(e, "saving state"))?;
        }
        Ok(Response::new(()))
    }

    pub async fn delete_state(
        &self,
        req: Request<runtime_v1::DeleteStateRequest>,
    ) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        check(&r.store_name, STATE_STORE, "state store")?;
        let etag = etag_of(r.etag);
        self.backend
            .state
            .delete(&r.key, etag.as_deref())
            .await
            .map_err(|e| store_status(e, "deleting state"))?;
        Ok(Response::new(()))
    }

    pub async fn publish_event(
        &self,
        req: Request<runtime_v1::PublishEventRequest>,
    ) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        check(&r.pubsub_name, PUBSUB, "pubsub")?;
        if r.topic.is_empty() {
            return Err(Status::invalid_argument("topic is empty in pubsub pubsub"));
        }
        // daprd keeps a ready CloudEvent as it is and wraps anything else.
        let envelope = if r.data_content_type == "application/cloudevents+json" {
            r.data
        } else {
            let ct = if r.data_content_type.is_empty() {
                "text/plain".to_owned()
            } else {
                r.data_content_type
            };
            let data = match serde_json::from_slice::<Value>(&r.data) {
                Ok(v) if ct.contains("json") => v,
                _ => Value::String(String::from_utf8_lossy(&r.data).into_owned()),
            };
            serde_json::to_vec(&serde_json::json!({
                "specversion": "1.0", "id": uuid::Uuid::new_v4().to_string(), "source": self.app_id,
                "type": "com.dapr.event.sent", "datacontenttype": ct, "data": data,
                "topic": r.topic, "pubsubname": r.pubsub_name,
            }))
            .map_err(|e| Status::internal(e.to_string()))?
        };
        self.backend
            .pubsub
            .publish(&r.topic, &envelope)
            .await
            .map_err(|e| store_status(e, "publishing"))?;
        Ok(Response::new(()))
    }

    pub async fn subscribe_topic_events_alpha1(
        &self,
        req: Request<Streaming<runtime_v1::SubscribeTopicEventsRequestAlpha1>>,
    ) -> Result<Response<EventStream>, Status> {
        let mut inbound = req.into_inner();
        let first = match inbound.message().await? {
            Some(runtime_v1::SubscribeTopicEventsRequestAlpha1 {
                subscribe_topic_events_request_type: Some(Req::InitialRequest(i)),
            }) => i,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message must be an initial request",
                ));
            }
        };
        check(&first.pubsub_name, PUBSUB, "pubsub")?;
        // pubsub.redis: the consumer group is `consumerID` (default: the
        // app id). Members: daprd uses one consumer per sidecar; the double
        // takes a member name from metadata so that tests can have several.
        let group = first
            .metadata
            .get("consumerID")
            .cloned()
            .unwrap_or_else(|| self.app_id.clone());
        let member = first
            .metadata
            .get("virtufinMember")
            .cloned()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let spec = SubscriptionSpec {
            topic: first.topic.clone(),
            group,
            subscriber: member,
        };
        let mut sub = self
            .backend
            .pubsub
            .subscribe(spec)
            .await
            .map_err(|e| store_status(e, "subscribing"))?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let _ = tx
            .send(Ok(runtime_v1::SubscribeTopicEventsResponseAlpha1 {
                subscribe_topic_events_response_type: Some(Resp::InitialResponse(
                    runtime_v1::SubscribeTopicEventsResponseInitialAlpha1 {},
                )),
            }))
            .await;
        let topic = first.topic;
        tokio::spawn(async move {
            let mut in_flight: HashMap<String, VecDeque<String>> = HashMap::new();
            loop {
                tokio::select! {
                    _ = tx.closed() => break,
                    m = inbound.next() => match m {
                        Some(Ok(runtime_v1::SubscribeTopicEventsRequestAlpha1 { subscribe_topic_events_request_type: Some(Req::EventProcessed(p)) })) => {
                            let entry = in_flight.get_mut(&p.id).and_then(VecDeque::pop_front);
                            let status = p.status.map(|s| s.status).unwrap_or(0);
                            let outcome = match TopicEventResponseStatus::try_from(status) {
                                Ok(TopicEventResponseStatus::Success) => Outcome::Success,
                                Ok(TopicEventResponseStatus::Drop) => Outcome::Drop,
                                _ => Outcome::Retry,
                            };
                            if let Some(e) = entry {
                                sub.settle(&e, outcome);
                            }
                        }
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => break,
                    },
                    d = sub.next() => match d {
                        Some(Ok(d)) => {
                            let ev = topic_event(&topic, &d.data);
                            in_flight.entry(ev.id.clone()).or_default().push_back(d.entry_id);
                            let msg = runtime_v1::SubscribeTopicEventsResponseAlpha1 {
                                subscribe_topic_events_response_type: Some(Resp::EventMessage(ev)),
                            };
                            if tx.send(Ok(msg)).await.is_err() {
                                break;
                            }
                        }
                        Some(Err(e)) => tracing::warn!(error = %e, "double: subscription read failed"),
                        None => break,
                    },
                }
            }
            sub.close().await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
