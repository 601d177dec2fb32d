//! A client of virtufin-api: typed State, Pubsub and Gateway calls over one
//! channel, the readiness handshake (`Health/HealthCheck`) that the other
//! services perform before they report ready, and the API key they present
//! when one is configured.

pub mod link;
pub mod publisher;

use std::{collections::HashMap, time::Duration};

use tonic::{
    metadata::AsciiMetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, Endpoint},
};
pub use virtufin_common::trace::{self, TraceContext};
pub use virtufin_proto::api::v1 as pb;
use virtufin_proto::api::v1::{
    gateway_client::GatewayClient, health_client::HealthClient, pubsub_client::PubsubClient,
    state_client::StateClient,
};

/// The metadata key (and HTTP header) that carries an API key.
pub const API_KEY_HEADER: &str = "x-api-key";

/// Adds this client's API key, when it has one, to every call, and the
/// trace context in force in the calling task
/// ([`virtufin_common::trace::current`]: the span of the call or event
/// being handled) as `traceparent`/`tracestate`, unless the request names
/// one already (see [`traced`]).
#[derive(Debug, Clone, Default)]
pub struct KeyInjector(Option<AsciiMetadataValue>);

impl Interceptor for KeyInjector {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(key) = &self.0 {
            req.metadata_mut().insert(API_KEY_HEADER, key.clone());
        }
        if !req.metadata().contains_key(trace::TRACEPARENT)
            && let Some(ctx) = trace::current()
        {
            ctx.inject(req.metadata_mut());
        }
        Ok(req)
    }
}

/// A request that carries `ctx` as its `traceparent` (and `tracestate`)
/// whatever the calling task's context: for a call made outside the work
/// it belongs to.
pub fn traced<T>(msg: T, ctx: &TraceContext) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    ctx.inject(req.metadata_mut());
    req
}

/// The channel every typed client of this crate runs over.
pub type Transport = InterceptedService<Channel, KeyInjector>;

/// Largest message this client sends or accepts (matches the api's).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid api address '{addr}': {reason}")]
    Address { addr: String, reason: String },
    #[error("cannot reach the api at {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("the API key is not usable: it must be visible ASCII without spaces")]
    Key,
    /// What the api answered (not a `source`: the message is all of it).
    #[error("{:?}: {}", .0.code(), .0.message())]
    Status(tonic::Status),
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        ClientError::Status(s)
    }
}

/// A connection to virtufin-api. Cheap to clone; reconnects by itself.
#[derive(Debug, Clone)]
pub struct ApiClient {
    addr: String,
    channel: Channel,
    key: KeyInjector,
}

/// Accepts `host:port` or a full `http://host:port` URL.
pub fn normalize(addr: &str) -> String {
    if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    }
}

impl ApiClient {
    /// A client that connects on first use (and again after the api
    /// restarts). Fails only on a malformed address.
    pub fn lazy(addr: &str) -> Result<Self, ClientError> {
        let url = normalize(addr);
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| ClientError::Address {
                addr: addr.to_owned(),
                reason: e.to_string(),
            })?
            .connect_timeout(Duration::from_secs(3))
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true)
            .tcp_nodelay(true);
        Ok(Self {
            addr: url,
            channel: endpoint.connect_lazy(),
            key: KeyInjector::default(),
        })
    }

    /// Connects now; fails when the api does not answer.
    pub async fn connect(addr: &str) -> Result<Self, ClientError> {
        let c = Self::lazy(addr)?;
        let endpoint = Endpoint::from_shared(c.addr.clone()).map_err(|e| ClientError::Address {
            addr: addr.to_owned(),
            reason: e.to_string(),
        })?;
        let channel = endpoint
            .connect_timeout(Duration::from_secs(3))
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| ClientError::Connect {
                addr: c.addr.clone(),
                reason: source_chain(&e),
            })?;
        Ok(Self {
            addr: c.addr,
            channel,
            key: KeyInjector::default(),
        })
    }

    /// Presents `key` (`x-api-key`) on every call; `None` or "" = no key.
    pub fn with_key(mut self, key: Option<&str>) -> Result<Self, ClientError> {
        self.key = match key.map(str::trim).filter(|k| !k.is_empty()) {
            None => KeyInjector(None),
            Some(k) => KeyInjector(Some(k.parse().map_err(|_| ClientError::Key)?)),
        };
        Ok(self)
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn transport(&self) -> Transport {
        InterceptedService::new(self.channel.clone(), self.key.clone())
    }

    pub fn health(&self) -> HealthClient<Transport> {
        HealthClient::new(self.transport())
    }

    pub fn state(&self) -> StateClient<Transport> {
        StateClient::new(self.transport())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    pub fn pubsub(&self) -> PubsubClient<Transport> {
        PubsubClient::new(self.transport())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    pub fn gateway(&self) -> GatewayClient<Transport> {
        GatewayClient::new(self.transport())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// Calls `method` of the configured backend `service` through the api's
    /// Gateway with a protobuf-JSON request; returns the JSON response. The
    /// backend's own errors come back as the call's gRPC status.
    pub async fn invoke(
        &self,
        service: &str,
        method: &str,
        request_json: &str,
    ) -> Result<String, ClientError> {
        Ok(self
            .gateway()
            .invoke_json(pb::InvokeJsonRequest {
                service: service.into(),
                method: method.into(),
                request_data: request_json.into(),
                timeout_ms: 0,
            })
            .await?
            .into_inner()
            .response_data)
    }

    /// The readiness handshake: OK only when the api reports itself ready.
    pub async fn handshake(&self) -> Result<pb::HealthCheckResponse, ClientError> {
        Ok(self
            .health()
            .health_check(pb::HealthCheckRequest {})
            .await?
            .into_inner())
    }

    /// Saves a value; returns the new etag.
    pub async fn save(
        &self,
        service: &str,
        key: &str,
        value: &str,
        etag: &str,
    ) -> Result<String, ClientError> {
        let r = self
            .state()
            .save_state(pb::SaveStateRequest {
                service: service.into(),
                key: key.into(),
                value: value.into(),
                etag: etag.into(),
                include_value: false,
            })
            .await?
            .into_inner();
        Ok(r.etag)
    }

    /// Reads a value; `None` when nothing is stored.
    pub async fn get(
        &self,
        service: &str,
        key: &str,
    ) -> Result<Option<(String, String)>, ClientError> {
        let r = self
            .state()
            .get_state(pb::GetStateRequest {
                service: service.into(),
                key: key.into(),
            })
            .await?
            .into_inner();
        Ok((!r.etag.is_empty()).then_some((r.value, r.etag)))
    }

    /// Deletes a value; true when something was deleted.
    pub async fn delete(&self, service: &str, key: &str, etag: &str) -> Result<bool, ClientError> {
        let r = self
            .state()
            .delete_state(pb::DeleteStateRequest {
                service: service.into(),
                key: key.into(),
                include_value: false,
                etag: etag.into(),
            })
            .await?
            .into_inner();
        Ok(r.status == "OK")
    }

    /// Every value of `service` (GetAllState).
    pub async fn get_all(&self, service: &str) -> Result<HashMap<String, String>, ClientError> {
        Ok(self
            .state()
            .get_all_state(pb::GetAllStateRequest {
                service: service.into(),
            })
            .await?
            .into_inner()
            .values)
    }

    /// Publishes events in order in one call (PublishEvents).
    pub async fn publish_many(
        &self,
        events: Vec<pb::PublishEventRequest>,
    ) -> Result<Vec<String>, ClientError> {
        Ok(self
            .pubsub()
            .publish_events(pb::PublishEventsRequest { events })
            .await?
            .into_inner()
            .ids)
    }

    /// Publishes an event; `metadata` carries `ce-*` attributes.
    pub async fn publish(
        &self,
        topic: &str,
        data: &str,
        metadata: HashMap<String, String>,
    ) -> Result<String, ClientError> {
        Ok(self
            .pubsub()
            .publish_event(pb::PublishEventRequest {
                topic: topic.into(),
                data: data.into(),
                metadata,
            })
            .await?
            .into_inner()
            .id)
    }
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn calls_carry_the_tasks_trace_unless_they_name_one() {
        let mut k = KeyInjector::default();
        let req = k.call(tonic::Request::new(())).unwrap();
        assert!(
            req.metadata().get(trace::TRACEPARENT).is_none(),
            "no trace, none sent"
        );
        let ctx = TraceContext::parse(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            Some("a=1"),
        )
        .unwrap();
        let req = trace::sync_scope(ctx.clone(), || k.call(tonic::Request::new(()))).unwrap();
        assert_eq!(
            req.metadata()
                .get(trace::TRACEPARENT)
                .unwrap()
                .to_str()
                .unwrap(),
            ctx.to_header()
        );
        assert_eq!(
            req.metadata()
                .get(trace::TRACESTATE)
                .unwrap()
                .to_str()
                .unwrap(),
            "a=1"
        );
        let own = TraceContext::new_root();
        let req = trace::sync_scope(ctx, || k.call(traced((), &own))).unwrap();
        assert_eq!(
            req.metadata()
                .get(trace::TRACEPARENT)
                .unwrap()
                .to_str()
                .unwrap(),
            own.to_header(),
            "an explicit one wins"
        );
    }
}
