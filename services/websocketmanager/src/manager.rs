//! The connections of this instance and their records in the api's State
//! (service `websocketmanager`): create, list, disconnect, send; restore
//! after a restart; heartbeat; reclaim from vanished instances.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use virtufin_api_client::ApiClient;
use virtufin_common::ApiError;

use crate::{
    config::Config,
    conn::{self, Conn, FirstAttempt, Outgoing, Status},
};
use virtufin_api_client::publisher::{Publisher, json_event};
use virtufin_api_client::trace::{self, TraceContext};

/// The websocketmanager's own state service name.
pub const SERVICE: &str = "websocketmanager";

/// What is persisted per connection (key `connections/<id>`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    pub id: String,
    pub url: String,
    pub auto_reconnect: bool,
    #[serde(default)]
    pub topic: Option<String>,
    pub instance_id: String,
    pub created_at: String,
    pub status: String,
}

/// What an instance writes to say it is alive (key `instances/<id>`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Heartbeat {
    last_seen_ms: u64,
}

fn conn_key(id: &str) -> String {
    format!("connections/{id}")
}

fn instance_key(id: &str) -> String {
    format!("instances/{id}")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Everything the connection actors and the RPCs share.
pub struct Shared {
    pub api: ApiClient,
    pub instance: String,
    pub config: Config,
    pub publisher: Publisher,
    pub tls: Arc<rustls::ClientConfig>,
    pub shutdown: CancellationToken,
    conns: Mutex<HashMap<String, Arc<Conn>>>,
    tasks: TaskTracker,
    pub metrics: crate::metrics::WsMetrics,
    /// How this instance's own heartbeats went: a reclaim needs them to
    /// have worked, without a gap, for longer than the grace. Otherwise a
    /// store outage (a failover) longer than the grace would look like
    /// the death of every other instance.
    beats: Mutex<Beats>,
}

#[derive(Debug, Default)]
struct Beats {
    /// The last heartbeat that succeeded.
    last_ok: Option<std::time::Instant>,
    /// Since when they have succeeded without a failure or a gap.
    ok_since: Option<std::time::Instant>,
}

/// rustls with the ring provider and the system's root certificates.
fn tls_config() -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        tracing::warn!(error = %e, "could not load a system certificate");
    }
    let (added, ignored) = roots.add_parsable_certificates(found.certs);
    tracing::debug!(added, ignored, "system root certificates");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS configuration: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

impl Shared {
    pub fn new(
        api: ApiClient,
        config: Config,
        publisher: Publisher,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, String> {
        let shared = Arc::new(Self {
            api,
            instance: config.instance(),
            config,
            publisher,
            tls: tls_config()?,
            shutdown,
            conns: Mutex::new(HashMap::new()),
            tasks: TaskTracker::new(),
            metrics: crate::metrics::WsMetrics::new(),
            beats: Mutex::new(Beats::default()),
        });
        shared.metrics.follow(Arc::downgrade(&shared));
        Ok(shared)
    }

    /// The state of every connection this instance owns.
    pub fn statuses(&self) -> Vec<crate::conn::Status> {
        self.conns().values().map(|c| c.status()).collect()
    }

    fn conns(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn local(&self, id: &str) -> Option<Arc<Conn>> {
        self.conns().get(id).cloned()
    }

    pub fn record(&self, conn: &Conn) -> Record {
        Record {
            id: conn.id.clone(),
            url: conn.url.clone(),
            auto_reconnect: conn.auto_reconnect,
            topic: conn.topic(),
            instance_id: self.instance.clone(),
            created_at: conn.created_at.clone(),
            status: conn.status().as_str().to_owned(),
        }
    }

    /// Writes the connection's record, unless another instance has taken
    /// it over meanwhile (this one was cut off from the store for longer
    /// than the reclaim grace): then this instance lets it go rather than
    /// claim it back, so that the peer does not keep two connections. The
    /// write is guarded by the etag just read, so a take-over between the
    /// read and the write wins. A failure is logged: the next change (or
    /// the api coming back) writes it again.
    pub async fn persist(&self, conn: &Conn) {
        let rec = self.record(conn);
        let Ok(json) = serde_json::to_string(&rec) else {
            return;
        };
        let key = conn_key(&conn.id);
        let etag = match self.api.get(SERVICE, &key).await {
            Ok(Some((value, etag))) => match serde_json::from_str::<Record>(&value) {
                Ok(r) if r.instance_id != self.instance => {
                    self.let_go(conn, r.instance_id);
                    return;
                }
                _ => etag,
            },
            // Not written yet (a new connection).
            Ok(None) => String::new(),
            Err(e) => {
                tracing::warn!(connection = %conn.id, error = %e, "could not persist the connection");
                return;
            }
        };
        if let Err(e) = self.api.save(SERVICE, &key, &json, &etag).await {
            tracing::warn!(connection = %conn.id, error = %e, "could not persist the connection");
        }
    }

    /// Stops this instance's actor of a connection that `owner` has taken
    /// over; its `disconnected` event names the new owner.
    fn let_go(&self, conn: &Conn, owner: String) {
        tracing::warn!(
            connection = %conn.id,
            %owner,
            "another instance took this connection over while this one could not reach the store; letting it go"
        );
        *conn.taken_by.lock().unwrap_or_else(|p| p.into_inner()) = Some(owner);
        conn.stop.cancel();
        let mut conns = self.conns();
        if conns
            .get(&conn.id)
            .is_some_and(|c| std::ptr::eq(Arc::as_ptr(c), conn))
        {
            conns.remove(&conn.id);
        }
    }

    /// Lets go of every local connection whose record now names another
    /// instance (see [`Self::persist`]); returns how many. Run after each
    /// heartbeat: a connection that stays up writes no record, so without
    /// this check an instance back from a partition would keep talking to
    /// the peer beside the one that took it over.
    pub async fn let_go_of_lost(&self) -> Result<usize, ApiError> {
        let owners: HashMap<String, String> = self
            .records()
            .await?
            .into_iter()
            .map(|(_, r)| (r.id, r.instance_id))
            .collect();
        let local: Vec<Arc<Conn>> = self.conns().values().cloned().collect();
        let mut n = 0;
        for c in local {
            if let Some(owner) = owners.get(&c.id)
                && *owner != self.instance
            {
                self.let_go(&c, owner.clone());
                n += 1;
            }
        }
        Ok(n)
    }

    /// Writes every local record again (after the api came back).
    pub async fn persist_all(&self) {
        let all: Vec<_> = self.conns().values().cloned().collect();
        for c in all {
            self.persist(&c).await;
        }
    }

    /// A lifecycle event on `websocketmanager.connectionstatus`.
    pub async fn lifecycle(&self, conn: &Conn, kind: &str, extra: Map<String, Value>) {
        let mut data = Map::new();
        data.insert("connection_id".into(), conn.id.clone().into());
        data.insert("url".into(), conn.url.clone().into());
        data.insert("instance_id".into(), self.instance.clone().into());
        data.extend(extra);
        let mut event = json_event(
            crate::STATUS_TOPIC,
            crate::SOURCE,
            &format!("com.virtufin.websocketmanager.connection.{kind}"),
            &Value::Object(data),
        );
        // The connection's trace, whichever call or task says it.
        conn.trace.stamp(&mut event.metadata);
        tracing::info!(connection = %conn.id, event = kind, "lifecycle");
        self.publisher.publish(event).await;
    }

    /// Starts the actor of a connection this instance owns.
    fn spawn(
        self: &Arc<Self>,
        rec: &Record,
        first: Option<oneshot::Sender<FirstAttempt>>,
        reclaimed_from: Option<String>,
    ) -> Arc<Conn> {
        let (conn, rx) = Conn::new(
            rec.id.clone(),
            rec.url.clone(),
            rec.auto_reconnect,
            rec.created_at.clone(),
            rec.topic.clone(),
            // Under the Connect call's span; restored and taken-over
            // connections (no call) start a trace of their own.
            trace::current()
                .map(|c| c.child())
                .unwrap_or_else(TraceContext::new_root),
        );
        *conn
            .reclaimed_from
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = reclaimed_from;
        self.conns().insert(rec.id.clone(), conn.clone());
        let (shared, c) = (self.clone(), conn.clone());
        self.tasks.spawn(async move {
            let span = tracing::info_span!(
                "connection",
                id = %c.id,
                url = %c.url,
                trace_id = %c.trace.trace_id_hex(),
                span_id = %c.trace.span_id_hex()
            );
            tracing::Instrument::instrument(
                trace::scope(
                    c.trace.clone(),
                    conn::run(shared.clone(), c.clone(), rx, first),
                ),
                span,
            )
            .await;
            // A given-up connection stays listed (from its record) until
            // Disconnect; the actor itself is gone.
            let mut conns = shared.conns();
            if conns.get(&c.id).is_some_and(|x| Arc::ptr_eq(x, &c)) && c.stop.is_cancelled() {
                conns.remove(&c.id);
            }
        });
        conn
    }

    /// Connect: validates, opens, waits for the first attempt.
    pub async fn connect(
        self: &Arc<Self>,
        url: &str,
        auto_reconnect: bool,
    ) -> Result<(String, Status), ApiError> {
        check_url(url)?;
        let live = self
            .conns()
            .values()
            .filter(|c| c.status() != Status::Disconnected)
            .count();
        if live >= self.config.max_connections {
            return Err(ApiError::new(
                tonic::Code::ResourceExhausted,
                format!(
                    "this instance already keeps {live} connections (VIRTUFIN_WS_MAX_CONNECTIONS)"
                ),
            ));
        }
        let rec = Record {
            id: uuid::Uuid::new_v4().to_string(),
            url: url.to_owned(),
            auto_reconnect,
            topic: None,
            instance_id: self.instance.clone(),
            created_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            status: Status::Connecting.as_str().to_owned(),
        };
        let (tx, rx) = oneshot::channel();
        let conn = self.spawn(&rec, Some(tx), None);
        let first = rx.await.unwrap_or(FirstAttempt {
            status: Status::Disconnected,
            error: Some("the service is shutting down".into()),
        });
        match first.status {
            Status::Disconnected => {
                conn.wait_finished().await;
                self.conns().remove(&rec.id);
                if let Err(e) = self.api.delete(SERVICE, &conn_key(&rec.id), "").await {
                    tracing::warn!(connection = %rec.id, error = %e, "could not remove the record of a failed connection");
                }
                Err(ApiError::unavailable(format!(
                    "cannot connect to {url}: {}",
                    first.error.unwrap_or_else(|| "unknown error".into())
                )))
            }
            status => {
                tracing::info!(connection = %rec.id, %url, status = status.as_str(), "connection opened");
                Ok((rec.id, status))
            }
        }
    }

    /// Every connection: records from State, live status for this
    /// instance's.
    pub async fn list(&self) -> Result<Vec<Record>, ApiError> {
        let mut by_id: HashMap<String, Record> = self
            .records()
            .await?
            .into_iter()
            .map(|(_, r)| (r.id.clone(), r))
            .collect();
        for c in self.conns().values() {
            by_id.insert(c.id.clone(), self.record(c));
        }
        let mut v: Vec<Record> = by_id.into_values().collect();
        v.sort_by(|a, b| (&a.created_at, &a.id).cmp(&(&b.created_at, &b.id)));
        Ok(v)
    }

    async fn records(&self) -> Result<Vec<(String, Record)>, ApiError> {
        let all = self.api.get_all(SERVICE).await.map_err(client_error)?;
        Ok(all
            .into_iter()
            .filter(|(k, _)| k.starts_with("connections/"))
            .filter_map(|(k, v)| serde_json::from_str::<Record>(&v).ok().map(|r| (k, r)))
            .collect())
    }

    /// This instance's live connection `id`, or why there is none.
    async fn owned(&self, id: &str) -> Result<Arc<Conn>, ApiError> {
        if id.is_empty() {
            return Err(ApiError::invalid("id is required"));
        }
        if let Some(c) = self.local(id) {
            return Ok(c);
        }
        match self
            .api
            .get(SERVICE, &conn_key(id))
            .await
            .map_err(client_error)?
        {
            Some((v, _)) => {
                let owner = serde_json::from_str::<Record>(&v)
                    .map(|r| r.instance_id)
                    .unwrap_or_default();
                Err(ApiError::failed_precondition(format!(
                    "connection {id} is owned by instance '{owner}', not by this one ('{}')",
                    self.instance
                )))
            }
            None => Err(ApiError::not_found(format!("connection {id} not found"))),
        }
    }

    pub async fn disconnect(&self, id: &str) -> Result<(), ApiError> {
        let conn = self.owned(id).await?;
        conn.stop.cancel();
        conn.wait_finished().await;
        self.conns().remove(id);
        self.api
            .delete(SERVICE, &conn_key(id), "")
            .await
            .map_err(client_error)?;
        tracing::info!(connection = id, "disconnected");
        Ok(())
    }

    pub async fn start_publish(&self, id: &str, topic: &str) -> Result<(), ApiError> {
        virtufin_common::validate::topic(topic)?;
        let conn = self.owned(id).await?;
        conn.set_topic(Some(topic.to_owned()));
        self.persist(&conn).await;
        Ok(())
    }

    pub async fn stop_publish(&self, id: &str) -> Result<(), ApiError> {
        let conn = self.owned(id).await?;
        conn.set_topic(None);
        self.persist(&conn).await;
        Ok(())
    }

    async fn connected(&self, id: &str) -> Result<Arc<Conn>, ApiError> {
        let conn = self.owned(id).await?;
        let status = conn.status();
        if status != Status::Connected {
            return Err(ApiError::failed_precondition(format!(
                "connection {id} is not connected (status: {})",
                status.as_str()
            )));
        }
        Ok(conn)
    }

    async fn write(&self, conn: &Conn, message: Message) -> Result<(), ApiError> {
        let (done, rx) = oneshot::channel();
        conn.out
            .send(Outgoing { message, done })
            .await
            .map_err(|_| {
                ApiError::failed_precondition(format!("connection {} is closed", conn.id))
            })?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ApiError::failed_precondition(format!(
                "connection {}: {e}",
                conn.id
            ))),
            Err(_) => Err(ApiError::failed_precondition(format!(
                "connection {} closed while sending",
                conn.id
            ))),
        }
    }

    /// Fire and forget: text frame for text/* and application/json.
    pub async fn send_raw(
        &self,
        id: &str,
        payload: Bytes,
        content_type: &str,
    ) -> Result<(), ApiError> {
        let conn = self.connected(id).await?;
        let message = frame(payload, content_type)?;
        self.write(&conn, message).await
    }

    /// Correlated send: [16-byte UUID][payload] out, the reply that starts
    /// with the same 16 bytes back (prefix stripped).
    pub async fn send(
        &self,
        id: &str,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, ApiError> {
        let conn = self.connected(id).await?;
        let key = *uuid::Uuid::new_v4().as_bytes();
        let (tx, rx) = oneshot::channel();
        conn.pending().insert(key, tx);
        let framed = crate::conn::correlated(&key, &payload);
        if let Err(e) = self.write(&conn, Message::Binary(framed.into())).await {
            conn.pending().remove(&key);
            return Err(e);
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(ApiError::unavailable(format!(
                "connection {id} was lost before the reply arrived"
            ))),
            Err(_) => {
                conn.pending().remove(&key);
                Err(ApiError::new(
                    tonic::Code::DeadlineExceeded,
                    format!(
                        "no reply on connection {id} within {} ms",
                        timeout.as_millis()
                    ),
                ))
            }
        }
    }

    /// Startup: a state write/read round trip (the readiness gate) and the
    /// heartbeat record.
    pub async fn heartbeat(&self) -> Result<(), String> {
        let result = self.heartbeat_once().await;
        let now = std::time::Instant::now();
        let mut beats = self.beats.lock().unwrap_or_else(|p| p.into_inner());
        match &result {
            Ok(()) => {
                // A call that hung through an outage succeeds late: that
                // gap counts as a failure.
                let gap = beats
                    .last_ok
                    .is_none_or(|t| now - t > self.config.heartbeat_interval * 2);
                if gap || beats.ok_since.is_none() {
                    beats.ok_since = Some(now);
                }
                beats.last_ok = Some(now);
            }
            Err(_) => beats.ok_since = None,
        }
        result
    }

    async fn heartbeat_once(&self) -> Result<(), String> {
        let hb = Heartbeat {
            last_seen_ms: now_ms(),
        };
        let json = serde_json::to_string(&hb).map_err(|e| e.to_string())?;
        let key = instance_key(&self.instance);
        self.api
            .save(SERVICE, &key, &json, "")
            .await
            .map_err(|e| e.to_string())?;
        match self
            .api
            .get(SERVICE, &key)
            .await
            .map_err(|e| e.to_string())?
        {
            Some((v, _)) if v == json => Ok(()),
            Some(_) => Ok(()), // another writer of the same instance id raced us
            None => Err("the heartbeat just written could not be read back".into()),
        }
    }

    /// Re-establishes this instance's connections; returns how many. Each
    /// connection's first attempt done is a `progress` step (a restore of
    /// many connections extends systemd's start timeout as it goes).
    pub async fn restore(
        self: &Arc<Self>,
        progress: &virtufin_common::notify::StartupProgress,
    ) -> Result<usize, ApiError> {
        let mine: Vec<Record> = self
            .records()
            .await?
            .into_iter()
            .map(|(_, r)| r)
            .filter(|r| r.instance_id == self.instance && r.status != Status::Disconnected.as_str())
            .filter(|r| self.local(&r.id).is_none())
            .collect();
        let total = mine.len();
        progress.step(&format!("restoring {total} connection(s)"));
        let mut waits = Vec::new();
        for rec in &mine {
            let (tx, rx) = oneshot::channel();
            self.spawn(rec, Some(tx), None);
            waits.push(rx);
        }
        for (i, w) in waits.into_iter().enumerate() {
            let _ = w.await;
            progress.step(&format!("restoring connections: {}/{total}", i + 1));
        }
        if !mine.is_empty() {
            tracing::info!(count = mine.len(), "connections restored");
        }
        Ok(mine.len())
    }

    /// Takes over connections whose instance has been silent for longer
    /// than the grace period, while this instance's own heartbeats have
    /// been succeeding for longer than it. The record's etag makes the
    /// take-over safe against other instances doing the same.
    pub async fn reclaim(self: &Arc<Self>) -> Result<usize, ApiError> {
        let all = self.api.get_all(SERVICE).await.map_err(client_error)?;
        // Another instance's silence is only evidence of its death if this
        // one could have heard it: its own heartbeats must have worked for
        // the whole grace, and still do (checked after the read, which
        // may itself have hung through an outage).
        if !self.store_worked_for(self.config.reclaim_after) {
            return Ok(0);
        }
        let seen: HashMap<String, u64> = all
            .iter()
            .filter_map(|(k, v)| {
                let id = k.strip_prefix("instances/")?;
                let hb: Heartbeat = serde_json::from_str(v).ok()?;
                Some((id.to_owned(), hb.last_seen_ms))
            })
            .collect();
        let grace = self.config.reclaim_after.as_millis() as u64;
        let now = now_ms();
        let mut taken = 0;
        for (key, _) in all.iter().filter(|(k, _)| k.starts_with("connections/")) {
            let Some((value, etag)) = self.api.get(SERVICE, key).await.map_err(client_error)?
            else {
                continue;
            };
            let Ok(mut rec) = serde_json::from_str::<Record>(&value) else {
                continue;
            };
            if rec.instance_id == self.instance || rec.status == Status::Disconnected.as_str() {
                continue;
            }
            let last = seen.get(&rec.instance_id).copied().unwrap_or(0);
            if now.saturating_sub(last) <= grace {
                continue;
            }
            let from = std::mem::replace(&mut rec.instance_id, self.instance.clone());
            // The record must not claim a live connection before this
            // instance has one.
            rec.status = Status::Connecting.as_str().to_owned();
            let Ok(json) = serde_json::to_string(&rec) else {
                continue;
            };
            match self.api.save(SERVICE, key, &json, &etag).await {
                Ok(_) => {
                    tracing::info!(connection = %rec.id, from = %from, "reclaimed a connection of a vanished instance");
                    self.spawn(&rec, None, Some(from));
                    taken += 1;
                }
                Err(e) => {
                    tracing::debug!(connection = %rec.id, error = %e, "another instance reclaimed it first")
                }
            }
        }
        Ok(taken)
    }

    fn store_worked_for(&self, grace: Duration) -> bool {
        let beats = self.beats.lock().unwrap_or_else(|p| p.into_inner());
        beats
            .last_ok
            .is_some_and(|t| t.elapsed() <= self.config.heartbeat_interval * 2)
            && beats.ok_since.is_some_and(|t| t.elapsed() > grace)
    }

    /// Waits for every connection actor (after shutdown).
    pub async fn wait_actors(&self, timeout: Duration) {
        self.tasks.close();
        let _ = tokio::time::timeout(timeout, self.tasks.wait()).await;
    }
}

fn client_error(e: virtufin_api_client::ClientError) -> ApiError {
    match e {
        virtufin_api_client::ClientError::Status(s) => ApiError::new(
            if s.code() == tonic::Code::InvalidArgument {
                tonic::Code::Internal
            } else {
                s.code()
            },
            format!("the api answered: {}", s.message()),
        ),
        other => ApiError::unavailable(other.to_string()),
    }
}

/// ws:// or wss://, parsable, with a host.
pub fn check_url(url: &str) -> Result<(), ApiError> {
    if url.trim().is_empty() {
        return Err(ApiError::invalid("url is required"));
    }
    let lower = url.to_ascii_lowercase();
    if !(lower.starts_with("ws://") || lower.starts_with("wss://")) {
        return Err(ApiError::invalid(format!(
            "url '{}' must start with ws:// or wss://",
            url.chars().take(200).collect::<String>()
        )));
    }
    url.into_client_request().map(|_| ()).map_err(|e| {
        ApiError::invalid(format!(
            "invalid url '{}': {e}",
            url.chars().take(200).collect::<String>()
        ))
    })
}

/// Text frame for text/* and application/json, binary otherwise.
pub fn frame(payload: Bytes, content_type: &str) -> Result<Message, ApiError> {
    let ct = if content_type.is_empty() {
        "text/plain"
    } else {
        content_type
    };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if essence.starts_with("text/") || essence == "application/json" {
        let text = String::from_utf8(payload.to_vec())
            .map_err(|_| ApiError::invalid(format!("content type {ct} needs UTF-8 text")))?;
        Ok(Message::Text(text.into()))
    } else {
        Ok(Message::Binary(payload))
    }
}
