//! The connection to Valkey's primary: one address, or the primary that
//! Valkey Sentinel names — then followed through a failover.
//!
//! With Sentinel, a command that a demoted primary refused (`READONLY`)
//! did not run: the connection asks Sentinel for the primary, moves there
//! and sends it once more. A command cut off on the way may have run, so
//! its error goes back to the caller as is, and the move happens for the
//! next command. While Sentinel names the same primary, redis-rs'
//! ConnectionManager reconnects by itself.

use std::{
    sync::{
        Arc, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use redis::{
    Client, ConnectionInfo, IntoConnectionInfo, RedisError, RedisResult,
    aio::{ConnectionManager, ConnectionManagerConfig},
    sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType},
};

use super::{ValkeyOptions, map_err};
use crate::{Result, StoreError};

/// Where the Sentinels are and which primary to ask them for, from
/// `redis+sentinel://[user@]host:port[,host:port…]/<primary>[/<db>]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentinelUrl {
    pub sentinels: Vec<(String, u16)>,
    pub primary: String,
    pub db: i64,
    pub username: Option<String>,
}

/// Parses a `redis+sentinel://` URL; `None` when `url` has another scheme.
pub fn parse_sentinel_url(url: &str) -> Option<std::result::Result<SentinelUrl, String>> {
    let rest = url.strip_prefix("redis+sentinel://")?;
    Some(parse_sentinel_rest(rest))
}

fn parse_sentinel_rest(rest: &str) -> std::result::Result<SentinelUrl, String> {
    const SHAPE: &str =
        "expected redis+sentinel://[user@]host:port[,host:port...]/<primary name>[/<db>]";
    let (authority, path) = rest.split_once('/').ok_or(SHAPE)?;
    let (username, hosts) = match authority.rsplit_once('@') {
        Some((user, hosts)) => {
            if user.contains(':') {
                return Err("a password does not belong in the URL: give it as a file \
                     (VIRTUFIN_VALKEY_PASSWORD_FILE or the credential valkey-password)"
                    .into());
            }
            (Some(user.to_owned()).filter(|u| !u.is_empty()), hosts)
        }
        None => (None, authority),
    };
    let mut sentinels = Vec::new();
    for h in hosts.split(',') {
        let (host, port) = h
            .rsplit_once(':')
            .ok_or_else(|| format!("sentinel '{h}' has no port; {SHAPE}"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("sentinel '{h}' has no host; {SHAPE}"));
        }
        let port: u16 = port
            .parse()
            .map_err(|_| format!("sentinel '{h}': '{port}' is not a port"))?;
        sentinels.push((host.to_owned(), port));
    }
    let mut parts = path.split('/');
    let primary = parts.next().unwrap_or_default().to_owned();
    if primary.is_empty() {
        return Err(format!("no primary name; {SHAPE}"));
    }
    let db = match parts.next() {
        None | Some("") => 0,
        Some(d) => d
            .parse()
            .map_err(|_| format!("'{d}' is not a database number"))?,
    };
    if parts.next().is_some() {
        return Err(SHAPE.into());
    }
    Ok(SentinelUrl {
        sentinels,
        primary,
        db,
        username,
    })
}

struct Current {
    generation: u64,
    client: Client,
    conn: ConnectionManager,
}

/// The Sentinels, each asked on its own and for a bounded time: redis-rs'
/// SentinelClient asks its Sentinels in turn with no connect or answer
/// timeout, so one whose host is gone (powered off, cut off the network)
/// or that hangs held the ask — and every command waiting to move with
/// it — for as long as the kernel retried (35 s after a power-off in the
/// multi-host test), or for ever when it was the first one listed.
struct Sentinels {
    primary: String,
    /// Each Sentinel's address (for errors) and a client asking only it.
    each: Vec<(String, tokio::sync::Mutex<SentinelClient>)>,
    /// The one that answered last is asked first.
    last_good: AtomicUsize,
    /// Longest ask of one Sentinel, with its check of the primary it names.
    limit: Duration,
}

impl Sentinels {
    /// A client of the primary the Sentinels name now.
    async fn resolve(&self) -> Result<Client> {
        let n = self.each.len();
        let first = self.last_good.load(Ordering::Relaxed);
        let mut why = Vec::with_capacity(n);
        for i in 0..n {
            let k = (first + i) % n;
            let (addr, sentinel) = &self.each[k];
            let ask = async { sentinel.lock().await.async_get_client().await };
            match tokio::time::timeout(self.limit, ask).await {
                Ok(Ok(client)) => {
                    self.last_good.store(k, Ordering::Relaxed);
                    return Ok(client);
                }
                Ok(Err(e)) => why.push(format!("{addr}: {e}")),
                Err(_) => why.push(format!(
                    "{addr}: no answer within {:?} (from it or the primary it names)",
                    self.limit
                )),
            }
        }
        Err(StoreError::Unavailable(format!(
            "no primary '{}' from Valkey Sentinel ({})",
            self.primary,
            why.join("; ")
        )))
    }
}

/// The connection to the primary, shared by clones of the store.
pub(super) struct Primary {
    sentinel: Option<Sentinels>,
    current: RwLock<Arc<Current>>,
    /// One move at a time.
    moving: tokio::sync::Mutex<()>,
    config: ConnectionManagerConfig,
}

impl Primary {
    pub(super) async fn connect(options: &ValkeyOptions) -> Result<Self> {
        let mut config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.response_timeout))
            .set_response_timeout(Some(options.response_timeout))
            .set_max_delay(Duration::from_secs(2));
        let sentinel_url = parse_sentinel_url(&options.url);
        if sentinel_url.is_some() {
            // With Sentinel, a primary that cannot be reached is Sentinel's
            // to replace: one more try, then the error, and the next command
            // asks Sentinel (follow). redis-rs' default, six tries with
            // back-off during which every command waits, kept the api on a
            // powered-off primary's host for 35 s (multi-host test).
            config = config.set_number_of_retries(1);
        }
        let invalid = |e: String| StoreError::Backend(format!("invalid Valkey URL: {e}"));
        let sentinel = match sentinel_url {
            None => None,
            Some(parsed) => {
                let url = parsed.map_err(invalid)?;
                let mut node = redis::RedisConnectionInfo::default().set_db(url.db);
                if let Some(u) = &url.username {
                    node = node.set_username(u);
                }
                if let Some(p) = &options.password {
                    node = node.set_password(p);
                }
                let each = url
                    .sentinels
                    .iter()
                    .map(|(h, p)| {
                        let mut info: ConnectionInfo = (h.as_str(), *p)
                            .into_connection_info()
                            .map_err(|e| invalid(e.to_string()))?;
                        if let Some(pw) = &options.sentinel_password {
                            let r = info.redis_settings().clone().set_password(pw);
                            info = info.set_redis_settings(r);
                        }
                        let client = SentinelClient::build(
                            vec![info],
                            url.primary.clone(),
                            Some(
                                SentinelNodeConnectionInfo::default()
                                    .set_redis_connection_info(node.clone()),
                            ),
                            SentinelServerType::Master,
                        )
                        .map_err(|e| invalid(e.to_string()))?;
                        Ok((format!("{h}:{p}"), tokio::sync::Mutex::new(client)))
                    })
                    .collect::<Result<_>>()?;
                Some(Sentinels {
                    primary: url.primary,
                    each,
                    last_good: AtomicUsize::new(0),
                    limit: options.response_timeout,
                })
            }
        };
        let client = match &sentinel {
            Some(s) => s.resolve().await?,
            None => {
                let mut info = options
                    .url
                    .as_str()
                    .into_connection_info()
                    .map_err(|e| invalid(e.to_string()))?;
                if let Some(password) = &options.password {
                    let redis = info.redis_settings().clone().set_password(password);
                    info = info.set_redis_settings(redis);
                }
                Client::open(info).map_err(|e| invalid(e.to_string()))?
            }
        };
        let conn = ConnectionManager::new_with_config(client.clone(), config.clone())
            .await
            .map_err(map_err)?;
        Ok(Self {
            sentinel,
            current: RwLock::new(Arc::new(Current {
                generation: 0,
                client,
                conn,
            })),
            moving: tokio::sync::Mutex::new(()),
            config,
        })
    }

    fn now(&self) -> Arc<Current> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The connection to use now, and its generation (for [`Self::follow`]).
    pub(super) fn conn(&self) -> (u64, ConnectionManager) {
        let c = self.now();
        (c.generation, c.conn.clone())
    }

    /// A client of the current primary (for connections of their own).
    pub(super) fn client(&self) -> Client {
        self.now().client.clone()
    }

    /// Moves to the primary Sentinel names now, unless a move since
    /// `generation` already happened. Without Sentinel: nothing to do.
    pub(super) async fn follow(&self, generation: u64) -> Result<()> {
        let Some(sentinels) = &self.sentinel else {
            return Ok(());
        };
        let _one = self.moving.lock().await;
        if self.now().generation != generation {
            return Ok(());
        }
        let client = sentinels.resolve().await?;
        let addr = client.get_connection_info().addr().to_string();
        let connect = ConnectionManager::new_with_config(client.clone(), self.config.clone());
        let conn = tokio::time::timeout(sentinels.limit, connect)
            .await
            .map_err(|_| {
                StoreError::Unavailable(format!(
                    "Valkey's primary '{}' at {addr}, as Sentinel names it, does not answer within {:?}",
                    sentinels.primary, sentinels.limit
                ))
            })?
            .map_err(map_err)?;
        let mut cur = self.current.write().unwrap_or_else(|p| p.into_inner());
        *cur = Arc::new(Current {
            generation: generation + 1,
            client,
            conn,
        });
        tracing::info!(primary = %sentinels.primary, address = %addr, "following Valkey's primary as Sentinel names it");
        Ok(())
    }

    /// Runs `f` on the primary's connection. A command a demoted primary
    /// refused did not run: it goes once more to the primary Sentinel
    /// names. After a connection error the next command finds the primary
    /// anew.
    pub(super) async fn run<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let (generation, conn) = self.conn();
        match f(conn).await {
            Ok(v) => Ok(v),
            Err(e) if self.sentinel.is_some() && is_readonly(&e) => {
                self.follow(generation).await?;
                f(self.conn().1).await.map_err(map_err)
            }
            Err(e) => {
                if self.sentinel.is_some() && is_connection_error(&e) {
                    // The primary may be gone: ask Sentinel before the next
                    // command (errors of that ask are seen by that command).
                    if let Err(fe) = self.follow(generation).await {
                        tracing::debug!(error = %fe, "no primary to follow yet");
                    }
                }
                Err(map_err(e))
            }
        }
    }
}

fn is_readonly(e: &RedisError) -> bool {
    matches!(
        e.code(),
        Some("READONLY") | Some("LOADING") | Some("MASTERDOWN")
    )
}

fn is_connection_error(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_unrecoverable_error()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_urls_parse_and_bad_ones_say_why() {
        let u =
            parse_sentinel_url("redis+sentinel://10.0.0.1:26379,[::1]:26380,h3:26381/virtufin/2")
                .expect("a sentinel URL")
                .expect("valid");
        assert_eq!(
            u.sentinels,
            vec![
                ("10.0.0.1".to_owned(), 26379),
                ("::1".to_owned(), 26380),
                ("h3".to_owned(), 26381)
            ]
        );
        assert_eq!(
            (u.primary.as_str(), u.db, u.username),
            ("virtufin", 2, None)
        );
        let u = parse_sentinel_url("redis+sentinel://api@h:1/p")
            .expect("a sentinel URL")
            .expect("valid");
        assert_eq!(u.username.as_deref(), Some("api"));
        assert!(parse_sentinel_url("redis://h:1").is_none());
        for (bad, says) in [
            ("redis+sentinel://h:1", "primary"),
            ("redis+sentinel://h:1/", "primary"),
            ("redis+sentinel://h/p", "no port"),
            ("redis+sentinel://h:x/p", "not a port"),
            ("redis+sentinel://u:secret@h:1/p", "password"),
            ("redis+sentinel://h:1/p/x", "database"),
        ] {
            let err = parse_sentinel_url(bad)
                .expect("a sentinel URL")
                .unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}
