//! The State service: per-service keys with etags, the registry of keys
//! behind GetAllState, and `state-changes` events.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
};

use serde::Serialize;
use tonic::{Request, Response, Status};
use virtufin_common::auth::{Caller, caller_of};
use virtufin_proto::api::v1::{
    DeleteStateRequest, GetAllStateRequest, GetAllStateResponse, GetStateRequest, GetStateResponse,
    RegisterKeysRequest, SaveStateRequest, StatusResponse, state_server::State,
};
use virtufin_store::{StoreError, Versioned};

use crate::{
    App, cloudevent,
    error::{ApiError, StoreResultExt},
    validate::{self, Limits},
};

/// The topic every save and delete is announced on.
pub const STATE_CHANGES_TOPIC: &str = "state-changes";
/// The event source of `state-changes` events.
pub const SOURCE: &str = "urn:com.virtufin.api";

/// The payload of a `state-changes` event.
#[derive(Debug, Serialize)]
struct Change<'a> {
    service: &'a str,
    key: &'a str,
    action: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<&'a str>,
}

/// The store key of `key` in `service`'s state: `<service>/<key>`.
/// Service names cannot hold '/', so no two pairs share a store key.
pub fn store_key(service: &str, key: &str) -> String {
    format!("{service}/{key}")
}

/// Per service, how many registered keys this api remembers (beyond that
/// it asks the store again; registering is idempotent anyway).
const KNOWN_KEYS_CACHE: usize = 100_000;

/// The set of a service's registered keys. Service names start with a
/// letter or digit, so this can never be a user's key.
fn registry_key(service: &str) -> String {
    format!("__virtufin/registered-keys/{service}")
}

/// State operations shared by gRPC and REST.
#[derive(Clone)]
pub struct StateApi {
    app: Arc<App>,
    /// Keys known to be registered, per service (a cache: the registry in
    /// the store is the truth, and keys are never unregistered).
    known: Arc<Mutex<HashMap<String, HashSet<String>>>>,
}

impl StateApi {
    pub fn new(app: Arc<App>) -> Self {
        Self {
            app,
            known: Arc::default(),
        }
    }

    fn limits(&self) -> &Limits {
        &self.app.limits
    }

    pub async fn save(
        &self,
        caller: &Caller,
        service: &str,
        key: &str,
        value: &str,
        etag: &str,
        include_value: bool,
    ) -> Result<String, ApiError> {
        validate::service(service)?;
        validate::key(key)?;
        validate::value_size("value", value.len(), self.limits().max_value_bytes)?;
        caller.require(service)?;
        let backend = self.app.backend()?;
        let etag = (!etag.is_empty()).then_some(etag);
        let new_etag = backend
            .state
            .set(&store_key(service, key), value, etag)
            .await
            .map_err(|e| etag_error(e, service, key))?;
        tracing::info!(target: "audit", caller = caller.name(), service, key, etag = %new_etag, action = "save", "state saved");
        if let Err(e) = self.add_keys(service, &[key.to_owned()]).await {
            tracing::warn!(service, key, error = %e, "saved, but could not register the key");
        }
        self.announce(service, key, "save", include_value.then_some(value))
            .await;
        Ok(new_etag)
    }

    pub async fn get(
        &self,
        caller: &Caller,
        service: &str,
        key: &str,
    ) -> Result<Option<Versioned>, ApiError> {
        validate::service(service)?;
        validate::key(key)?;
        caller.require(service)?;
        let backend = self.app.backend()?;
        backend.state.get(&store_key(service, key)).await.api()
    }

    pub async fn delete(
        &self,
        caller: &Caller,
        service: &str,
        key: &str,
        etag: &str,
        include_value: bool,
    ) -> Result<bool, ApiError> {
        validate::service(service)?;
        validate::key(key)?;
        caller.require(service)?;
        let backend = self.app.backend()?;
        let sk = store_key(service, key);
        let old = if include_value {
            backend.state.get(&sk).await.api()?.map(|v| v.value)
        } else {
            None
        };
        let etag = (!etag.is_empty()).then_some(etag);
        let deleted = backend
            .state
            .delete(&sk, etag)
            .await
            .map_err(|e| etag_error(e, service, key))?;
        tracing::info!(target: "audit", caller = caller.name(), service, key, deleted, action = "delete", "state deleted");
        if deleted {
            self.announce(service, key, "delete", old.as_deref()).await;
        }
        Ok(deleted)
    }

    /// Every registered key of `service` that holds a value.
    pub async fn get_all(
        &self,
        caller: &Caller,
        service: &str,
    ) -> Result<HashMap<String, String>, ApiError> {
        validate::service(service)?;
        caller.require(service)?;
        let backend = self.app.backend()?;
        let mut keys = self.registered(service).await?;
        keys.sort();
        let mut out = HashMap::new();
        for chunk in keys.chunks(500) {
            let store_keys: Vec<String> = chunk.iter().map(|k| store_key(service, k)).collect();
            let values = backend.state.get_many(&store_keys).await.api()?;
            for (k, v) in chunk.iter().zip(values) {
                if let Some(v) = v {
                    out.insert(k.clone(), v.value);
                }
            }
        }
        Ok(out)
    }

    /// Adds keys to the service's registry (idempotent).
    pub async fn register(
        &self,
        caller: &Caller,
        service: &str,
        keys: &[String],
    ) -> Result<usize, ApiError> {
        validate::service(service)?;
        caller.require(service)?;
        let added = self.add_keys(service, keys).await?;
        tracing::info!(target: "audit", caller = caller.name(), service, keys = keys.len(), added, action = "register_keys", "keys registered");
        Ok(added)
    }

    async fn add_keys(&self, service: &str, keys: &[String]) -> Result<usize, ApiError> {
        if keys.len() > self.limits().max_keys {
            return Err(ApiError::invalid(format!(
                "{} keys in one call; the limit is {}",
                keys.len(),
                self.limits().max_keys
            )));
        }
        for k in keys {
            validate::key(k)?;
        }
        let missing: Vec<String> = {
            let known = self.known.lock().unwrap_or_else(|p| p.into_inner());
            let set = known.get(service);
            keys.iter()
                .filter(|k| set.is_none_or(|s| !s.contains(*k)))
                .cloned()
                .collect()
        };
        if missing.is_empty() {
            return Ok(0);
        }
        let backend = self.app.backend()?;
        let added = backend
            .state
            .set_add(&registry_key(service), &missing)
            .await
            .api()?;
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        let set = known.entry(service.to_owned()).or_default();
        // Only a shortcut past the store's idempotent add: keep it bounded.
        if set.len() + missing.len() > KNOWN_KEYS_CACHE {
            set.clear();
        }
        set.extend(missing);
        Ok(added)
    }

    /// The service's registered keys.
    async fn registered(&self, service: &str) -> Result<Vec<String>, ApiError> {
        let backend = self.app.backend()?;
        backend
            .state
            .set_members(&registry_key(service))
            .await
            .api()
    }

    /// Publishes a `state-changes` event. The write already succeeded, so a
    /// failure here is logged, not returned.
    async fn announce(&self, service: &str, key: &str, action: &str, value: Option<&str>) {
        let change = Change {
            service,
            key,
            action,
            value,
        };
        let Ok(data) = serde_json::to_string(&change) else {
            return;
        };
        let mut md = HashMap::new();
        md.insert("ce-source".to_owned(), SOURCE.to_owned());
        md.insert(
            "ce-type".to_owned(),
            format!("com.virtufin.api.state.{action}"),
        );
        md.insert(
            "ce-datacontenttype".to_owned(),
            "application/json".to_owned(),
        );
        let built = cloudevent::build(
            STATE_CHANGES_TOPIC,
            &data,
            &md,
            &self.app.event_defaults,
            64,
            // The write's call (its span), when there is one.
            &virtufin_common::trace::current()
                .unwrap_or_else(virtufin_common::trace::TraceContext::new_root),
        );
        match (built, self.app.backend()) {
            (Ok((_, bytes)), Ok(b)) => {
                if let Err(e) = b.pubsub.publish(STATE_CHANGES_TOPIC, &bytes).await {
                    tracing::warn!(service, key, error = %e, "could not publish the state change");
                }
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(service, key, error = %e, "could not publish the state change")
            }
        }
    }
}

fn etag_error(e: StoreError, service: &str, key: &str) -> ApiError {
    match e {
        StoreError::EtagMismatch { .. } => ApiError {
            code: tonic::Code::Aborted,
            message: format!(
                "etag mismatch for {service}/{key}: the value changed (or is gone) since you read it; read it again and retry"
            ),
        },
        other => crate::error::store(other),
    }
}

fn ok(message: String, etag: String) -> StatusResponse {
    StatusResponse {
        success: true,
        status: "OK".into(),
        message,
        etag,
    }
}

/// The gRPC face of [`StateApi`].
#[derive(Clone)]
pub struct StateService(pub StateApi);

#[tonic::async_trait]
impl State for StateService {
    async fn save_state(
        &self,
        req: Request<SaveStateRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let caller = caller_of(&req);
        let r = req.into_inner();
        let etag = self
            .0
            .save(
                &caller,
                &r.service,
                &r.key,
                &r.value,
                &r.etag,
                r.include_value,
            )
            .await?;
        Ok(Response::new(ok(
            format!("State saved for {}/{}", r.service, r.key),
            etag,
        )))
    }

    async fn get_state(
        &self,
        req: Request<GetStateRequest>,
    ) -> Result<Response<GetStateResponse>, Status> {
        let caller = caller_of(&req);
        let r = req.into_inner();
        // A missing key answers an empty value and etag, as the original
        // api did; a stored value always has a non-empty etag.
        let v = self.0.get(&caller, &r.service, &r.key).await?;
        let (value, etag) = v.map(|v| (v.value, v.etag)).unwrap_or_default();
        Ok(Response::new(GetStateResponse {
            key: r.key,
            value,
            etag,
        }))
    }

    async fn get_all_state(
        &self,
        req: Request<GetAllStateRequest>,
    ) -> Result<Response<GetAllStateResponse>, Status> {
        let caller = caller_of(&req);
        let r = req.into_inner();
        let values = self.0.get_all(&caller, &r.service).await?;
        Ok(Response::new(GetAllStateResponse { values }))
    }

    async fn register_keys(
        &self,
        req: Request<RegisterKeysRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let caller = caller_of(&req);
        let r = req.into_inner();
        let added = self.0.register(&caller, &r.service, &r.keys).await?;
        Ok(Response::new(ok(
            format!("{added} new key(s) registered for {}", r.service),
            String::new(),
        )))
    }

    async fn delete_state(
        &self,
        req: Request<DeleteStateRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let caller = caller_of(&req);
        let r = req.into_inner();
        let deleted = self
            .0
            .delete(&caller, &r.service, &r.key, &r.etag, r.include_value)
            .await?;
        // Deleting nothing is not an error (deletes are idempotent); the
        // status string says which case it was.
        let (status, message) = if deleted {
            ("OK", format!("State deleted for {}/{}", r.service, r.key))
        } else {
            (
                "NOT_FOUND",
                format!("No state was stored for {}/{}", r.service, r.key),
            )
        };
        Ok(Response::new(StatusResponse {
            success: true,
            status: status.into(),
            message,
            etag: String::new(),
        }))
    }
}
