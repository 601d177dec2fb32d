//! The gRPC face of the websocketmanager.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use tonic::{Request, Response, Status};
use virtufin_proto::websocketmanager::v1::{
    ConnectRequest, ConnectResponse, DisconnectRequest, DisconnectResponse, ListRequest,
    ListResponse, SendRawRequest, SendRawResponse, SendRequest, SendResponse, StartPublishRequest,
    StartPublishResponse, StopPublishRequest, StopPublishResponse, WebSocketConnection,
    web_socket_manager_server::WebSocketManager,
};

use crate::manager::{Record, Shared};

pub struct Service(pub Arc<Shared>);

pub fn to_proto(r: Record) -> WebSocketConnection {
    WebSocketConnection {
        id: r.id,
        url: r.url,
        status: r.status,
        topic: r.topic.unwrap_or_default(),
        instance_id: r.instance_id,
        auto_reconnect: r.auto_reconnect,
        created_at: r.created_at,
    }
}

/// The payload: `message_bytes` when set, else `message`.
pub fn payload(message: String, bytes: Vec<u8>) -> Bytes {
    if bytes.is_empty() {
        Bytes::from(message.into_bytes())
    } else {
        Bytes::from(bytes)
    }
}

/// Send's timeout: the request's, else the configured default.
pub fn send_timeout(
    shared: &Shared,
    timeout_ms: i32,
) -> Result<Duration, virtufin_common::ApiError> {
    match timeout_ms {
        0 => Ok(shared.config.default_send_timeout),
        n if n < 0 => Err(virtufin_common::ApiError::invalid(format!(
            "timeout_ms must not be negative (got {n})"
        ))),
        n => Ok(Duration::from_millis(n as u64)),
    }
}

#[tonic::async_trait]
impl WebSocketManager for Service {
    async fn connect(
        &self,
        req: Request<ConnectRequest>,
    ) -> Result<Response<ConnectResponse>, Status> {
        let r = req.into_inner();
        let (id, status) = self.0.connect(&r.url, r.auto_reconnect).await?;
        Ok(Response::new(ConnectResponse {
            id,
            status: status.as_str().into(),
        }))
    }

    async fn list(&self, _req: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let connections = self.0.list().await?.into_iter().map(to_proto).collect();
        Ok(Response::new(ListResponse { connections }))
    }

    async fn disconnect(
        &self,
        req: Request<DisconnectRequest>,
    ) -> Result<Response<DisconnectResponse>, Status> {
        self.0.disconnect(&req.into_inner().id).await?;
        Ok(Response::new(DisconnectResponse {}))
    }

    async fn start_publish(
        &self,
        req: Request<StartPublishRequest>,
    ) -> Result<Response<StartPublishResponse>, Status> {
        let r = req.into_inner();
        self.0.start_publish(&r.id, &r.topic).await?;
        Ok(Response::new(StartPublishResponse {}))
    }

    async fn stop_publish(
        &self,
        req: Request<StopPublishRequest>,
    ) -> Result<Response<StopPublishResponse>, Status> {
        self.0.stop_publish(&req.into_inner().id).await?;
        Ok(Response::new(StopPublishResponse {}))
    }

    async fn send(&self, req: Request<SendRequest>) -> Result<Response<SendResponse>, Status> {
        let r = req.into_inner();
        let timeout = send_timeout(&self.0, r.timeout_ms)?;
        let reply = self
            .0
            .send(&r.id, payload(r.message, r.message_bytes), timeout)
            .await?;
        Ok(Response::new(SendResponse {
            response: String::from_utf8_lossy(&reply).into_owned(),
            response_bytes: reply.to_vec(),
        }))
    }

    async fn send_raw(
        &self,
        req: Request<SendRawRequest>,
    ) -> Result<Response<SendRawResponse>, Status> {
        let r = req.into_inner();
        let binary = !r.message_bytes.is_empty();
        let content_type = if binary {
            "application/octet-stream".to_owned()
        } else {
            r.content_type
        };
        self.0
            .send_raw(&r.id, payload(r.message, r.message_bytes), &content_type)
            .await?;
        Ok(Response::new(SendRawResponse {}))
    }
}
