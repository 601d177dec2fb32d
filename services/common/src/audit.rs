//! Who asked for a change, for audit lines: the caller (an API key's name,
//! as the api's Gateway passes it on after checking the key) and a
//! correlation id that ties the api's audit line to the backend's.

/// The header naming the caller (set by the api's Gateway).
pub const CALLER_HEADER: &str = "x-virtufin-caller";
/// The header carrying a request's correlation id.
pub const CORRELATION_HEADER: &str = "x-correlation-id";

/// The origin of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// An API key's name, "local" for a direct call, or the name of an
    /// internal task ("recovery").
    pub caller: String,
    pub correlation_id: String,
}

/// A header value fit for a log field: visible ASCII, bounded.
fn clean(v: Option<&[u8]>, max: usize) -> Option<String> {
    let v = v?;
    let ok = !v.is_empty() && v.len() <= max && v.iter().all(u8::is_ascii_graphic);
    ok.then(|| String::from_utf8_lossy(v).into_owned())
}

impl Origin {
    fn from_values(caller: Option<&[u8]>, correlation: Option<&[u8]>) -> Self {
        Self {
            caller: clean(caller, 64).unwrap_or_else(|| "local".into()),
            correlation_id: clean(correlation, 128)
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        }
    }

    /// From a gRPC request's metadata.
    pub fn of<T>(req: &tonic::Request<T>) -> Self {
        let md = req.metadata();
        Self::from_values(
            md.get(CALLER_HEADER).map(|v| v.as_bytes()),
            md.get(CORRELATION_HEADER).map(|v| v.as_bytes()),
        )
    }

    /// From an HTTP request's headers.
    pub fn of_headers(h: &http::HeaderMap) -> Self {
        Self::from_values(
            h.get(CALLER_HEADER).map(|v| v.as_bytes()),
            h.get(CORRELATION_HEADER).map(|v| v.as_bytes()),
        )
    }

    /// A change made by the service itself.
    pub fn internal(task: &str) -> Self {
        Self {
            caller: task.to_owned(),
            correlation_id: uuid::Uuid::new_v4().to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_clean_headers_and_fills_in_the_rest() {
        let o = Origin::from_values(Some(b"ops"), Some(b"abc-1"));
        assert_eq!(
            (o.caller.as_str(), o.correlation_id.as_str()),
            ("ops", "abc-1")
        );
        let o = Origin::from_values(None, Some(b"has space"));
        assert_eq!(o.caller, "local");
        assert_eq!(
            o.correlation_id.len(),
            36,
            "a fresh UUID for an unusable id"
        );
        let long = vec![b'a'; 65];
        assert_eq!(Origin::from_values(Some(&long), None).caller, "local");
    }
}
