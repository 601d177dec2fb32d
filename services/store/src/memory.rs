//! The embedded backend: state and streams in this process's memory, with
//! the same semantics as Valkey (etags as versions, consumer groups, pending
//! lists). The default when no Valkey is configured; nothing survives a
//! restart.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::Notify;

use crate::{
    Backend, DeliveryOptions, Result, StateStore, StoreError, StreamPubSub, Versioned,
    streams::{Entry, StreamReader, Streams},
};

/// Builds the embedded backend.
pub fn backend(options: DeliveryOptions, max_len: usize) -> Backend {
    let store = Arc::new(MemoryStore::new(max_len));
    Backend {
        kind: "memory",
        state: store.clone(),
        pubsub: Arc::new(StreamPubSub::new(store, options)),
    }
}

type Id = (u64, u64);

fn id_str(id: Id) -> String {
    format!("{}-{}", id.0, id.1)
}

fn parse_id(s: &str) -> Option<Id> {
    let (a, b) = s.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

#[derive(Debug)]
struct PendingEntry {
    consumer: String,
    delivered_at: Instant,
}

#[derive(Debug, Default)]
struct Group {
    last_delivered: Id,
    pending: BTreeMap<Id, PendingEntry>,
    consumers: std::collections::HashSet<String>,
}

#[derive(Debug, Default)]
struct Stream {
    entries: BTreeMap<Id, Bytes>,
    last_id: Id,
    groups: HashMap<String, Group>,
    notify: Arc<Notify>,
}

#[derive(Debug, Default)]
struct Inner {
    state: HashMap<String, (String, u64)>,
    sets: HashMap<String, std::collections::BTreeSet<String>>,
    streams: HashMap<String, Stream>,
}

#[derive(Debug)]
struct Shared {
    inner: Mutex<Inner>,
    max_len: usize,
}

/// State and streams in memory (a cheap handle; clones share the data).
#[derive(Debug, Clone)]
pub struct MemoryStore {
    shared: Arc<Shared>,
}

impl MemoryStore {
    /// `max_len` bounds each topic's retained entries, like `MAXLEN`.
    pub fn new(max_len: usize) -> Self {
        Self {
            shared: Arc::new(Shared {
                inner: Mutex::new(Inner::default()),
                max_len: max_len.max(1),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section leaves the maps consistent, so a poisoned
        // lock (a panic elsewhere) is safe to keep using.
        self.shared.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

use crate::CREATE_ONLY;

fn check_etag(key: &str, current: Option<u64>, etag: Option<&str>) -> Result<()> {
    match etag {
        None => Ok(()),
        Some(e) if current.map(|v| v.to_string()).as_deref() == Some(e) => Ok(()),
        Some(_) => Err(StoreError::EtagMismatch {
            key: key.to_owned(),
        }),
    }
}

#[async_trait]
impl StateStore for MemoryStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>> {
        Ok(self.lock().state.get(key).map(|(v, n)| Versioned {
            value: v.clone(),
            etag: n.to_string(),
        }))
    }

    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Versioned>>> {
        let g = self.lock();
        Ok(keys
            .iter()
            .map(|k| {
                g.state.get(k).map(|(v, n)| Versioned {
                    value: v.clone(),
                    etag: n.to_string(),
                })
            })
            .collect())
    }

    async fn set(&self, key: &str, value: &str, etag: Option<&str>) -> Result<String> {
        let mut g = self.lock();
        let current = g.state.get(key).map(|(_, n)| *n);
        match etag {
            // Version 0: the key must not exist yet (create only).
            Some(CREATE_ONLY) if current.is_some() => {
                return Err(StoreError::EtagMismatch {
                    key: key.to_owned(),
                });
            }
            Some(CREATE_ONLY) => {}
            _ => check_etag(key, current, etag)?,
        }
        let next = current.unwrap_or(0) + 1;
        g.state.insert(key.to_owned(), (value.to_owned(), next));
        Ok(next.to_string())
    }

    async fn delete(&self, key: &str, etag: Option<&str>) -> Result<bool> {
        let mut g = self.lock();
        let current = g.state.get(key).map(|(_, n)| *n);
        check_etag(key, current, etag)?;
        Ok(g.state.remove(key).is_some())
    }

    async fn set_add(&self, key: &str, members: &[String]) -> Result<usize> {
        let mut g = self.lock();
        let set = g.sets.entry(key.to_owned()).or_default();
        Ok(members.iter().filter(|m| set.insert((*m).clone())).count())
    }

    async fn set_members(&self, key: &str) -> Result<Vec<String>> {
        Ok(self
            .lock()
            .sets
            .get(key)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default())
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Stream {
    fn take_new(&mut self, group: &str, consumer: &str, count: usize) -> Vec<Entry> {
        let Some(g) = self.groups.get_mut(group) else {
            return Vec::new();
        };
        g.consumers.insert(consumer.to_owned());
        let start = g.last_delivered;
        let picked: Vec<(Id, Bytes)> = self
            .entries
            .range((std::ops::Bound::Excluded(start), std::ops::Bound::Unbounded))
            .take(count)
            .map(|(id, d)| (*id, d.clone()))
            .collect();
        let now = Instant::now();
        for (id, _) in &picked {
            g.last_delivered = *id;
            g.pending.insert(
                *id,
                PendingEntry {
                    consumer: consumer.to_owned(),
                    delivered_at: now,
                },
            );
        }
        picked
            .into_iter()
            .map(|(id, data)| Entry {
                id: id_str(id),
                data,
            })
            .collect()
    }
}

/// Moves pending `ids` to `consumer` (resetting their idle time) and
/// returns their entries; ids whose entry was trimmed away leave the
/// pending list, as `XCLAIM` does.
fn take_over(
    entries: &BTreeMap<Id, Bytes>,
    gr: &mut Group,
    ids: &[Id],
    consumer: &str,
) -> Vec<Entry> {
    let now = Instant::now();
    let mut out = Vec::new();
    for id in ids {
        match entries.get(id) {
            Some(d) => {
                if let Some(p) = gr.pending.get_mut(id) {
                    p.consumer = consumer.to_owned();
                    p.delivered_at = now;
                }
                out.push(Entry {
                    id: id_str(*id),
                    data: d.clone(),
                });
            }
            None => {
                gr.pending.remove(id);
            }
        }
    }
    out
}

#[async_trait]
impl Streams for MemoryStore {
    type Reader = MemoryReader;

    async fn add(&self, topic: &str, data: &[u8]) -> Result<String> {
        let mut g = self.lock();
        let s = g.streams.entry(topic.to_owned()).or_default();
        let ms = now_ms();
        let id = if ms > s.last_id.0 {
            (ms, 0)
        } else {
            (s.last_id.0, s.last_id.1 + 1)
        };
        s.last_id = id;
        s.entries.insert(id, Bytes::copy_from_slice(data));
        while s.entries.len() > self.shared.max_len {
            s.entries.pop_first();
        }
        s.notify.notify_waiters();
        Ok(id_str(id))
    }

    async fn create_group(&self, topic: &str, group: &str) -> Result<()> {
        let mut g = self.lock();
        let s = g.streams.entry(topic.to_owned()).or_default();
        s.groups.entry(group.to_owned()).or_default();
        Ok(())
    }

    async fn reader(&self, topic: &str, group: &str, consumer: &str) -> Result<MemoryReader> {
        let notify = {
            let mut g = self.lock();
            g.streams
                .entry(topic.to_owned())
                .or_default()
                .notify
                .clone()
        };
        Ok(MemoryReader {
            store: self.clone(),
            notify,
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
        let g = self.lock();
        let Some(s) = g.streams.get(topic) else {
            return Ok(Vec::new());
        };
        let Some(gr) = s.groups.get(group) else {
            return Ok(Vec::new());
        };
        Ok(gr
            .pending
            .iter()
            .filter(|(_, p)| p.consumer == consumer)
            .filter_map(|(id, _)| {
                s.entries.get(id).map(|d| Entry {
                    id: id_str(*id),
                    data: d.clone(),
                })
            })
            .take(count)
            .collect())
    }

    async fn ack(&self, topic: &str, group: &str, ids: &[String]) -> Result<()> {
        let mut g = self.lock();
        if let Some(gr) = g
            .streams
            .get_mut(topic)
            .and_then(|s| s.groups.get_mut(group))
        {
            for id in ids.iter().filter_map(|i| parse_id(i)) {
                gr.pending.remove(&id);
            }
        }
        Ok(())
    }

    async fn claim(
        &self,
        topic: &str,
        group: &str,
        consumer: &str,
        ids: &[String],
    ) -> Result<Vec<Entry>> {
        let mut g = self.lock();
        let Some(s) = g.streams.get_mut(topic) else {
            return Ok(Vec::new());
        };
        let Some(gr) = s.groups.get_mut(group) else {
            return Ok(Vec::new());
        };
        let ids: Vec<Id> = ids
            .iter()
            .filter_map(|i| parse_id(i))
            .filter(|id| gr.pending.contains_key(id))
            .collect();
        Ok(take_over(&s.entries, gr, &ids, consumer))
    }

    async fn autoclaim(
        &self,
        topic: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<Entry>> {
        let mut g = self.lock();
        let Some(s) = g.streams.get_mut(topic) else {
            return Ok(Vec::new());
        };
        let Some(gr) = s.groups.get_mut(group) else {
            return Ok(Vec::new());
        };
        let now = Instant::now();
        let stale: Vec<Id> = gr
            .pending
            .iter()
            .filter(|(_, p)| now.duration_since(p.delivered_at) >= min_idle)
            .map(|(id, _)| *id)
            .take(count)
            .collect();
        Ok(take_over(&s.entries, gr, &stale, consumer))
    }

    async fn forget_consumer(&self, topic: &str, group: &str, consumer: &str) -> Result<()> {
        let mut g = self.lock();
        if let Some(gr) = g
            .streams
            .get_mut(topic)
            .and_then(|s| s.groups.get_mut(group))
            && !gr.pending.values().any(|p| p.consumer == consumer)
        {
            gr.consumers.remove(consumer);
        }
        Ok(())
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }
}

/// Reads new entries of one group for one consumer.
pub struct MemoryReader {
    store: MemoryStore,
    notify: Arc<Notify>,
    topic: String,
    group: String,
    consumer: String,
}

#[async_trait]
impl StreamReader for MemoryReader {
    async fn read(&mut self, count: usize, block: Duration) -> Result<Vec<Entry>> {
        let deadline = tokio::time::Instant::now() + block;
        loop {
            // Register for wake-ups before looking, so no add slips between.
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let got = {
                let mut g = self.store.lock();
                match g.streams.get_mut(&self.topic) {
                    Some(s) => s.take_new(&self.group, &self.consumer, count),
                    None => Vec::new(),
                }
            };
            if !got.is_empty() {
                return Ok(got);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }
}
