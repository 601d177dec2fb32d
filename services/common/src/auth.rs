//! API keys: named keys, compared in constant time, optionally bound to the
//! services whose state they may touch. With no key configured, auth is
//! off and every caller is "anonymous".
//!
//! Keys come from a file (`{"keys":[{"name","key","services":[..]}]}`,
//! JSON or YAML) and/or the environment in the original's naming:
//! `ApiAuth__Keys__<name>=<key>` and `ApiAuth__Services__<name>=a,b`.

use std::{collections::BTreeSet, path::Path, sync::Arc};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::ApiError;

/// The metadata key (gRPC) and header (HTTP) that carries an API key.
pub const API_KEY_HEADER: &str = "x-api-key";

const ENV_KEY_PREFIX: &str = "ApiAuth__Keys__";
const ENV_SERVICES_PREFIX: &str = "ApiAuth__Services__";

/// Why the key configuration was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum KeysError {
    #[error("cannot read the API keys file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("the API keys file {path} is not valid JSON or YAML: {reason}")]
    Parse { path: String, reason: String },
    #[error("API keys: {0}")]
    Invalid(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    /// Required: a file without it (or empty, as one being rewritten looks)
    /// is refused; no keys from the file is `{"keys": []}`. A YAML `keys:`
    /// with nothing after it (a file cut after its first line) is refused
    /// too.
    #[serde(deserialize_with = "list_not_null")]
    keys: Vec<KeyEntry>,
}

/// A list that must be there and not null (YAML reads `keys:` alone as null).
fn list_not_null<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<Vec<T>>::deserialize(d)?
        .ok_or_else(|| serde::de::Error::custom("`keys` is empty; for no keys write `keys: []`"))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    name: String,
    key: String,
    #[serde(default)]
    services: Option<Vec<String>>,
}

#[derive(Debug)]
struct Key {
    name: String,
    /// SHA-256 of the key: every comparison is over 32 bytes, whatever the
    /// key's length, so timing says nothing about it.
    digest: [u8; 32],
    services: Option<Arc<BTreeSet<String>>>,
}

/// The configured keys.
#[derive(Debug, Default)]
pub struct ApiKeys {
    keys: Vec<Key>,
}

/// Who is calling: a key's name, or "anonymous" when auth is off.
#[derive(Debug, Clone)]
pub struct Caller {
    name: Arc<str>,
    /// None = every service.
    services: Option<Arc<BTreeSet<String>>>,
}

impl Caller {
    pub fn anonymous() -> Self {
        Self {
            name: Arc::from("anonymous"),
            services: None,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this caller may touch `service`'s state.
    pub fn may_touch(&self, service: &str) -> bool {
        self.services.as_ref().is_none_or(|s| s.contains(service))
    }

    /// PERMISSION_DENIED unless this caller may touch `service`.
    pub fn require(&self, service: &str) -> Result<(), ApiError> {
        if self.may_touch(service) {
            Ok(())
        } else {
            Err(ApiError::new(
                tonic::Code::PermissionDenied,
                format!(
                    "API key '{}' is not allowed to use service '{service}' (it is bound to: {})",
                    self.name,
                    self.services
                        .as_ref()
                        .map(|s| s.iter().cloned().collect::<Vec<_>>().join(", "))
                        .unwrap_or_default()
                ),
            ))
        }
    }
}

fn digest(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

impl ApiKeys {
    /// Keys from `file` (if given) and the environment.
    pub fn load(file: Option<&Path>) -> Result<Self, KeysError> {
        let mut keys = Self::default();
        if let Some(path) = file {
            let shown = path.display().to_string();
            // Only a file that has stopped changing; empty is refused (a key
            // file read mid-rewrite must not turn auth off).
            let text = crate::file::read_settled(path).map_err(|e| KeysError::Read {
                path: shown.clone(),
                reason: e.reason(),
            })?;
            keys.add_text(&text, &shown)?;
        }
        keys.add_env(std::env::vars())?;
        Ok(keys)
    }

    /// Adds the keys of a keys file's text (`path` only names it). Empty
    /// text is refused: no keys is `{"keys": []}`.
    pub fn add_text(&mut self, text: &str, path: &str) -> Result<(), KeysError> {
        if text.trim().is_empty() {
            return Err(KeysError::Parse {
                path: path.to_owned(),
                reason: r#"the file is empty; for no keys from this file write {"keys": []}"#
                    .into(),
            });
        }
        let file: KeysFile = serde_norway::from_str(text).map_err(|e| KeysError::Parse {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        for e in file.keys {
            self.add(&e.name, &e.key, e.services)?;
        }
        Ok(())
    }

    /// Adds `ApiAuth__Keys__<name>` / `ApiAuth__Services__<name>` pairs.
    pub fn add_env(
        &mut self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), KeysError> {
        let vars: Vec<(String, String)> = vars.into_iter().collect();
        for (k, v) in &vars {
            let Some(name) = k.strip_prefix(ENV_KEY_PREFIX) else {
                continue;
            };
            let services = vars
                .iter()
                .find(|(k2, _)| k2.strip_prefix(ENV_SERVICES_PREFIX) == Some(name))
                .map(|(_, list)| {
                    list.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect()
                });
            self.add(name, v, services)?;
        }
        for (k, _) in &vars {
            if let Some(name) = k.strip_prefix(ENV_SERVICES_PREFIX)
                && !vars
                    .iter()
                    .any(|(k2, _)| k2.strip_prefix(ENV_KEY_PREFIX) == Some(name))
            {
                return Err(KeysError::Invalid(format!(
                    "{k} binds services to key '{name}', but {ENV_KEY_PREFIX}{name} is not set"
                )));
            }
        }
        Ok(())
    }

    fn add(
        &mut self,
        name: &str,
        key: &str,
        services: Option<Vec<String>>,
    ) -> Result<(), KeysError> {
        let key = key.trim();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(KeysError::Invalid(format!(
                "key name '{name}' must be letters, digits, '-', '_' or '.'"
            )));
        }
        if key.len() < 16 {
            return Err(KeysError::Invalid(format!(
                "key '{name}' is {} characters; use at least 16 (e.g. `openssl rand -hex 32`)",
                key.len()
            )));
        }
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(KeysError::Invalid(format!(
                "key '{name}' must be visible ASCII without spaces (it travels in a header)"
            )));
        }
        if self.keys.iter().any(|k| k.name == name) {
            return Err(KeysError::Invalid(format!(
                "key name '{name}' is used twice"
            )));
        }
        let d = digest(key.as_bytes());
        if self.keys.iter().any(|k| bool::from(k.digest.ct_eq(&d))) {
            return Err(KeysError::Invalid(format!(
                "key '{name}' has the same value as another key; each key must be distinct so the caller is known"
            )));
        }
        self.keys.push(Key {
            name: name.to_owned(),
            digest: d,
            services: services.map(|s| Arc::new(s.into_iter().collect())),
        });
        Ok(())
    }

    /// Whether any key is configured (auth is on).
    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    pub fn names(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.name.as_str()).collect()
    }

    /// The caller presenting `presented` (the header's value, if any):
    /// UNAUTHENTICATED when auth is on and the key is missing or wrong.
    pub fn authenticate(&self, presented: Option<&[u8]>) -> Result<Caller, ApiError> {
        if !self.enabled() {
            return Ok(Caller::anonymous());
        }
        let Some(presented) = presented.filter(|p| !p.is_empty()) else {
            return Err(ApiError::new(
                tonic::Code::Unauthenticated,
                format!("an API key is required: send it in the '{API_KEY_HEADER}' header"),
            ));
        };
        let d = digest(presented);
        // Compare against every key, without stopping at a match, so the
        // time taken does not say which key (or how many) matched.
        let mut found: Option<&Key> = None;
        for k in &self.keys {
            let eq = bool::from(k.digest.ct_eq(&d));
            if eq {
                found = Some(k);
            }
        }
        match found {
            Some(k) => Ok(Caller {
                name: Arc::from(k.name.as_str()),
                services: k.services.clone(),
            }),
            None => Err(ApiError::new(
                tonic::Code::Unauthenticated,
                format!("the API key in '{API_KEY_HEADER}' is not valid"),
            )),
        }
    }
}

/// The keys in force, replaceable while the service runs (a reload): each
/// call checks against the set current when it arrives.
#[derive(Debug, Clone, Default)]
pub struct SharedKeys(Arc<std::sync::RwLock<Arc<ApiKeys>>>);

impl SharedKeys {
    pub fn new(keys: ApiKeys) -> Self {
        Self(Arc::new(std::sync::RwLock::new(Arc::new(keys))))
    }

    /// The keys in force now.
    pub fn current(&self) -> Arc<ApiKeys> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Puts `keys` in force; returns the previous set.
    pub fn replace(&self, keys: ApiKeys) -> Arc<ApiKeys> {
        std::mem::replace(
            &mut *self.0.write().unwrap_or_else(|p| p.into_inner()),
            Arc::new(keys),
        )
    }
}

/// Checks `x-api-key` on each gRPC call and puts the [`Caller`] in the
/// request's extensions.
#[derive(Debug, Clone)]
pub struct GrpcAuth(pub SharedKeys);

impl tonic::service::Interceptor for GrpcAuth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let caller = self
            .0
            .current()
            .authenticate(req.metadata().get(API_KEY_HEADER).map(|v| v.as_bytes()))?;
        req.extensions_mut().insert(caller);
        Ok(req)
    }
}

/// The caller of a gRPC request that passed [`GrpcAuth`] (anonymous if the
/// service is not behind it).
pub fn caller_of<T>(req: &tonic::Request<T>) -> Caller {
    req.extensions()
        .get::<Caller>()
        .cloned()
        .unwrap_or_else(Caller::anonymous)
}

/// Axum middleware: the same check for REST routes (401 on failure).
pub async fn http_auth(
    axum::extract::State(keys): axum::extract::State<SharedKeys>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let keys = keys.current();
    match keys.authenticate(req.headers().get(API_KEY_HEADER).map(|v| v.as_bytes())) {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "0123456789abcdef0123";
    const K2: &str = "fedcba9876543210fedc";

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect()
    }

    #[test]
    fn off_without_keys() {
        let k = ApiKeys::default();
        assert!(!k.enabled());
        assert_eq!(k.authenticate(None).unwrap().name(), "anonymous");
    }

    #[test]
    fn names_the_caller_and_refuses_wrong_or_missing_keys() {
        let mut k = ApiKeys::default();
        k.add_env(env(&[
            ("ApiAuth__Keys__wsm", K1),
            ("ApiAuth__Services__wsm", "websocketmanager"),
            ("ApiAuth__Keys__ops", K2),
            ("PATH", "/bin"),
        ]))
        .unwrap();
        let wsm = k.authenticate(Some(K1.as_bytes())).unwrap();
        assert_eq!(wsm.name(), "wsm");
        assert!(wsm.may_touch("websocketmanager"));
        let e = wsm.require("workmanager").unwrap_err();
        assert_eq!(e.code, tonic::Code::PermissionDenied);
        assert!(
            k.authenticate(Some(K2.as_bytes()))
                .unwrap()
                .may_touch("anything")
        );
        for bad in [
            None,
            Some(&b""[..]),
            Some(&b"nope"[..]),
            Some(&K1.as_bytes()[..10]),
        ] {
            assert_eq!(
                k.authenticate(bad).unwrap_err().code,
                tonic::Code::Unauthenticated
            );
        }
    }

    #[test]
    fn refuses_bad_configuration() {
        let mut k = ApiKeys::default();
        assert!(k.add_env(env(&[("ApiAuth__Keys__a", "short")])).is_err());
        let mut k = ApiKeys::default();
        let e = k
            .add_env(env(&[("ApiAuth__Services__x", "a")]))
            .unwrap_err();
        assert!(e.to_string().contains("ApiAuth__Keys__x"), "{e}");
        let mut k = ApiKeys::default();
        let e = k
            .add_text(
                &format!(r#"{{"keys":[{{"name":"a","key":"{K1}"}},{{"name":"b","key":"{K1}"}}]}}"#),
                "keys.json",
            )
            .unwrap_err();
        assert!(e.to_string().contains("same value"), "{e}");
        let mut k = ApiKeys::default();
        k.add_text(
            &format!("keys:\n  - name: a\n    key: {K1}\n    services: [workmanager]\n"),
            "keys.yaml",
        )
        .unwrap();
        assert!(!k.authenticate(Some(K1.as_bytes())).unwrap().may_touch("x"));
    }
}
