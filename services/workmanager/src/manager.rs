//! Workers and their registry in the api's State (service `workmanager`):
//! `workers/index` holds the ids, `workers/<id>` each worker's record,
//! `workers/<id>/code/<n>` its code versions (history). Lifecycle events go
//! to `workmanager.workerstatus`.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use virtufin_api_client::{
    ApiClient, ClientError,
    publisher::{Publisher, json_event},
};
use virtufin_common::ApiError;
use virtufin_common::audit::Origin;

use crate::{
    config::Config,
    engine::{EngineError, Kind},
    runtime::{Running, WorkerSpec},
    source::{self, SourceKind},
};

pub const SERVICE: &str = "workmanager";
pub const INDEX_KEY: &str = "workers/index";
pub const LEASE_KEY: &str = "recovery/leader";
pub const MAX_TAGS: usize = 50;
pub const MAX_TAG_KEY: usize = 128;
pub const MAX_TAG_VALUE: usize = 1024;

/// A worker's record in State.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    pub id: String,
    pub mime_type: String,
    pub language: String,
    pub topic: String,
    pub group: String,
    pub created_at: String,
    /// "running" or "stopped".
    pub status: String,
    pub config: BTreeMap<String, String>,
    pub tags: BTreeMap<String, String>,
    /// Code versions, oldest first: (created_at, sha256).
    pub history: Vec<(String, String)>,
    /// The instance that created or last started it.
    pub instance_id: String,
    /// The instances running it (several hosts may run one worker: members
    /// of its group). Absent in records written before there could be more
    /// than one; there `status` and `instance_id` say it.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub instances: BTreeSet<String>,
}

impl Record {
    /// Whether `instance` runs this worker (and so recovers it).
    fn runs_on(&self, instance: &str) -> bool {
        if self.instances.is_empty() {
            self.status == "running" && self.instance_id == instance
        } else {
            self.instances.contains(instance)
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Lease {
    holder: String,
    expires_ms: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

fn worker_key(id: &str) -> String {
    format!("workers/{id}")
}

fn code_key(id: &str, n: usize) -> String {
    format!("workers/{id}/code/{n}")
}

fn client_error(e: ClientError) -> ApiError {
    match e {
        ClientError::Status(s) => ApiError::new(
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

/// Tag that lowers a worker's address-space limit (MiB).
pub const LIMIT_MEMORY_TAG: &str = "limits.memory_mb";
/// Tag that lowers a worker's per-event timeout (milliseconds).
pub const LIMIT_TIMEOUT_TAG: &str = "limits.event_timeout_ms";

/// One worker's resource limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Address-space limit of its process, MiB (0: none).
    pub memory_mb: u64,
    pub event_timeout: Duration,
}

impl Limits {
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mb.saturating_mul(1024 * 1024)
    }
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(data))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// What CreateWorker asks for.
#[derive(Debug, Clone, Default)]
pub struct NewWorker {
    pub content: Vec<u8>,
    pub url: String,
    pub sha256: String,
    pub mime_type: String,
    pub topic: String,
    pub group: String,
    pub config: HashMap<String, String>,
    pub tags: HashMap<String, String>,
}

/// Shared by the RPCs and the workers.
pub struct Shared {
    pub api: ApiClient,
    pub config: Config,
    pub instance: String,
    pub publisher: Publisher,
    pub shutdown: CancellationToken,
    running: Mutex<HashMap<String, Running>>,
    pub metrics: crate::metrics::WmMetrics,
}

impl Shared {
    pub fn new(
        api: ApiClient,
        config: Config,
        publisher: Publisher,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            api,
            instance: config.instance(),
            config,
            publisher,
            shutdown,
            running: Mutex::new(HashMap::new()),
            metrics: crate::metrics::WmMetrics::new(),
        })
    }

    /// A lifecycle event on `workmanager.workerstatus`.
    pub async fn lifecycle(
        &self,
        kind: &str,
        id: &str,
        group: &str,
        topic: &str,
        extra: Map<String, Value>,
    ) {
        let mut data = Map::new();
        data.insert("worker_id".into(), id.into());
        data.insert("group".into(), group.into());
        data.insert("topic".into(), topic.into());
        data.extend(extra);
        tracing::info!(worker = id, event = kind, "lifecycle");
        self.publisher
            .publish(json_event(
                crate::STATUS_TOPIC,
                crate::SOURCE,
                &format!("com.virtufin.workmanager.worker.{kind}"),
                &Value::Object(data),
            ))
            .await;
    }

    pub async fn worker_error(&self, spec: &WorkerSpec, e: &EngineError) {
        self.metrics.error(&spec.id, e);
        let mut extra = Map::new();
        extra.insert("error_type".into(), e.error_type().into());
        extra.insert("error_message".into(), e.to_string().into());
        self.lifecycle("error", &spec.id, &spec.group, &spec.topic, extra)
            .await;
    }

    async fn load(&self, id: &str) -> Result<(Record, String), ApiError> {
        if id.is_empty() {
            return Err(ApiError::invalid("id is required"));
        }
        match self
            .api
            .get(SERVICE, &worker_key(id))
            .await
            .map_err(client_error)?
        {
            Some((v, etag)) => serde_json::from_str(&v).map(|r| (r, etag)).map_err(|e| {
                ApiError::new(
                    tonic::Code::DataLoss,
                    format!("the record of worker {id} is unreadable: {e}"),
                )
            }),
            None => Err(ApiError::not_found(format!("worker {id} not found"))),
        }
    }

    /// Changes a record with its etag, again from a fresh read when another
    /// instance wrote it meanwhile (instances on several hosts start and
    /// stop one worker).
    async fn modify(&self, id: &str, mut f: impl FnMut(&mut Record)) -> Result<Record, ApiError> {
        let mut attempts = 0;
        loop {
            let (mut rec, etag) = self.load(id).await?;
            f(&mut rec);
            let json = serde_json::to_string(&rec).map_err(|e| ApiError::invalid(e.to_string()))?;
            match self.api.save(SERVICE, &worker_key(id), &json, &etag).await {
                Ok(_) => return Ok(rec),
                Err(ClientError::Status(s))
                    if s.code() == tonic::Code::Aborted && attempts < 20 =>
                {
                    attempts += 1;
                }
                Err(e) => return Err(client_error(e)),
            }
        }
    }

    async fn save(&self, r: &Record) -> Result<(), ApiError> {
        let json = serde_json::to_string(r).map_err(|e| ApiError::invalid(e.to_string()))?;
        self.api
            .save(SERVICE, &worker_key(&r.id), &json, "")
            .await
            .map_err(client_error)?;
        Ok(())
    }

    async fn index(&self) -> Result<(Vec<String>, String), ApiError> {
        match self
            .api
            .get(SERVICE, INDEX_KEY)
            .await
            .map_err(client_error)?
        {
            Some((v, etag)) => Ok((serde_json::from_str(&v).unwrap_or_default(), etag)),
            None => Ok((Vec::new(), String::new())),
        }
    }

    /// Adds or removes an id in the index (etag-guarded, retried).
    async fn update_index(&self, id: &str, add: bool) -> Result<(), ApiError> {
        for _ in 0..32 {
            let (mut ids, etag) = self.index().await?;
            let had = ids.iter().any(|x| x == id);
            if had == add {
                return Ok(());
            }
            if add {
                ids.push(id.to_owned());
            } else {
                ids.retain(|x| x != id);
            }
            let json = serde_json::to_string(&ids).map_err(|e| ApiError::invalid(e.to_string()))?;
            match self.api.save(SERVICE, INDEX_KEY, &json, &etag).await {
                Ok(_) => return Ok(()),
                Err(ClientError::Status(s)) if s.code() == tonic::Code::Aborted => continue,
                Err(e) => return Err(client_error(e)),
            }
        }
        Err(ApiError::new(
            tonic::Code::Aborted,
            "the worker index kept changing; try again",
        ))
    }

    async fn code(&self, id: &str, n: usize) -> Result<Vec<u8>, ApiError> {
        match self
            .api
            .get(SERVICE, &code_key(id, n))
            .await
            .map_err(client_error)?
        {
            Some((v, _)) => base64::engine::general_purpose::STANDARD
                .decode(v.as_bytes())
                .map_err(|e| {
                    ApiError::new(
                        tonic::Code::DataLoss,
                        format!("code of worker {id} is unreadable: {e}"),
                    )
                }),
            None => Err(ApiError::new(
                tonic::Code::DataLoss,
                format!("code version {n} of worker {id} is missing"),
            )),
        }
    }

    async fn store_code(&self, id: &str, n: usize, code: &[u8]) -> Result<(), ApiError> {
        let b64 = base64::engine::general_purpose::STANDARD.encode(code);
        self.api
            .save(SERVICE, &code_key(id, n), &b64, "")
            .await
            .map_err(client_error)?;
        Ok(())
    }

    /// Checks a code source and returns the code and how it was given.
    pub async fn check_code(
        &self,
        kind: Kind,
        content: &[u8],
        url: &str,
        sha256: &str,
    ) -> Result<(Vec<u8>, SourceKind), ApiError> {
        let (code, source) = if !url.is_empty() {
            let rules = self.config.source_rules();
            if let Some(path) = source::nix_path(url) {
                // sha256 is the NAR hash here, checked by read_nix.
                (
                    source::read_nix(&rules, path, sha256).await?,
                    SourceKind::Nix,
                )
            } else {
                (source::fetch_url(&rules, url).await?, SourceKind::Url)
            }
        } else {
            (content.to_vec(), SourceKind::Content)
        };
        if code.is_empty() {
            return Err(ApiError::invalid(match source {
                SourceKind::Content => {
                    "code_source is required: content (bytes) of the worker's code, or a url"
                        .to_owned()
                }
                _ => format!("the code at {url} is empty"),
            }));
        }
        if code.len() > self.config.max_code_bytes {
            return Err(ApiError::invalid(format!(
                "the code is {} bytes; the limit is {}",
                code.len(),
                self.config.max_code_bytes
            )));
        }
        if source != SourceKind::Nix
            && !sha256.is_empty()
            && !sha256.eq_ignore_ascii_case(&sha256_hex(&code))
        {
            return Err(ApiError::invalid(format!(
                "the code's SHA-256 is {}, not {sha256}",
                sha256_hex(&code)
            )));
        }
        match kind {
            Kind::Python if std::str::from_utf8(&code).is_err() => {
                return Err(ApiError::invalid("Python code must be UTF-8 text"));
            }
            Kind::Native if !code.starts_with(b"\x7fELF") => {
                return Err(ApiError::invalid(
                    "application/x-native-dll code must be an ELF shared library (.so) exporting Process and FreeResult",
                ));
            }
            _ => {}
        }
        Ok((code, source))
    }

    fn check_engine(&self, mime: &str) -> Result<Kind, ApiError> {
        match Kind::from_mime(mime) {
            Some(Kind::Python) => Ok(Kind::Python),
            Some(Kind::DotNetDll | Kind::CSharp) => Err(ApiError::failed_precondition(format!(
                "{mime} needs a .NET runtime (and, for text/x-csharp, the SDK); none is installed for this workmanager"
            ))),
            Some(Kind::Native) => {
                let host = self.config.worker_host_path();
                if host.is_file() {
                    Ok(Kind::Native)
                } else {
                    Err(ApiError::failed_precondition(format!(
                        "native workers run in virtufin-worker-host, which is not at {}; install it beside virtufin-workmanager or set VIRTUFIN_WORKER_HOST",
                        host.display()
                    )))
                }
            }
            None => Err(ApiError::invalid(format!(
                "unknown mime_type '{mime}': use text/x-python, application/x-native-dll, application/x-dotnet-dll or text/x-csharp"
            ))),
        }
    }

    /// The worker's limits: the settings, lowered by its `limits.*` tags.
    pub fn limits_of(&self, tags: &BTreeMap<String, String>) -> Result<Limits, ApiError> {
        let cfg = &self.config;
        let mut l = Limits {
            memory_mb: cfg.memory_limit_mb,
            event_timeout: cfg.event_timeout,
        };
        // `max` is the workmanager's setting: a tag may lower it, not raise it.
        let number = |key: &str, v: &str, max: u64, unit: &str| -> Result<u64, ApiError> {
            match v.trim().parse::<u64>() {
                Ok(n) if (1..=max).contains(&n) => Ok(n),
                _ => Err(ApiError::invalid(format!(
                    "tag '{key}' is '{v}': a whole number of {unit} from 1 to {max} (the workmanager's setting; raise that to allow more)"
                ))),
            }
        };
        for (k, v) in tags {
            match k.as_str() {
                LIMIT_MEMORY_TAG => {
                    let max = if cfg.memory_limit_mb == 0 {
                        u64::MAX
                    } else {
                        cfg.memory_limit_mb
                    };
                    l.memory_mb = number(k, v, max, "MiB")?;
                }
                LIMIT_TIMEOUT_TAG => {
                    let max = u64::try_from(cfg.event_timeout.as_millis()).unwrap_or(u64::MAX);
                    l.event_timeout = Duration::from_millis(number(k, v, max, "milliseconds")?);
                }
                other if other.starts_with("limits.") => {
                    return Err(ApiError::invalid(format!(
                        "unknown limit tag '{other}': use {LIMIT_MEMORY_TAG} or {LIMIT_TIMEOUT_TAG}"
                    )));
                }
                _ => {}
            }
        }
        Ok(l)
    }

    pub fn check_tags<'a>(
        tags: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Result<usize, ApiError> {
        let mut n = 0;
        for (k, v) in tags {
            n += 1;
            if k.is_empty() || k.chars().count() > MAX_TAG_KEY {
                return Err(ApiError::invalid(format!(
                    "tag key '{k}' must be 1-{MAX_TAG_KEY} characters"
                )));
            }
            if v.chars().count() > MAX_TAG_VALUE {
                return Err(ApiError::invalid(format!(
                    "tag '{k}' value is longer than {MAX_TAG_VALUE} characters"
                )));
            }
        }
        if n > MAX_TAGS {
            return Err(ApiError::invalid(format!(
                "{n} tags; the limit is {MAX_TAGS}"
            )));
        }
        Ok(n)
    }

    pub async fn create(&self, w: NewWorker, by: &Origin) -> Result<String, ApiError> {
        let NewWorker {
            content,
            url,
            sha256,
            mime_type,
            topic,
            group,
            config,
            tags,
        } = w;
        let (mime, topic, group) = (mime_type.as_str(), topic.as_str(), group.as_str());
        let kind = self.check_engine(mime)?;
        virtufin_common::validate::topic(topic)?;
        if !group.is_empty() {
            virtufin_common::validate::member("group", group)?;
        }
        Self::check_tags(tags.iter())?;
        self.limits_of(&tags.iter().map(|(k, v)| (k.clone(), v.clone())).collect())?;
        let (code, source) = self.check_code(kind, &content, &url, &sha256).await?;
        let id = uuid::Uuid::new_v4().to_string();
        let group = if group.is_empty() {
            id.clone()
        } else {
            group.to_owned()
        };
        let created_at = now_rfc3339();
        self.store_code(&id, 0, &code).await?;
        let rec = Record {
            id: id.clone(),
            mime_type: mime.to_owned(),
            language: kind.language().to_owned(),
            topic: topic.to_owned(),
            group,
            created_at: created_at.clone(),
            status: "stopped".into(),
            config: config.into_iter().collect(),
            tags: tags.into_iter().collect(),
            history: vec![(created_at, sha256_hex(&code))],
            instance_id: self.instance.clone(),
            instances: BTreeSet::new(),
        };
        self.save(&rec).await?;
        self.update_index(&id, true).await?;
        tracing::info!(target: "audit", caller = %by.caller, correlation_id = %by.correlation_id, worker = %id, mime_type = mime, source = source.as_str(), action = "create", "worker created");
        self.lifecycle("created", &id, &rec.group, &rec.topic, Map::new())
            .await;
        Ok(id)
    }

    pub async fn start(self: &Arc<Self>, id: &str, by: &Origin) -> Result<(), ApiError> {
        let (rec, _) = self.load(id).await?;
        let code = self.code(id, rec.history.len().saturating_sub(1)).await?;
        let spec = WorkerSpec {
            id: id.to_owned(),
            topic: rec.topic.clone(),
            group: rec.group.clone(),
            config: rec.config.clone().into_iter().collect(),
            kind: Kind::from_mime(&rec.mime_type).unwrap_or(Kind::Python),
            code,
            // Checked when the tags were set; a record from before limits
            // existed falls back to the settings.
            limits: self.limits_of(&rec.tags).unwrap_or(Limits {
                memory_mb: self.config.memory_limit_mb,
                event_timeout: self.config.event_timeout,
            }),
        };
        {
            // Check and insert under one lock: two concurrent starts must
            // not both spawn a runtime.
            let mut running = self.running.lock().await;
            if running.contains_key(id) {
                return Ok(());
            }
            running.insert(id.to_owned(), Running::start(self.clone(), spec));
        }
        let instance = self.instance.clone();
        let rec = self
            .modify(id, |r| {
                r.status = "running".into();
                r.instance_id = instance.clone();
                r.instances.insert(instance.clone());
            })
            .await?;
        tracing::info!(target: "audit", caller = %by.caller, correlation_id = %by.correlation_id, worker = %id, mime_type = %rec.mime_type, action = "start", "worker started");
        self.lifecycle("started", id, &rec.group, &rec.topic, Map::new())
            .await;
        Ok(())
    }

    /// Stops the worker on this instance; it stays "running" while another
    /// instance runs it.
    pub async fn stop(&self, id: &str, by: &Origin) -> Result<(), ApiError> {
        let (rec, _) = self.load(id).await?;
        let running = self.running.lock().await.remove(id);
        if let Some(r) = running {
            r.stop().await;
            self.lifecycle("stopped", id, &rec.group, &rec.topic, Map::new())
                .await;
        }
        let instance = self.instance.clone();
        let rec = self
            .modify(id, |r| {
                r.instances.remove(&instance);
                let others =
                    !r.instances.is_empty() || (r.status == "running" && r.instance_id != instance);
                if !others {
                    r.status = "stopped".into();
                }
            })
            .await?;
        tracing::info!(target: "audit", caller = %by.caller, correlation_id = %by.correlation_id, worker = %id, mime_type = %rec.mime_type, action = "stop", "worker stopped");
        Ok(())
    }

    pub async fn delete(&self, id: &str, by: &Origin) -> Result<(), ApiError> {
        let (rec, _) = self.load(id).await?;
        self.stop(id, by).await?;
        self.update_index(id, false).await?;
        for n in 0..rec.history.len() {
            let _ = self.api.delete(SERVICE, &code_key(id, n), "").await;
        }
        self.api
            .delete(SERVICE, &worker_key(id), "")
            .await
            .map_err(client_error)?;
        tracing::info!(target: "audit", caller = %by.caller, correlation_id = %by.correlation_id, worker = %id, mime_type = %rec.mime_type, action = "delete", "worker deleted");
        Ok(())
    }

    /// Hot swap: the new code is the current version; a running worker
    /// restarts on it.
    pub async fn load_code(
        self: &Arc<Self>,
        id: &str,
        content: &[u8],
        url: &str,
        sha256: &str,
        by: &Origin,
    ) -> Result<(), ApiError> {
        let (mut rec, _) = self.load(id).await?;
        let kind = Kind::from_mime(&rec.mime_type).unwrap_or(Kind::Python);
        let (code, source) = self.check_code(kind, content, url, sha256).await?;
        let n = rec.history.len();
        self.store_code(id, n, &code).await?;
        rec.history.push((now_rfc3339(), sha256_hex(&code)));
        self.save(&rec).await?;
        tracing::info!(target: "audit", caller = %by.caller, correlation_id = %by.correlation_id, worker = %id, mime_type = %rec.mime_type, source = source.as_str(), action = "load_code", version = n, "worker code replaced");
        let was_running = self.running.lock().await.remove(id);
        if let Some(r) = was_running {
            r.stop().await;
            self.start(id, by).await?;
        }
        Ok(())
    }

    pub async fn list(&self) -> Result<Vec<Record>, ApiError> {
        let (ids, _) = self.index().await?;
        let mut out = Vec::new();
        for id in ids {
            if let Ok((r, _)) = self.load(&id).await {
                out.push(r);
            }
        }
        Ok(out)
    }

    pub async fn history(&self, id: &str) -> Result<Vec<(String, Vec<u8>)>, ApiError> {
        let (rec, _) = self.load(id).await?;
        let mut out = Vec::new();
        for (n, (at, _)) in rec.history.iter().enumerate() {
            out.push((at.clone(), self.code(id, n).await?));
        }
        Ok(out)
    }

    pub async fn record(&self, id: &str) -> Result<Record, ApiError> {
        Ok(self.load(id).await?.0)
    }

    pub async fn set_tags(
        &self,
        id: &str,
        tags: HashMap<String, String>,
        by: &Origin,
    ) -> Result<(), ApiError> {
        let (mut rec, _) = self.load(id).await?;
        let mut merged = rec.tags.clone();
        merged.extend(tags);
        Self::check_tags(merged.iter())?;
        self.limits_of(&merged)?;
        rec.tags = merged;
        self.save(&rec).await?;
        tracing::info!(target: "audit", caller = %by.caller, correlation_id = %by.correlation_id, worker = %id, mime_type = %rec.mime_type, action = "set_tags", "worker tags changed");
        Ok(())
    }

    /// Restores and restarts the workers this instance owned, holding the
    /// recovery lease so that one instance recovers at a time.
    pub async fn recover(self: &Arc<Self>) -> Result<usize, ApiError> {
        self.recover_with(&virtufin_common::notify::StartupProgress::none())
            .await
    }

    /// [`Self::recover`], each worker started (and each wait for another
    /// instance's lease) a `progress` step: a recovery of many workers
    /// extends systemd's start timeout as it goes.
    pub async fn recover_with(
        self: &Arc<Self>,
        progress: &virtufin_common::notify::StartupProgress,
    ) -> Result<usize, ApiError> {
        let by = Origin::internal("recovery");
        let lease_etag = self.acquire_lease(progress).await?;
        // Both ends are logged so that operators (and the multi-host test)
        // can see from the journals that recoveries never overlapped.
        tracing::info!(holder = %self.instance, "recovery lease taken");
        let result = async {
            let mut n = 0;
            let mine: Vec<_> = self
                .list()
                .await?
                .into_iter()
                .filter(|rec| rec.runs_on(&self.instance))
                .collect();
            let total = mine.len();
            progress.step(&format!("recovering {total} worker(s)"));
            for rec in mine {
                if !self.running.lock().await.contains_key(&rec.id) {
                    self.start(&rec.id, &by).await?;
                    n += 1;
                    progress.step(&format!("recovering workers: {n}/{total} started"));
                }
            }
            Ok::<_, ApiError>(n)
        }
        .await;
        match self.api.delete(SERVICE, LEASE_KEY, &lease_etag).await {
            Ok(_) => tracing::info!(holder = %self.instance, "recovery lease released"),
            // It expires by itself (VIRTUFIN_WM_RECOVERY_LEASE).
            Err(e) => {
                tracing::warn!(holder = %self.instance, error = %e, "recovery lease not released")
            }
        }
        if let Ok(n) = &result {
            tracing::info!(recovered = n, "workers recovered");
        }
        result
    }

    async fn acquire_lease(
        &self,
        progress: &virtufin_common::notify::StartupProgress,
    ) -> Result<String, ApiError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let lease = Lease {
                holder: self.instance.clone(),
                expires_ms: now_ms() + self.config.recovery_lease.as_millis() as u64,
            };
            let json =
                serde_json::to_string(&lease).map_err(|e| ApiError::invalid(e.to_string()))?;
            let current = self
                .api
                .get(SERVICE, LEASE_KEY)
                .await
                .map_err(client_error)?;
            let free_etag = match &current {
                // Etag "0": create only, so two instances that both found
                // no lease cannot both take it.
                None => Some("0".to_owned()),
                Some((v, etag)) => match serde_json::from_str::<Lease>(v) {
                    Ok(l) if l.holder != self.instance && l.expires_ms > now_ms() => None,
                    _ => Some(etag.clone()),
                },
            };
            if let Some(etag) = free_etag {
                match self.api.save(SERVICE, LEASE_KEY, &json, &etag).await {
                    Ok(new_etag) => return Ok(new_etag),
                    Err(ClientError::Status(s)) if s.code() == tonic::Code::Aborted => {}
                    Err(e) => return Err(client_error(e)),
                }
            }
            if tokio::time::Instant::now() > deadline {
                return Err(ApiError::new(
                    tonic::Code::Aborted,
                    "another instance holds the recovery lease",
                ));
            }
            // Waiting for another instance's recovery is bounded by the
            // deadline above, so it may extend the start.
            progress.step("recovery: waiting for another instance's recovery lease");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Stops every worker (shutdown), leaving their records as they are so
    /// that a restart recovers them.
    pub async fn stop_all(&self) {
        let all: Vec<_> = self.running.lock().await.drain().collect();
        for (_, r) in all {
            r.stop().await;
        }
    }
}
