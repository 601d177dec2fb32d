//! CloudEvents 1.0 in JSON (structured mode), as Dapr stores them: built
//! from `PublishEvent`'s `ce-*` metadata, and turned back into
//! `TopicEventRequest` for subscribers.

use std::{collections::HashMap, time::SystemTime};

use base64::Engine;
use serde_json::{Map, Value};
use virtufin_proto::api::v1::TopicEventRequest;
use virtufin_store::content_type::{self, DataEncoding};

use virtufin_common::trace::TraceContext;

use crate::{error::ApiError, validate};

/// Attributes with a field of their own in `TopicEventRequest` or that
/// carry the payload; everything else becomes an extension.
const CORE: &[&str] = &[
    "id",
    "source",
    "type",
    "specversion",
    "datacontenttype",
    "topic",
    "pubsubname",
    "data",
    "data_base64",
];

/// Defaults for attributes a publisher leaves out (Dapr's, so that
/// consumers written for Dapr see what they expect).
#[derive(Debug, Clone)]
pub struct Defaults {
    pub source: String,
    pub event_type: String,
    pub pubsub_name: String,
}

impl Default for Defaults {
    fn default() -> Self {
        Self {
            source: "virtufin-api".into(),
            event_type: "com.dapr.event.sent".into(),
            pubsub_name: "pubsub".into(),
        }
    }
}

/// Builds the envelope for `PublishEvent{topic, data, metadata}`. Missing
/// id, time and specversion are filled; `ce-<name>` other than the core
/// attributes becomes the extension `<name>`; other metadata is ignored.
///
/// `trace` is the api's span for the call: the event's `traceparent` names
/// it (and `tracestate` is the call's), unless the publisher gave a valid
/// `ce-traceparent` — then the event keeps that one and its
/// `ce-tracestate` unchanged: the publisher said where the event belongs.
/// An invalid `ce-traceparent` is replaced (logged at debug), never
/// refused.
pub fn build(
    topic: &str,
    data: &str,
    metadata: &HashMap<String, String>,
    defaults: &Defaults,
    max_entries: usize,
    trace: &TraceContext,
) -> Result<(String, Vec<u8>), ApiError> {
    if metadata.len() > max_entries {
        return Err(ApiError::invalid(format!(
            "{} metadata entries; the limit is {max_entries}",
            metadata.len()
        )));
    }
    let mut attrs: Map<String, Value> = Map::new();
    for (k, v) in metadata {
        // The prefix in either case; the name as given: it must already be
        // lowercase, so `ce-id` and `ce-ID` cannot both claim `id`.
        let Some(name) = k
            .get(..3)
            .filter(|p| p.eq_ignore_ascii_case("ce-"))
            .map(|_| &k[3..])
        else {
            continue;
        };
        let name = name.to_owned();
        if name.is_empty()
            || name.len() > 20
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        {
            return Err(ApiError::invalid(format!(
                "metadata '{}': a CloudEvent attribute name after 'ce-' must be 1-20 lowercase letters or digits",
                validate::clip(k)
            )));
        }
        if attrs.contains_key(&name) {
            return Err(ApiError::invalid(format!(
                "metadata '{}': the attribute '{name}' is given twice (prefixes differing in case)",
                validate::clip(k)
            )));
        }
        if matches!(name.as_str(), "data" | "topic" | "pubsubname") {
            return Err(ApiError::invalid(format!(
                "metadata '{k}': '{name}' is set by the api, not by the publisher"
            )));
        }
        if v.len() > 4096 {
            return Err(ApiError::invalid(format!(
                "metadata '{k}' is {} bytes; the limit is 4096",
                v.len()
            )));
        }
        attrs.insert(name, Value::String(v.clone()));
    }
    let get = |a: &Map<String, Value>, k: &str| a.get(k).and_then(Value::as_str).map(str::to_owned);
    match get(&attrs, "specversion").as_deref() {
        None => {
            attrs.insert("specversion".into(), "1.0".into());
        }
        Some("1.0") => {}
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "ce-specversion '{}' is not supported; only 1.0",
                validate::clip(other)
            )));
        }
    }
    let id = match get(&attrs, "id") {
        Some(id) if !id.is_empty() => id,
        Some(_) => return Err(ApiError::invalid("ce-id must not be empty when given")),
        None => {
            let id = uuid::Uuid::new_v4().to_string();
            attrs.insert("id".into(), Value::String(id.clone()));
            id
        }
    };
    match get(&attrs, "time") {
        Some(t) => {
            humantime::parse_rfc3339_weak(&t).map_err(|e| {
                ApiError::invalid(format!(
                    "ce-time '{}' is not an RFC 3339 timestamp: {e}",
                    validate::clip(&t)
                ))
            })?;
        }
        None => {
            let now = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
            attrs.insert("time".into(), Value::String(now));
        }
    }
    if get(&attrs, "source").is_none_or(|s| s.is_empty()) {
        attrs.insert("source".into(), Value::String(defaults.source.clone()));
    }
    if get(&attrs, "type").is_none_or(|s| s.is_empty()) {
        attrs.insert("type".into(), Value::String(defaults.event_type.clone()));
    }
    let given = get(&attrs, "traceparent");
    let keep = match given.as_deref() {
        None => false,
        Some(tp) => match TraceContext::parse(tp, None) {
            Ok(_) => true,
            Err(e) => {
                tracing::debug!(traceparent = %validate::clip(tp), error = %e, "the event's invalid traceparent is replaced by the api's");
                false
            }
        },
    };
    if !keep {
        attrs.insert("traceparent".into(), Value::String(trace.to_header()));
        match &trace.tracestate {
            Some(ts) => attrs.insert("tracestate".into(), Value::String(ts.clone())),
            None => attrs.remove("tracestate"),
        };
    }
    // daprd replaces `traceparent` with its own trace unless `traceid` is
    // present; Dapr's envelopes carry both with the same value.
    if let Some(tp) = get(&attrs, "traceparent")
        && !attrs.contains_key("traceid")
    {
        attrs.insert("traceid".into(), Value::String(tp));
    }
    // The payload, where Dapr expects it for the content type (see
    // virtufin_store::content_type).
    let content_type = match get(&attrs, "datacontenttype") {
        Some(ct) => {
            if content_type::claims_json(&ct)
                && let Err(e) = serde_json::from_str::<Value>(data)
            {
                return Err(ApiError::invalid(format!(
                    "data is not valid JSON but ce-datacontenttype is '{}': {e}",
                    validate::clip(&ct)
                )));
            }
            ct
        }
        None => {
            let ct = if !data.trim().is_empty() && serde_json::from_str::<Value>(data).is_ok() {
                "application/json"
            } else {
                "text/plain"
            };
            attrs.insert("datacontenttype".into(), ct.into());
            ct.to_owned()
        }
    };
    match content_type::encoding(&content_type) {
        DataEncoding::Json => {
            let v = serde_json::from_str::<Value>(data).map_err(|e| {
                ApiError::invalid(format!(
                    "data is not valid JSON but ce-datacontenttype is '{}': {e}",
                    validate::clip(&content_type)
                ))
            })?;
            attrs.insert("data".into(), v);
        }
        DataEncoding::Text => {
            attrs.insert("data".into(), Value::String(data.to_owned()));
        }
        DataEncoding::Base64 => {
            let b64 = base64::engine::general_purpose::STANDARD.encode(data.as_bytes());
            attrs.insert("data_base64".into(), Value::String(b64));
        }
    }
    attrs.insert("topic".into(), Value::String(topic.to_owned()));
    attrs.insert(
        "pubsubname".into(),
        Value::String(defaults.pubsub_name.clone()),
    );
    let bytes = serde_json::to_vec(&Value::Object(attrs))
        .map_err(|e| ApiError::invalid(format!("cannot encode the event: {e}")))?;
    Ok((id, bytes))
}

/// Turns a stored entry into what subscribers receive. Entries that are
/// not CloudEvents (written by other producers) are passed on as raw data
/// with the entry id as event id.
pub fn to_topic_event(
    topic: &str,
    entry_id: &str,
    raw: &[u8],
    pubsub_name: &str,
) -> TopicEventRequest {
    let Ok(Value::Object(mut attrs)) = serde_json::from_slice::<Value>(raw) else {
        return raw_event(topic, entry_id, raw, pubsub_name);
    };
    if !attrs.contains_key("specversion") {
        return raw_event(topic, entry_id, raw, pubsub_name);
    }
    let mut take = |k: &str| match attrs.remove(k) {
        Some(Value::String(s)) => s,
        Some(other) if k != "data" => other.to_string(),
        _ => String::new(),
    };
    let id = take("id");
    let source = take("source");
    let event_type = take("type");
    let spec_version = take("specversion");
    let data_content_type = take("datacontenttype");
    let event_topic = take("topic");
    let event_pubsub = take("pubsubname");
    // As daprd hands data to a subscriber, but lenient where daprd would
    // give nothing (a `data` field that its content type does not explain,
    // as older producers wrote): a string as its text, other JSON as JSON.
    let data = match (attrs.remove("data"), attrs.remove("data_base64")) {
        (_, Some(Value::String(b64))) => base64::engine::general_purpose::STANDARD
            .decode(b64.as_bytes())
            .unwrap_or_else(|_| b64.into_bytes()),
        (Some(Value::String(s)), _)
            if content_type::encoding(&data_content_type) != DataEncoding::Json =>
        {
            s.into_bytes()
        }
        (Some(v), _) => serde_json::to_vec(&v).unwrap_or_default(),
        (None, _) => Vec::new(),
    };
    let extensions = prost_types::Struct {
        fields: attrs
            .into_iter()
            .filter(|(k, _)| !CORE.contains(&k.as_str()))
            .map(|(k, v)| (k, virtufin_proto::json::to_prost(v)))
            .collect(),
    };
    TopicEventRequest {
        id: if id.is_empty() {
            entry_id.to_owned()
        } else {
            id
        },
        source,
        r#type: event_type,
        spec_version,
        data_content_type,
        topic: if event_topic.is_empty() {
            topic.to_owned()
        } else {
            event_topic
        },
        data,
        pubsub_name: if event_pubsub.is_empty() {
            pubsub_name.to_owned()
        } else {
            event_pubsub
        },
        path: String::new(),
        extensions: Some(extensions),
    }
}

fn raw_event(topic: &str, entry_id: &str, raw: &[u8], pubsub_name: &str) -> TopicEventRequest {
    let ct = if serde_json::from_slice::<Value>(raw).is_ok() {
        "application/json"
    } else {
        "application/octet-stream"
    };
    TopicEventRequest {
        id: entry_id.to_owned(),
        source: String::new(),
        r#type: String::new(),
        spec_version: "1.0".into(),
        data_content_type: ct.into(),
        topic: topic.to_owned(),
        data: raw.to_vec(),
        pubsub_name: pubsub_name.to_owned(),
        path: String::new(),
        extensions: None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn tc() -> TraceContext {
        TraceContext::new_root()
    }

    fn md(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn seed_smoke_event_roundtrips() {
        let data = r#"{"connection_id":"smoke","url":"ws://localhost"}"#;
        let (id, bytes) = build(
            "websocketmanager.connectionstatus",
            data,
            &md(&[
                (
                    "ce-type",
                    "com.virtufin.websocketmanager.connection.connected",
                ),
                ("ce-source", "urn:test"),
                ("ce-id", "smoke-1"),
                ("ce-correlationid", "c-42"),
            ]),
            &Defaults::default(),
            64,
            &tc(),
        )
        .unwrap();
        assert_eq!(id, "smoke-1");
        let ev = to_topic_event("websocketmanager.connectionstatus", "1-0", &bytes, "pubsub");
        assert_eq!(ev.id, "smoke-1");
        assert_eq!(ev.source, "urn:test");
        assert_eq!(
            ev.r#type,
            "com.virtufin.websocketmanager.connection.connected"
        );
        assert_eq!(ev.spec_version, "1.0");
        assert_eq!(ev.data_content_type, "application/json");
        let back: Value = serde_json::from_slice(&ev.data).unwrap();
        assert_eq!(back, serde_json::from_str::<Value>(data).unwrap());
        let ext = ev.extensions.unwrap().fields;
        assert!(ext.contains_key("time"), "time was filled in");
        assert_eq!(
            ext.get("correlationid").and_then(|v| v.kind.clone()),
            Some(prost_types::value::Kind::StringValue("c-42".into()))
        );
    }

    #[test]
    fn fills_missing_attributes() {
        let (id, bytes) = build(
            "t",
            "plain text",
            &HashMap::new(),
            &Defaults::default(),
            64,
            &tc(),
        )
        .unwrap();
        assert_eq!(uuid::Uuid::parse_str(&id).map(|_| ()), Ok(()));
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["datacontenttype"], "text/plain");
        assert_eq!(v["data"], "plain text");
        assert_eq!(v["source"], "virtufin-api");
    }

    #[test]
    fn rejects_bad_attributes() {
        let d = Defaults::default();
        for m in [
            md(&[("ce-specversion", "0.3")]),
            md(&[("ce-time", "yesterday")]),
            md(&[("ce-id", "")]),
            md(&[("ce-Bad_Name", "x")]),
            md(&[("ce-data", "x")]),
            md(&[("ce-datacontenttype", "application/json")]),
        ] {
            assert!(build("t", "not json", &m, &d, 64, &tc()).is_err(), "{m:?}");
        }
        let many: HashMap<_, _> = (0..65).map(|i| (format!("ce-x{i}"), "v".into())).collect();
        assert!(build("t", "x", &many, &d, 64, &tc()).is_err());
    }

    #[test]
    fn attribute_names_must_be_lowercase_and_unique() {
        let d = Defaults::default();
        let err = build("t", "x", &md(&[("ce-ID", "a")]), &d, 64, &tc()).unwrap_err();
        assert!(err.message.contains("lowercase"), "{err:?}");
        let err = build(
            "t",
            "x",
            &md(&[("ce-id", "a"), ("CE-id", "b")]),
            &d,
            64,
            &tc(),
        )
        .unwrap_err();
        assert!(err.message.contains("twice"), "{err:?}");
        let (id, _) = build("t", "x", &md(&[("CE-id", "b")]), &d, 64, &tc()).unwrap();
        assert_eq!(id, "b", "the prefix may be upper case");
    }

    #[test]
    fn traceparent_is_mirrored_as_traceid_for_dapr() {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let (_, bytes) = build(
            "t",
            "x",
            &md(&[("ce-traceparent", tp)]),
            &Defaults::default(),
            64,
            &tc(),
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            (v["traceparent"].as_str(), v["traceid"].as_str()),
            (Some(tp), Some(tp))
        );
        let (_, bytes) = build(
            "t",
            "x",
            &md(&[("ce-traceparent", tp), ("ce-traceid", "own")]),
            &Defaults::default(),
            64,
            &tc(),
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["traceid"], "own", "a given traceid is kept");
    }

    #[test]
    fn the_event_names_the_apis_span_unless_the_publisher_gave_a_valid_one() {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let call = TraceContext::parse(tp, Some("a=1")).unwrap().child();
        let json = |m: &HashMap<String, String>| {
            let (_, b) = build("t", "x", m, &Defaults::default(), 64, &call).unwrap();
            serde_json::from_slice::<Value>(&b).unwrap()
        };
        // None given: the api's span, its tracestate, mirrored as traceid.
        let v = json(&HashMap::new());
        assert_eq!(v["traceparent"], call.to_header());
        assert_eq!(v["traceid"], call.to_header());
        assert_eq!(v["tracestate"], "a=1");
        // A valid one given: kept with its tracestate.
        let own = "00-11111111111111111111111111111111-2222222222222222-00";
        let v = json(&md(&[("ce-traceparent", own), ("ce-tracestate", "b=2")]));
        assert_eq!(
            (v["traceparent"].as_str(), v["tracestate"].as_str()),
            (Some(own), Some("b=2"))
        );
        // An invalid one: replaced, with its tracestate.
        let v = json(&md(&[
            ("ce-traceparent", "nonsense"),
            ("ce-tracestate", "b=2"),
        ]));
        assert_eq!(v["traceparent"], call.to_header());
        assert_eq!(v["tracestate"], "a=1");
        let v = {
            let root = TraceContext::new_root();
            let (_, b) = build(
                "t",
                "x",
                &md(&[("ce-tracestate", "b=2")]),
                &Defaults::default(),
                64,
                &root,
            )
            .unwrap();
            serde_json::from_slice::<Value>(&b).unwrap()
        };
        assert!(
            v.get("tracestate").is_none(),
            "no state without its traceparent: {v}"
        );
    }

    #[test]
    fn payload_sits_where_dapr_expects_it_and_reads_back_unchanged() {
        let d = Defaults::default();
        for (ct, data, field) in [
            ("application/json", r#"{"a":1}"#, "data"),
            ("application/cloudevents+json", r#"{"a":1}"#, "data"),
            ("text/plain", "hello", "data"),
            ("text/json", r#"{"a":1}"#, "data"),
            ("application/xml", "<a/>", "data"),
            ("application/octet-stream", "bytes\u{1}", "data_base64"),
            ("application/ld+json", r#"{"@id":"x"}"#, "data_base64"),
        ] {
            let (_, bytes) =
                build("t", data, &md(&[("ce-datacontenttype", ct)]), &d, 64, &tc()).unwrap();
            let v: Value = serde_json::from_slice(&bytes).unwrap();
            assert!(v.get(field).is_some(), "{ct}: {v}");
            if ct == "text/json" {
                assert_eq!(v["data"], data, "text/* travels as a string");
            }
            let ev = to_topic_event("t", "1-1", &bytes, "pubsub");
            let got: Value = match ct {
                "application/json"
                | "application/cloudevents+json"
                | "text/json"
                | "application/ld+json" => serde_json::from_slice(&ev.data).unwrap(),
                _ => Value::String(String::from_utf8(ev.data.clone()).unwrap()),
            };
            let want: Value = match ct {
                "application/json"
                | "application/cloudevents+json"
                | "text/json"
                | "application/ld+json" => serde_json::from_str(data).unwrap(),
                _ => Value::String(data.to_owned()),
            };
            assert_eq!(got, want, "{ct}");
        }
    }

    #[test]
    fn raw_entries_pass_through() {
        let ev = to_topic_event("t", "5-1", b"\x00\x01binary", "pubsub");
        assert_eq!(ev.id, "5-1");
        assert_eq!(ev.data, b"\x00\x01binary");
        assert_eq!(ev.data_content_type, "application/octet-stream");
    }

    #[test]
    fn dapr_base64_payloads_decode() {
        let raw = br#"{"specversion":"1.0","id":"x","source":"s","type":"t","datacontenttype":"application/octet-stream","data_base64":"AAEC"}"#;
        let ev = to_topic_event("t", "1-1", raw, "pubsub");
        assert_eq!(ev.data, vec![0, 1, 2]);
    }
}
