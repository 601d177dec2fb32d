//! A client of virtufin-websocketmanager: typed calls for every RPC.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
pub use virtufin_proto::websocketmanager::v1 as pb;
use virtufin_proto::websocketmanager::v1::web_socket_manager_client::WebSocketManagerClient;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid websocketmanager address '{addr}': {reason}")]
    Address { addr: String, reason: String },
    #[error("{}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
}

/// Largest message sent or accepted (a 1 MiB frame and its reply fit).
pub const MAX_MESSAGE_BYTES: usize = 32 * 1024 * 1024;

/// A connection to the websocketmanager; cheap to clone, reconnects itself.
#[derive(Debug, Clone)]
pub struct WsClient {
    inner: WebSocketManagerClient<Channel>,
}

impl WsClient {
    /// Connects on first use. `addr` is `host:port` or `http://host:port`.
    pub fn lazy(addr: &str) -> Result<Self, ClientError> {
        let url = if addr.contains("://") {
            addr.to_owned()
        } else {
            format!("http://{addr}")
        };
        let endpoint = Endpoint::from_shared(url).map_err(|e| ClientError::Address {
            addr: addr.to_owned(),
            reason: e.to_string(),
        })?;
        let channel = endpoint
            .connect_timeout(Duration::from_secs(3))
            .tcp_nodelay(true)
            .connect_lazy();
        Ok(Self {
            inner: WebSocketManagerClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        })
    }

    /// The generated client, for calls not wrapped here.
    pub fn raw(&self) -> WebSocketManagerClient<Channel> {
        self.inner.clone()
    }

    /// Opens a connection; returns its id and status.
    pub async fn connect(
        &self,
        url: &str,
        auto_reconnect: bool,
    ) -> Result<pb::ConnectResponse, ClientError> {
        Ok(self
            .raw()
            .connect(pb::ConnectRequest {
                url: url.into(),
                auto_reconnect,
            })
            .await?
            .into_inner())
    }

    pub async fn list(&self) -> Result<Vec<pb::WebSocketConnection>, ClientError> {
        Ok(self
            .raw()
            .list(pb::ListRequest {})
            .await?
            .into_inner()
            .connections)
    }

    pub async fn disconnect(&self, id: &str) -> Result<(), ClientError> {
        self.raw()
            .disconnect(pb::DisconnectRequest { id: id.into() })
            .await?;
        Ok(())
    }

    pub async fn start_publish(&self, id: &str, topic: &str) -> Result<(), ClientError> {
        self.raw()
            .start_publish(pb::StartPublishRequest {
                id: id.into(),
                topic: topic.into(),
            })
            .await?;
        Ok(())
    }

    pub async fn stop_publish(&self, id: &str) -> Result<(), ClientError> {
        self.raw()
            .stop_publish(pb::StopPublishRequest { id: id.into() })
            .await?;
        Ok(())
    }

    /// Correlated request/response; `timeout` None uses the service default.
    pub async fn send(
        &self,
        id: &str,
        message: &str,
        timeout: Option<Duration>,
    ) -> Result<pb::SendResponse, ClientError> {
        let timeout_ms = timeout
            .map(|t| i32::try_from(t.as_millis()).unwrap_or(i32::MAX))
            .unwrap_or(0);
        Ok(self
            .raw()
            .send(pb::SendRequest {
                id: id.into(),
                message: message.into(),
                timeout_ms,
                ..Default::default()
            })
            .await?
            .into_inner())
    }

    /// Fire and forget.
    pub async fn send_raw(
        &self,
        id: &str,
        message: &str,
        content_type: &str,
    ) -> Result<(), ClientError> {
        self.raw()
            .send_raw(pb::SendRawRequest {
                id: id.into(),
                message: message.into(),
                content_type: content_type.into(),
                message_bytes: Vec::new(),
            })
            .await?;
        Ok(())
    }
}
