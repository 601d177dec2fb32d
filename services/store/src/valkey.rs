//! The Valkey backend, in Dapr's own layout so that a Dapr sidecar on the
//! same Valkey reads and writes the same data:
//!
//! - state: one hash per key, `<prefix>||<key>`, fields `data` (the value)
//!   and `version` (the etag, incremented on every write) — `state.redis`;
//! - pub/sub: one stream per topic, entries `data <CloudEvent JSON>` added
//!   with `MAXLEN ~`, consumer groups from `0`, `XACK`, `XAUTOCLAIM` of what
//!   stays pending too long — `pubsub.redis`.
//!
//! The primary is one address or the one Valkey Sentinel names
//! (`redis+sentinel://…`, followed through a failover: [`primary`]). With
//! `min_replicas` a write is confirmed only once `WAIT` says that many
//! replicas have it.

mod primary;
pub use primary::{SentinelUrl, parse_sentinel_url};

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use redis::{
    AsyncConnectionConfig, Client, IntoConnectionInfo, RedisError, RedisResult, Script, Value,
    aio::{ConnectionManager, MultiplexedConnection},
};

use crate::{
    Backend, DeliveryOptions, Result, StateStore, StoreError, StreamPubSub, Versioned,
    streams::{Entry, StreamReader, Streams},
};

/// How the Valkey backend connects and lays out its data.
#[derive(Clone)]
pub struct ValkeyOptions {
    /// `redis://host:port[/db]`, `redis+unix:///path`, `unix:///path`, or
    /// `redis+sentinel://host:port[,host:port…]/<primary>[/<db>]`.
    pub url: String,
    /// Password to authenticate with (`AUTH`), in place of one in the URL.
    pub password: Option<String>,
    /// The Sentinels' own password, when they have one.
    pub sentinel_password: Option<String>,
    /// Replicas that must have a state write or a publish before it is
    /// confirmed (`WAIT`); 0 confirms once the primary has it.
    pub min_replicas: usize,
    /// Longest `WAIT` for those replicas.
    pub wait_timeout: Duration,
    /// Prefix of state keys; Dapr uses the app id (`virtufin-api`).
    pub key_prefix: String,
    /// Approximate bound of each topic's stream (`MAXLEN ~`).
    pub stream_max_len: usize,
    /// Longest wait for one command's answer.
    pub response_timeout: Duration,
}

impl ValkeyOptions {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            password: None,
            sentinel_password: None,
            min_replicas: 0,
            wait_timeout: Duration::from_secs(1),
            key_prefix: "virtufin-api".into(),
            stream_max_len: 100_000,
            response_timeout: Duration::from_secs(5),
        }
    }
}

// The password never shows in logs or errors.
impl std::fmt::Debug for ValkeyOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ValkeyOptions")
            .field("url", &self.url)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field(
                "sentinel_password",
                &self.sentinel_password.as_ref().map(|_| "<redacted>"),
            )
            .field("min_replicas", &self.min_replicas)
            .field("wait_timeout", &self.wait_timeout)
            .field("key_prefix", &self.key_prefix)
            .field("stream_max_len", &self.stream_max_len)
            .field("response_timeout", &self.response_timeout)
            .finish()
    }
}

/// Whether a Valkey URL carries a password (`redis://:PASSWORD@host`).
pub fn url_has_password(url: &str) -> bool {
    if parse_sentinel_url(url).is_some() {
        // Refused by validate_url when it does.
        return false;
    }
    url.into_connection_info()
        .is_ok_and(|i| i.redis_settings().password().is_some())
}

/// Checks a Valkey URL without connecting.
pub fn validate_url(url: &str) -> std::result::Result<(), String> {
    match parse_sentinel_url(url) {
        Some(parsed) => parsed.map(|_| ()),
        None => Client::open(url).map(|_| ()).map_err(|e| e.to_string()),
    }
}

/// Connects (one attempt) and builds the backend.
pub async fn connect(options: ValkeyOptions, delivery: DeliveryOptions) -> Result<Backend> {
    let store = Arc::new(ValkeyStore::connect(options).await?);
    Ok(Backend {
        kind: "valkey",
        state: store.clone(),
        pubsub: Arc::new(StreamPubSub::new(store, delivery)),
    })
}

/// State and streams on Valkey.
#[derive(Clone)]
pub struct ValkeyStore {
    primary: Arc<primary::Primary>,
    options: ValkeyOptions,
    set_script: Arc<Script>,
    delete_script: Arc<Script>,
    forget_script: Arc<Script>,
}

impl std::fmt::Debug for ValkeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ValkeyStore")
            .field("url", &self.options.url)
            .finish()
    }
}

// Etag checks and the version bump must be atomic: one script each.
// Returns the new version, or -1 when the etag does not match; etag '0'
// (CREATE_ONLY) matches only a key that does not exist.
const SET_LUA: &str = r"
local v = redis.call('HGET', KEYS[1], 'version')
if ARGV[2] == '0' then
  if v then return -1 end
elseif ARGV[2] ~= '' and v ~= ARGV[2] then return -1 end
local n = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('HSET', KEYS[1], 'data', ARGV[1])
return n
";

// Returns the number of keys deleted, or -1 when the etag does not match.
const DELETE_LUA: &str = r"
local v = redis.call('HGET', KEYS[1], 'version')
if ARGV[1] ~= '' and v ~= ARGV[1] then return -1 end
return redis.call('DEL', KEYS[1])
";

// Removes a consumer only while it holds nothing pending, so that a
// subscription ending never drops another one's unacknowledged entries.
const FORGET_LUA: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local ok, p = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if not ok then return 0 end
if #p == 0 then return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2]) end
return -1
";

fn map_err(e: RedisError) -> StoreError {
    if e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_unrecoverable_error()
    {
        StoreError::Unavailable(e.to_string())
    } else {
        StoreError::Backend(e.to_string())
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// Parses `[[id, [field, value, ...]], ...]` into entries; entries whose
/// fields are gone (trimmed) or lack `data` are skipped.
fn parse_entries(v: &Value) -> Vec<Entry> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| {
            let Value::Array(pair) = item else {
                return None;
            };
            let id = text(pair.first()?)?;
            let fields = match pair.get(1)? {
                Value::Array(f) => f,
                _ => return None,
            };
            let data = fields.chunks(2).find_map(|kv| match kv {
                [k, Value::BulkString(d)] if text(k).as_deref() == Some("data") => {
                    Some(Bytes::copy_from_slice(d))
                }
                _ => None,
            })?;
            Some(Entry { id, data })
        })
        .collect()
}

/// `XREADGROUP` answers `[[stream, entries]]` (or a map in RESP3), or nil.
fn parse_read_reply(v: &Value) -> Vec<Entry> {
    match v {
        Value::Array(streams) => streams
            .iter()
            .flat_map(|s| match s {
                Value::Array(pair) if pair.len() == 2 => parse_entries(&pair[1]),
                _ => Vec::new(),
            })
            .collect(),
        Value::Map(m) => m.iter().flat_map(|(_, e)| parse_entries(e)).collect(),
        _ => Vec::new(),
    }
}

impl ValkeyStore {
    /// Connects once; fails when Valkey (or, with Sentinel, a primary)
    /// does not answer.
    pub async fn connect(options: ValkeyOptions) -> Result<Self> {
        let primary = Arc::new(primary::Primary::connect(&options).await?);
        Ok(Self {
            primary,
            options,
            set_script: Arc::new(Script::new(SET_LUA)),
            delete_script: Arc::new(Script::new(DELETE_LUA)),
            forget_script: Arc::new(Script::new(FORGET_LUA)),
        })
    }

    /// The Valkey key that holds `key`'s state (`<prefix>||<key>`).
    pub fn state_key(&self, key: &str) -> String {
        format!("{}||{}", self.options.key_prefix, key)
    }

    /// The Valkey key of a set: `<prefix>|sets||<key>`, outside the state
    /// namespace (`<prefix>||…`), so no state key can ever meet it.
    pub fn set_key(&self, key: &str) -> String {
        format!("{}|sets||{}", self.options.key_prefix, key)
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T> {
        self.primary
            .run(|mut c| async move { cmd.query_async(&mut c).await })
            .await
    }

    /// Runs a write and, with `min_replicas`, `WAIT`s on the same
    /// connection for that many replicas to have it.
    async fn write<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let (n, timeout) = (self.options.min_replicas, self.options.wait_timeout);
        let (value, acked) = self
            .primary
            .run(|c| {
                let written = f(c.clone());
                async move {
                    let value = written.await?;
                    if n == 0 {
                        return Ok((value, 0));
                    }
                    let mut c = c;
                    let acked: usize = redis::cmd("WAIT")
                        .arg(n)
                        .arg(timeout.as_millis().max(1) as u64)
                        .query_async(&mut c)
                        .await?;
                    Ok((value, acked))
                }
            })
            .await?;
        if acked < n {
            return Err(StoreError::Unavailable(format!(
                "not confirmed: {acked} of the {n} replicas VIRTUFIN_VALKEY_MIN_REPLICAS asks \
                 for had the write within {timeout:?} (it may still take effect)"
            )));
        }
        Ok(value)
    }
}

fn versioned(fields: Vec<Option<String>>) -> Option<Versioned> {
    match fields.as_slice() {
        [Some(value), version] => Some(Versioned {
            value: value.clone(),
            // A hash without a version (written by hand) still reads.
            etag: version.clone().unwrap_or_else(|| "0".into()),
        }),
        _ => None,
    }
}

#[async_trait]
impl StateStore for ValkeyStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>> {
        let fields: Vec<Option<String>> = self
            .query(
                redis::cmd("HMGET")
                    .arg(self.state_key(key))
                    .arg("data")
                    .arg("version"),
            )
            .await?;
        Ok(versioned(fields))
    }

    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Versioned>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for k in keys {
            pipe.cmd("HMGET")
                .arg(self.state_key(k))
                .arg("data")
                .arg("version");
        }
        let rows: Vec<Vec<Option<String>>> = self
            .primary
            .run(|mut c| {
                let pipe = &pipe;
                async move { pipe.query_async(&mut c).await }
            })
            .await?;
        Ok(rows.into_iter().map(versioned).collect())
    }

    async fn set(&self, key: &str, value: &str, etag: Option<&str>) -> Result<String> {
        let invocation = {
            let mut i = self.set_script.key(self.state_key(key));
            i.arg(value).arg(etag.unwrap_or(""));
            i
        };
        let n: i64 = self
            .write(|mut c| {
                let invocation = &invocation;
                async move { invocation.invoke_async(&mut c).await }
            })
            .await?;
        if n < 0 {
            return Err(StoreError::EtagMismatch {
                key: key.to_owned(),
            });
        }
        Ok(n.to_string())
    }

    async fn delete(&self, key: &str, etag: Option<&str>) -> Result<bool> {
        let invocation = {
            let mut i = self.delete_script.key(self.state_key(key));
            i.arg(etag.unwrap_or(""));
            i
        };
        let n: i64 = self
            .write(|mut c| {
                let invocation = &invocation;
                async move { invocation.invoke_async(&mut c).await }
            })
            .await?;
        if n < 0 {
            return Err(StoreError::EtagMismatch {
                key: key.to_owned(),
            });
        }
        Ok(n > 0)
    }

    async fn set_add(&self, key: &str, members: &[String]) -> Result<usize> {
        if members.is_empty() {
            return Ok(0);
        }
        let cmd = redis::cmd("SADD")
            .arg(self.set_key(key))
            .arg(members)
            .clone();
        self.write(|mut c| {
            let cmd = &cmd;
            async move { cmd.query_async(&mut c).await }
        })
        .await
    }

    async fn set_members(&self, key: &str) -> Result<Vec<String>> {
        self.query(redis::cmd("SMEMBERS").arg(self.set_key(key)))
            .await
    }

    async fn ping(&self) -> Result<()> {
        let _: String = self.query(&redis::cmd("PING")).await?;
        Ok(())
    }
}

#[async_trait]
impl Streams for ValkeyStore {
    type Reader = ValkeyReader;

    async fn add(&self, topic: &str, data: &[u8]) -> Result<String> {
        let cmd = redis::cmd("XADD")
            .arg(topic)
            .arg("MAXLEN")
            .arg("~")
            .arg(self.options.stream_max_len)
            .arg("*")
            .arg("data")
            .arg(data)
            .clone();
        self.write(|mut c| {
            let cmd = &cmd;
            async move { cmd.query_async(&mut c).await }
        })
        .await
    }

    async fn add_many(&self, events: &[(String, Vec<u8>)]) -> Result<Vec<String>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for (topic, data) in events {
            pipe.cmd("XADD")
                .arg(topic)
                .arg("MAXLEN")
                .arg("~")
                .arg(self.options.stream_max_len)
                .arg("*")
                .arg("data")
                .arg(data.as_slice());
        }
        self.write(|mut c| {
            let pipe = &pipe;
            async move { pipe.query_async(&mut c).await }
        })
        .await
    }

    async fn create_group(&self, topic: &str, group: &str) -> Result<()> {
        let r: Result<Value> = self
            .query(
                redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(topic)
                    .arg(group)
                    .arg("0")
                    .arg("MKSTREAM"),
            )
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(StoreError::Backend(m)) if m.contains("BUSYGROUP") => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn reader(&self, topic: &str, group: &str, consumer: &str) -> Result<ValkeyReader> {
        Ok(ValkeyReader {
            store: self.clone(),
            conn: None,
            topic: topic.to_owned(),
            group: group.to_owned(),
            consumer: consumer.to_owned(),
        })
    }

    async fn own_pending(
        &self,
        topic: &str,
        group: &str,
        consumer: &str,
        count: usize,
    ) -> Result<Vec<Entry>> {
        let v: Value = self
            .query(
                redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(group)
                    .arg(consumer)
                    .arg("COUNT")
                    .arg(count.max(1))
                    .arg("STREAMS")
                    .arg(topic)
                    .arg("0"),
            )
            .await?;
        Ok(parse_read_reply(&v))
    }

    async fn ack(&self, topic: &str, group: &str, ids: &[String]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let _: i64 = self
            .query(redis::cmd("XACK").arg(topic).arg(group).arg(ids))
            .await?;
        Ok(())
    }

    async fn claim(
        &self,
        topic: &str,
        group: &str,
        consumer: &str,
        ids: &[String],
    ) -> Result<Vec<Entry>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let v: Value = self
            .query(
                redis::cmd("XCLAIM")
                    .arg(topic)
                    .arg(group)
                    .arg(consumer)
                    .arg(0)
                    .arg(ids),
            )
            .await?;
        Ok(parse_entries(&v))
    }

    async fn autoclaim(
        &self,
        topic: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<Entry>> {
        let mut cursor = "0-0".to_owned();
        let mut out = Vec::new();
        // XAUTOCLAIM scans a bounded slice of the pending list per call.
        for _ in 0..16 {
            let v: Value = self
                .query(
                    redis::cmd("XAUTOCLAIM")
                        .arg(topic)
                        .arg(group)
                        .arg(consumer)
                        .arg(min_idle.as_millis() as u64)
                        .arg(&cursor)
                        .arg("COUNT")
                        .arg(count.max(1)),
                )
                .await?;
            let Value::Array(parts) = v else { break };
            let next = parts.first().and_then(text).unwrap_or_else(|| "0-0".into());
            if let Some(entries) = parts.get(1) {
                out.extend(parse_entries(entries));
            }
            if next == "0-0" || out.len() >= count {
                break;
            }
            cursor = next;
        }
        Ok(out)
    }

    async fn forget_consumer(&self, topic: &str, group: &str, consumer: &str) -> Result<()> {
        let invocation = {
            let mut i = self.forget_script.key(topic);
            i.arg(group).arg(consumer);
            i
        };
        let _: i64 = self
            .primary
            .run(|mut c| {
                let invocation = &invocation;
                async move { invocation.invoke_async(&mut c).await }
            })
            .await?;
        Ok(())
    }

    async fn ping(&self) -> Result<()> {
        StateStore::ping(self).await
    }
}

/// Reads new entries over a connection of its own: `XREADGROUP … BLOCK`
/// holds a connection for as long as it waits.
pub struct ValkeyReader {
    store: ValkeyStore,
    conn: Option<MultiplexedConnection>,
    topic: String,
    group: String,
    consumer: String,
}

#[async_trait]
impl StreamReader for ValkeyReader {
    async fn read(&mut self, count: usize, block: Duration) -> Result<Vec<Entry>> {
        let conn = match &mut self.conn {
            Some(c) => c,
            None => {
                let cfg = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(self.store.options.response_timeout))
                    .set_response_timeout(Some(block + self.store.options.response_timeout));
                let c = self
                    .store
                    .primary
                    .client()
                    .get_multiplexed_async_connection_with_config(&cfg)
                    .await
                    .map_err(map_err)?;
                self.conn.insert(c)
            }
        };
        let r: std::result::Result<Value, RedisError> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&self.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(count.max(1))
            .arg("BLOCK")
            .arg(block.as_millis().max(1) as u64)
            .arg("STREAMS")
            .arg(&self.topic)
            .arg(">")
            .query_async(conn)
            .await;
        match r {
            Ok(v) => Ok(parse_read_reply(&v)),
            Err(e) if e.code() == Some("NOGROUP") => {
                // The stream was deleted under us: recreate the group.
                self.store.create_group(&self.topic, &self.group).await?;
                Ok(Vec::new())
            }
            Err(e) => {
                self.conn = None;
                Err(map_err(e))
            }
        }
    }
}
