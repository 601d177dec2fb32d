//! Input rules shared by every service (names, keys, topics, sizes), so a
//! topic the api would refuse is refused as early by the others. Every RPC
//! and REST route checks its input here before it touches anything.

use crate::error::ApiError;

/// Size and count limits (all documented in the README).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest state value, in bytes.
    pub max_value_bytes: usize,
    /// Largest event `data`, in bytes.
    pub max_event_bytes: usize,
    /// Most metadata entries on one publish.
    pub max_metadata_entries: usize,
    /// Most keys in one RegisterKeys call / registered per service.
    pub max_keys: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_value_bytes: 1024 * 1024,
            max_event_bytes: 4 * 1024 * 1024,
            max_metadata_entries: 64,
            max_keys: 10_000,
        }
    }
}

pub const MAX_NAME_LEN: usize = 128;
pub const MAX_KEY_LEN: usize = 512;
pub const MAX_TOPIC_LEN: usize = 256;

fn name_chars(s: &str, extra: &[char]) -> bool {
    s.chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') || extra.contains(&c))
}

fn starts_alnum(s: &str) -> bool {
    s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
}

/// A service name: `[A-Za-z0-9][A-Za-z0-9._-]*`, at most 128 characters.
pub fn service(s: &str) -> Result<(), ApiError> {
    if s.is_empty() {
        return Err(ApiError::invalid(
            "service is required: the name of the calling service's state (e.g. \"websocketmanager\")",
        ));
    }
    if s.len() > MAX_NAME_LEN || !starts_alnum(s) || !name_chars(s, &[]) {
        return Err(ApiError::invalid(format!(
            "invalid service '{}': use letters, digits, '.', '_' or '-', starting with a letter or digit, at most {MAX_NAME_LEN} characters",
            clip(s)
        )));
    }
    Ok(())
}

/// A state key: 1..=512 bytes, no control characters, no `||` (Dapr's
/// separator of app id and key).
pub fn key(k: &str) -> Result<(), ApiError> {
    if k.is_empty() {
        return Err(ApiError::invalid("key is required"));
    }
    if k.len() > MAX_KEY_LEN {
        return Err(ApiError::invalid(format!(
            "key is {} bytes long; the limit is {MAX_KEY_LEN}",
            k.len()
        )));
    }
    if k.chars().any(char::is_control) {
        return Err(ApiError::invalid(format!(
            "invalid key '{}': control characters are not allowed",
            clip(k).escape_debug()
        )));
    }
    if k.contains("||") {
        return Err(ApiError::invalid(format!(
            "invalid key '{}': '||' is reserved as the store's key separator",
            clip(k)
        )));
    }
    Ok(())
}

/// A topic: `[A-Za-z0-9][A-Za-z0-9._:/-]*`, at most 256 characters.
pub fn topic(t: &str) -> Result<(), ApiError> {
    if t.is_empty() {
        return Err(ApiError::invalid("topic is required"));
    }
    if t.len() > MAX_TOPIC_LEN || !starts_alnum(t) || !name_chars(t, &[':', '/']) {
        return Err(ApiError::invalid(format!(
            "invalid topic '{}': use letters, digits, '.', '_', '-', ':' or '/', starting with a letter or digit, at most {MAX_TOPIC_LEN} characters",
            clip(t)
        )));
    }
    Ok(())
}

/// A subscriber or group name: like a service name, plus ':'.
pub fn member(what: &str, s: &str) -> Result<(), ApiError> {
    if s.is_empty() {
        return Err(ApiError::invalid(format!("{what} is required")));
    }
    if s.len() > MAX_NAME_LEN || !starts_alnum(s) || !name_chars(s, &[':']) {
        return Err(ApiError::invalid(format!(
            "invalid {what} '{}': use letters, digits, '.', '_', '-' or ':', starting with a letter or digit, at most {MAX_NAME_LEN} characters",
            clip(s)
        )));
    }
    Ok(())
}

pub fn value_size(what: &str, len: usize, limit: usize) -> Result<(), ApiError> {
    if len > limit {
        return Err(ApiError::invalid(format!(
            "{what} is {len} bytes; the limit is {limit} bytes"
        )));
    }
    Ok(())
}

/// Shortens user input quoted back in messages.
pub fn clip(s: &str) -> String {
    if s.chars().count() <= 80 {
        s.to_owned()
    } else {
        format!("{}…", s.chars().take(80).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(service("websocketmanager").is_ok());
        assert!(service("work-manager.v2").is_ok());
        for bad in ["", "-x", "a b", "a/b", "ä", &"x".repeat(129)] {
            assert!(service(bad).is_err(), "{bad:?}");
        }
        assert!(topic("websocketmanager.connectionstatus").is_ok());
        assert!(topic("command/x:y").is_ok());
        for bad in ["", " t", "a b", "t\n", "*"] {
            assert!(topic(bad).is_err(), "{bad:?}");
        }
        assert!(key("workers/index").is_ok());
        assert!(key("with space ok").is_ok());
        for bad in ["", "a||b", "tab\there", &"k".repeat(513)] {
            assert!(key(bad).is_err(), "{bad:?}");
        }
        assert!(member("group", "smoke").is_ok());
        assert!(member("group", "").is_err());
    }

    #[test]
    fn messages_name_the_rule() {
        let e = service("a/b").unwrap_err();
        assert_eq!(e.code, tonic::Code::InvalidArgument);
        assert!(e.message.contains("'a/b'") && e.message.contains("letters"));
        let e = value_size("value", 10, 5).unwrap_err();
        assert!(e.message.contains("limit is 5"));
    }
}
