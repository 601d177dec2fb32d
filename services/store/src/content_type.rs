//! How a CloudEvent in JSON carries its payload, by content type — Dapr's
//! rules (dapr/components-contrib `contenttype`, and daprd's
//! `GRPCEnvelopeFromSubscriptionMessage`), so that an event written by any
//! backend reaches a Dapr subscriber with its data, and one written by Dapr
//! reads back here unchanged:
//! - `application/json` and `application/cloudevents+json` (parameters
//!   allowed): the JSON value itself in `data`;
//! - `text/*` and `application/xml`: a string in `data`;
//! - anything else (`application/octet-stream`, `application/ld+json`,
//!   ...): the bytes base64-encoded in `data_base64` — daprd hands a
//!   subscriber empty data for a `data` field of any other type.
//!
//! Like Dapr, the media type is compared lowercased and untrimmed.

/// Where and how the payload travels in the envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataEncoding {
    /// `data` holds the JSON value.
    Json,
    /// `data` holds a string.
    Text,
    /// `data_base64` holds the bytes.
    Base64,
}

fn media_type(content_type: &str) -> String {
    let lower = content_type.to_ascii_lowercase();
    match lower.find(';') {
        Some(i) => lower[..i].to_owned(),
        None => lower,
    }
}

/// The encoding Dapr expects for `content_type`.
pub fn encoding(content_type: &str) -> DataEncoding {
    let media = media_type(content_type);
    if media == "application/json" || media == "application/cloudevents+json" {
        DataEncoding::Json
    } else if media.starts_with("text/") || media == "application/xml" {
        DataEncoding::Text
    } else {
        DataEncoding::Base64
    }
}

/// Whether a publisher that names `content_type` claims JSON data (also
/// `text/json` and `+json` suffixes, which Dapr carries as text or bytes):
/// such data must parse as JSON.
pub fn claims_json(content_type: &str) -> bool {
    let media = media_type(content_type);
    let media = media.trim();
    media == "application/json" || media == "text/json" || media.ends_with("+json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_daprs_content_type_rules() {
        use DataEncoding::*;
        for (ct, want) in [
            ("application/json", Json),
            ("Application/JSON; charset=utf-8", Json),
            ("application/cloudevents+json", Json),
            ("text/plain", Text),
            ("text/json", Text),
            ("TEXT/csv", Text),
            ("application/xml", Text),
            ("application/octet-stream", Base64),
            ("application/ld+json", Base64),
            ("application/json ; charset=utf-8", Base64),
            ("", Base64),
        ] {
            assert_eq!(encoding(ct), want, "{ct}");
        }
        assert!(claims_json("application/vnd.api+json"));
        assert!(claims_json("text/json; charset=utf-8"));
        assert!(!claims_json("text/plain"));
    }
}
