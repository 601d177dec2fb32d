//! One outbound WebSocket connection: an actor task that connects,
//! reads and writes frames, answers correlated sends, forwards what
//! arrives, and reconnects with exponential backoff. Lifecycle events go
//! out in causal order: `error` is followed by `reconnecting` or
//! `disconnected`, `reconnecting` by `connected` or `disconnected`.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::{
    Connector, MaybeTlsStream, WebSocketStream, connect_async_tls_with_config,
    tungstenite::{self, Message, protocol::WebSocketConfig},
};
use tokio_util::sync::CancellationToken;
use virtufin_api_client::TraceContext;

use crate::{MESSAGE_TYPE, SOURCE, manager::Shared, metrics::Direction};

/// A connection's state, as the contract spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Connecting,
    Connected,
    Reconnecting,
    Disconnected,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Connecting => "connecting",
            Status::Connected => "connected",
            Status::Reconnecting => "reconnecting",
            Status::Disconnected => "disconnected",
        }
    }
}

/// A frame to write, and where to say whether it was written.
pub struct Outgoing {
    pub message: Message,
    pub done: oneshot::Sender<Result<(), String>>,
}

/// The outcome of the first connection attempt (Connect waits for it).
#[derive(Debug, Clone)]
pub struct FirstAttempt {
    pub status: Status,
    pub error: Option<String>,
}

/// A connection as the rest of the service sees it.
pub struct Conn {
    pub id: String,
    pub url: String,
    pub auto_reconnect: bool,
    pub created_at: String,
    pub topic: RwLock<Option<String>>,
    pub status: watch::Sender<Status>,
    pub out: mpsc::Sender<Outgoing>,
    /// Correlated sends waiting for their reply, by UUID prefix.
    pub pending: Mutex<HashMap<[u8; 16], oneshot::Sender<Bytes>>>,
    /// Cancelled by Disconnect.
    pub stop: CancellationToken,
    /// True once the actor has finished.
    pub finished: watch::Sender<bool>,
    /// The vanished instance this one took the connection over from; said
    /// once, in the first `connected` event (`reclaimed_from`).
    pub reclaimed_from: Mutex<Option<String>>,
    /// The instance that took the connection over while this one could not
    /// reach the store (a partition longer than the reclaim grace); said
    /// in the `disconnected` event this instance sends as it lets go
    /// (`reclaimed_by`).
    pub taken_by: Mutex<Option<String>>,
    /// The connection's span: a child of the Connect call's (a new trace
    /// for one restored or taken over). Its lifecycle events and forwarded
    /// frames carry it, however much later they come.
    pub trace: TraceContext,
}

impl Conn {
    pub fn new(
        id: String,
        url: String,
        auto_reconnect: bool,
        created_at: String,
        topic: Option<String>,
        trace: TraceContext,
    ) -> (Arc<Self>, mpsc::Receiver<Outgoing>) {
        let (out, rx) = mpsc::channel(64);
        let conn = Arc::new(Self {
            id,
            url,
            auto_reconnect,
            created_at,
            topic: RwLock::new(topic),
            status: watch::Sender::new(Status::Connecting),
            out,
            pending: Mutex::new(HashMap::new()),
            stop: CancellationToken::new(),
            finished: watch::Sender::new(false),
            reclaimed_from: Mutex::new(None),
            taken_by: Mutex::new(None),
            trace,
        });
        (conn, rx)
    }

    pub fn status(&self) -> Status {
        *self.status.borrow()
    }

    pub fn topic(&self) -> Option<String> {
        self.topic.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_topic(&self, topic: Option<String>) {
        *self.topic.write().unwrap_or_else(|p| p.into_inner()) = topic;
    }

    pub fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 16], oneshot::Sender<Bytes>>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until the actor has finished.
    pub async fn wait_finished(&self) {
        let mut rx = self.finished.subscribe();
        let _ = rx.wait_for(|f| *f).await;
    }
}

/// How a connected session ended.
enum Ended {
    /// Disconnect was called.
    Stopped,
    /// The service is shutting down: the connection will be restored.
    Shutdown,
    /// The peer closed the connection.
    Closed(String),
    /// Reading or writing failed.
    Failed(&'static str, String),
}

type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// Short, stable names for `error_type`.
pub fn error_type(e: &tungstenite::Error) -> &'static str {
    use tungstenite::Error as E;
    match e {
        E::ConnectionClosed | E::AlreadyClosed => "closed",
        E::Io(_) => "io",
        E::Tls(_) => "tls",
        E::Capacity(_) => "capacity",
        E::Protocol(_) => "protocol",
        E::WriteBufferFull(_) => "write_buffer_full",
        E::Utf8(_) => "utf8",
        E::AttackAttempt => "attack_attempt",
        E::Url(_) => "url",
        E::Http(_) => "http_status",
        E::HttpFormat(_) => "http",
    }
}

fn describe(e: &tungstenite::Error) -> String {
    use std::error::Error;
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

async fn connect(shared: &Shared, url: &str) -> Result<Ws, (&'static str, String)> {
    let config = WebSocketConfig::default()
        .max_message_size(Some(shared.config.max_message_bytes))
        .max_frame_size(Some(shared.config.max_message_bytes));
    let attempt = connect_async_tls_with_config(
        url,
        Some(config),
        true,
        Some(Connector::Rustls(shared.tls.clone())),
    );
    match tokio::time::timeout(shared.config.connect_timeout, attempt).await {
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(e)) => Err((error_type(&e), describe(&e))),
        Err(_) => Err((
            "timeout",
            format!("no connection within {:?}", shared.config.connect_timeout),
        )),
    }
}

/// A lifecycle event's extra field `key`, from a value said only once.
fn said_once(key: &str, value: &Mutex<Option<String>>) -> Map<String, Value> {
    let mut extra = Map::new();
    if let Some(v) = value.lock().unwrap_or_else(|p| p.into_inner()).take() {
        extra.insert(key.into(), v.into());
    }
    extra
}

/// The connection's actor. `first` hears the outcome of the first attempt.
pub async fn run(
    shared: Arc<Shared>,
    conn: Arc<Conn>,
    mut outgoing: mpsc::Receiver<Outgoing>,
    mut first: Option<oneshot::Sender<FirstAttempt>>,
) {
    let cfg = &shared.config;
    // Reconnect attempts in the current outage (0: not in an outage).
    let mut attempt: usize = 0;
    let mut shutdown_exit = false;
    loop {
        if attempt == 0 {
            conn.status.send_replace(Status::Connecting);
        }
        let result = tokio::select! {
            _ = conn.stop.cancelled() => Err(("stopped", String::new())),
            _ = shared.shutdown.cancelled() => Err(("shutdown", String::new())),
            r = connect(&shared, &conn.url) => r,
        };
        let failure = match result {
            Ok(ws) => {
                conn.status.send_replace(Status::Connected);
                shared.persist(&conn).await;
                let extra = said_once("reclaimed_from", &conn.reclaimed_from);
                shared.lifecycle(&conn, "connected", extra).await;
                if let Some(f) = first.take() {
                    let _ = f.send(FirstAttempt {
                        status: Status::Connected,
                        error: None,
                    });
                }
                attempt = 0;
                match session(&shared, &conn, ws, &mut outgoing).await {
                    Ended::Stopped => break,
                    Ended::Shutdown => {
                        shutdown_exit = true;
                        break;
                    }
                    Ended::Closed(reason) => {
                        tracing::info!(%reason, "peer closed the connection");
                        None
                    }
                    Ended::Failed(kind, message) => Some((kind, message)),
                }
            }
            Err(("stopped", _)) => break,
            Err(("shutdown", _)) => {
                shutdown_exit = true;
                break;
            }
            Err((kind, message)) => Some((kind, message)),
        };
        fail_pending(&conn);
        if let Some((kind, message)) = &failure {
            if attempt == 0 {
                // One error per outage; retries that fail are only logged.
                let mut extra = Map::new();
                extra.insert("error_type".into(), json!(kind));
                extra.insert("error_message".into(), json!(message));
                shared.lifecycle(&conn, "error", extra).await;
            } else {
                tracing::info!(attempt, error = %message, "reconnect attempt failed");
            }
        }
        if conn.auto_reconnect && attempt < cfg.reconnect_max_attempts {
            attempt += 1;
            shared.metrics.reconnect_attempt();
            if attempt == 1 {
                conn.status.send_replace(Status::Reconnecting);
                shared.persist(&conn).await;
                let mut extra = Map::new();
                extra.insert("attempt".into(), json!(attempt));
                shared.lifecycle(&conn, "reconnecting", extra).await;
            }
            if let Some(f) = first.take() {
                let _ = f.send(FirstAttempt {
                    status: Status::Reconnecting,
                    error: failure.as_ref().map(|f| f.1.clone()),
                });
            }
            let delay = backoff(cfg.reconnect_base_delay, cfg.reconnect_max_delay, attempt);
            tracing::info!(attempt, ?delay, "reconnecting");
            tokio::select! {
                _ = conn.stop.cancelled() => break,
                _ = shared.shutdown.cancelled() => { shutdown_exit = true; break }
                _ = tokio::time::sleep(delay) => {}
            }
            reject_queued(&mut outgoing);
            continue;
        }
        if let Some(f) = first.take() {
            let _ = f.send(FirstAttempt {
                status: Status::Disconnected,
                error: failure.map(|f| f.1),
            });
        }
        break;
    }
    fail_pending(&conn);
    reject_queued(&mut outgoing);
    if !shutdown_exit {
        conn.status.send_replace(Status::Disconnected);
        if !conn.stop.is_cancelled() {
            // Given up: the record stays (status disconnected) until
            // Disconnect removes it.
            shared.persist(&conn).await;
        }
        let extra = said_once("reclaimed_by", &conn.taken_by);
        shared.lifecycle(&conn, "disconnected", extra).await;
    }
    conn.finished.send_replace(true);
}

async fn session(
    shared: &Shared,
    conn: &Conn,
    ws: Ws,
    outgoing: &mut mpsc::Receiver<Outgoing>,
) -> Ended {
    let (mut sink, mut stream) = ws.split();
    loop {
        tokio::select! {
            _ = conn.stop.cancelled() => {
                let _ = sink.send(Message::Close(None)).await;
                return Ended::Stopped;
            }
            _ = shared.shutdown.cancelled() => {
                let _ = sink.send(Message::Close(None)).await;
                return Ended::Shutdown;
            }
            o = outgoing.recv() => {
                let Some(o) = o else { return Ended::Stopped };
                let text = o.message.is_text();
                match sink.send(o.message).await {
                    Ok(()) => {
                        shared.metrics.frame(Direction::Out, text);
                        let _ = o.done.send(Ok(()));
                    }
                    Err(e) => {
                        let _ = o.done.send(Err(describe(&e)));
                        return Ended::Failed(error_type(&e), describe(&e));
                    }
                }
            }
            m = stream.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    shared.metrics.frame(Direction::In, true);
                    inbound(shared, conn, Bytes::copy_from_slice(t.as_bytes()), true).await
                }
                Some(Ok(Message::Binary(b))) => {
                    shared.metrics.frame(Direction::In, false);
                    inbound(shared, conn, b, false).await
                }
                Some(Ok(Message::Close(frame))) => {
                    return Ended::Closed(frame.map(|f| format!("{} {}", f.code, f.reason)).unwrap_or_else(|| "no reason".into()));
                }
                Some(Ok(_)) => {} // ping/pong: tungstenite answers pings itself
                Some(Err(e)) => return Ended::Failed(error_type(&e), describe(&e)),
                None => return Ended::Closed("stream ended".into()),
            },
        }
    }
}

/// A correlated send's frame: the 16-byte correlation key, then the
/// payload.
pub fn correlated(key: &[u8; 16], payload: &[u8]) -> Vec<u8> {
    let mut framed = Vec::with_capacity(16 + payload.len());
    framed.extend_from_slice(key);
    framed.extend_from_slice(payload);
    framed
}

/// The correlation key a frame starts with and the rest (the reply), if it
/// is long enough to carry one. Whether it answers a send is up to the
/// pending sends.
pub fn split_correlated(data: &Bytes) -> Option<([u8; 16], Bytes)> {
    let key: [u8; 16] = data.get(..16)?.try_into().ok()?;
    Some((key, data.slice(16..)))
}

/// A frame arrived: the reply to a correlated send, or traffic to forward.
async fn inbound(shared: &Shared, conn: &Conn, data: Bytes, text: bool) {
    if let Some((key, reply)) = split_correlated(&data) {
        let waiter = conn.pending().remove(&key);
        if let Some(w) = waiter {
            let _ = w.send(reply);
            return;
        }
    }
    let Some(topic) = conn.topic() else { return };
    let (payload, content_type) = if text {
        (
            Value::String(String::from_utf8_lossy(&data).into_owned()),
            "text/plain",
        )
    } else {
        use base64::Engine;
        (
            Value::String(base64::engine::general_purpose::STANDARD.encode(&data)),
            "application/octet-stream",
        )
    };
    let envelope = json!({
        "WebSocketId": conn.id,
        "WebSocketUrl": conn.url,
        "Timestamp": humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
        "Payload": payload,
        "ContentType": content_type,
    });
    let mut event =
        virtufin_api_client::publisher::json_event(&topic, SOURCE, MESSAGE_TYPE, &envelope);
    conn.trace.stamp(&mut event.metadata);
    shared.publisher.publish(event).await;
}

fn fail_pending(conn: &Conn) {
    // Dropping the senders wakes each Send with "connection lost".
    conn.pending().clear();
}

fn reject_queued(outgoing: &mut mpsc::Receiver<Outgoing>) {
    while let Ok(o) = outgoing.try_recv() {
        let _ = o.done.send(Err("the connection is not connected".into()));
    }
}

/// The delay before reconnect attempt `attempt` (1-based): the base
/// delay doubled per attempt, capped.
pub fn backoff(base: Duration, cap: Duration, attempt: usize) -> Duration {
    let exp = u32::try_from(attempt.saturating_sub(1))
        .unwrap_or(u32::MAX)
        .min(20);
    base.saturating_mul(1u32 << exp).min(cap)
}
