//! The services file: which backends the Gateway may call and how.
//!
//! JSON (the original's format) or YAML, chosen by content — YAML is a
//! superset of JSON, so one parser reads both. Field names are the
//! original's camelCase; fields we do not use (other sections of the
//! original's file) are ignored so that its files load unchanged.

use std::{collections::HashSet, path::Path, time::Duration};

use serde::Deserialize;

/// Why a services file was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{path} is not valid JSON or YAML: {reason}")]
    Parse { path: String, reason: String },
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct ServicesFile {
    /// Required: a file without it (or an empty file, as one being
    /// rewritten looks) is refused, never taken as "no backends"; no
    /// backends is `{"services": []}`. A YAML `services:` with nothing
    /// after it (a file cut after its first line) is refused too.
    #[serde(deserialize_with = "list_not_null")]
    pub services: Vec<ServiceConfig>,
}

/// A list that must be there and not null (YAML reads `key:` alone as null).
fn list_not_null<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<Vec<T>>::deserialize(d)?.ok_or_else(|| {
        serde::de::Error::custom("`services` is empty; for no backends write `services: []`")
    })
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceConfig {
    pub name: String,
    pub grpc: Option<GrpcConfig>,
    #[serde(default)]
    pub state: Option<StateConfig>,
    #[serde(default)]
    pub pubsub: Option<PubsubConfig>,
    #[serde(default)]
    pub resilience: Resilience,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GrpcConfig {
    pub host: String,
    pub port: u16,
    #[serde(default = "yes")]
    pub reflection_enabled: bool,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StateConfig {
    #[serde(default)]
    pub store_name: String,
    #[serde(default)]
    pub keys: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PubsubConfig {
    #[serde(default)]
    pub pubsub_name: String,
}

/// How calls to one backend are protected.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct Resilience {
    /// Deadline of one call (a caller may ask for less or more).
    pub timeout_ms: u64,
    /// Extra attempts for calls that are safe to retry.
    pub retries: u32,
    /// First backoff between attempts; doubles each time.
    pub retry_backoff_ms: u64,
    /// Methods safe to retry besides those the backend's descriptors mark
    /// idempotent: exact names ("GetTag"), "Service/Method", or a prefix
    /// ending in '*' ("List*").
    pub retry_methods: Vec<String>,
    /// Consecutive failures (unavailable, deadline exceeded, internal) that
    /// open the circuit.
    pub breaker_failures: u32,
    /// How long an open circuit refuses calls before one trial call.
    pub breaker_cooldown_ms: u64,
}

impl Default for Resilience {
    fn default() -> Self {
        Self {
            timeout_ms: 10_000,
            retries: 2,
            retry_backoff_ms: 100,
            retry_methods: Vec::new(),
            breaker_failures: 5,
            breaker_cooldown_ms: 30_000,
        }
    }
}

impl Resilience {
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    pub fn backoff(&self) -> Duration {
        Duration::from_millis(self.retry_backoff_ms)
    }

    pub fn cooldown(&self) -> Duration {
        Duration::from_millis(self.breaker_cooldown_ms)
    }

    /// Whether `service/method` is listed as safe to retry.
    pub fn listed_safe(&self, service: &str, method: &str) -> bool {
        let short = service.rsplit('.').next().unwrap_or(service);
        let candidates = [
            method.to_owned(),
            format!("{short}/{method}"),
            format!("{service}/{method}"),
        ];
        self.retry_methods
            .iter()
            .any(|pat| match pat.strip_suffix('*') {
                Some(prefix) => candidates.iter().any(|c| c.starts_with(prefix)),
                None => candidates.iter().any(|c| c == pat),
            })
    }
}

fn yes() -> bool {
    true
}

/// Reads (once it has stopped changing, see
/// [`virtufin_common::file::read_settled`]) and checks a services file.
pub fn load(path: &Path) -> Result<ServicesFile, ConfigError> {
    parse(&read(path)?, &path.display().to_string())
}

/// The services file's text once it has stopped changing; empty is an error.
pub fn read(path: &Path) -> Result<String, ConfigError> {
    virtufin_common::file::read_settled(path).map_err(|e| ConfigError::Read {
        path: path.display().to_string(),
        reason: e.reason(),
    })
}

/// Parses and checks the text of a services file (`path` only names it in
/// errors).
pub fn parse(text: &str, path: &str) -> Result<ServicesFile, ConfigError> {
    // Empty is what a file being rewritten in place looks like: refused,
    // so the last good configuration stays. No backends is spelled out.
    if text.trim().is_empty() {
        return Err(ConfigError::Parse {
            path: path.to_owned(),
            reason: r#"the file is empty; for no backends write {"services": []}"#.into(),
        });
    }
    let file: ServicesFile = serde_norway::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    validate(&file).map_err(|reason| ConfigError::Invalid {
        path: path.to_owned(),
        reason,
    })?;
    Ok(file)
}

fn validate(file: &ServicesFile) -> Result<(), String> {
    let mut seen = HashSet::new();
    for (i, s) in file.services.iter().enumerate() {
        let at = format!("services[{i}]");
        if s.name.is_empty()
            || s.name.len() > 64
            || !s
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(format!(
                "{at}: name '{}' must be 1-64 characters of letters, digits, '-', '_' or '.'",
                s.name
            ));
        }
        if !seen.insert(s.name.as_str()) {
            return Err(format!("{at}: service '{}' is listed twice", s.name));
        }
        if let Some(g) = &s.grpc {
            if g.host.trim().is_empty() {
                return Err(format!("{at} ({}): grpc.host is empty", s.name));
            }
            if g.port == 0 {
                return Err(format!("{at} ({}): grpc.port must be 1-65535", s.name));
            }
        }
        let r = &s.resilience;
        if r.timeout_ms == 0 {
            return Err(format!(
                "{at} ({}): resilience.timeoutMs must be positive",
                s.name
            ));
        }
        if r.retries > 10 {
            return Err(format!(
                "{at} ({}): resilience.retries is {}; at most 10",
                s.name, r.retries
            ));
        }
        if r.breaker_failures == 0 {
            return Err(format!(
                "{at} ({}): resilience.breakerFailures must be positive",
                s.name
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_originals_json_and_yaml() {
        let json = r#"{"services":[{"name":"workmanager","grpc":{"host":"wm","port":5102,"reflectionEnabled":true},
            "state":{"storeName":"statestore","keys":["a"]},"pubsub":{"pubsubName":"pubsub"},"http":{"port":1}}]}"#;
        let f = parse(json, "s.json").unwrap();
        assert_eq!(f.services[0].grpc.as_ref().unwrap().port, 5102);
        assert_eq!(f.services[0].state.as_ref().unwrap().keys, vec!["a"]);
        let yaml = "services:\n  - name: wsm\n    grpc: {host: localhost, port: 5202}\n    resilience: {retries: 0, retryMethods: ['List*']}\n";
        let f = parse(yaml, "s.yaml").unwrap();
        let s = &f.services[0];
        assert!(s.grpc.as_ref().unwrap().reflection_enabled);
        assert_eq!(s.resilience.retries, 0);
        assert_eq!(s.resilience.timeout_ms, 10_000);
        assert!(s.resilience.listed_safe("pkg.WebSocketManager", "List"));
        assert!(!s.resilience.listed_safe("pkg.WebSocketManager", "Connect"));
    }

    #[test]
    fn refuses_broken_files_with_the_reason() {
        let e = parse("{\"services\": [", "s.json").unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }), "{e}");
        let e = parse(
            r#"{"services":[{"name":"a","grpc":{"host":"h","port":1}},{"name":"a"}]}"#,
            "s.json",
        )
        .unwrap_err();
        assert!(e.to_string().contains("listed twice"), "{e}");
        let e = parse(r#"{"services":[{"name":"a b"}]}"#, "s.json").unwrap_err();
        assert!(e.to_string().contains("name 'a b'"), "{e}");
        let e = parse(
            r#"{"services":[{"name":"a","grpc":{"host":"h","port":70000}}]}"#,
            "s.json",
        )
        .unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }), "{e}");
    }

    /// An empty file is what a reload sees mid-rewrite (`cat > f`,
    /// `std::fs::write`): it must be refused, not taken as no backends.
    /// No backends is spelled out.
    #[test]
    fn an_empty_file_is_refused_and_no_backends_is_spelled_out() {
        for text in [
            "",
            "\n",
            "  \n\t",
            "# only a comment\n",
            "{}",
            "other: 1\n",
            "services:\n",
            "services: ~\n",
            r#"{"services": null}"#,
        ] {
            let e = parse(text, "s.yaml").unwrap_err();
            assert!(matches!(e, ConfigError::Parse { .. }), "{text:?}: {e}");
        }
        let e = parse("", "s.json").unwrap_err();
        assert!(e.to_string().contains(r#"{"services": []}"#), "{e}");
        assert!(
            parse(r#"{"services": []}"#, "s.json")
                .unwrap()
                .services
                .is_empty()
        );
        assert!(
            parse("services: []\n", "s.yaml")
                .unwrap()
                .services
                .is_empty()
        );
    }
}
