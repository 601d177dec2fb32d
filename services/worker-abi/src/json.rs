//! Events as the CloudEvent-shaped JSON dicts the workmanager's runtime
//! hands every engine (the Python engine's `Process(event)` gets the same).

use serde_json::{Map, Value};

use crate::Event;

/// Attributes with fields of their own; `topic` is the runtime's note of
/// where the event came from, not an attribute.
const CORE: &[&str] = &[
    "id",
    "type",
    "source",
    "specversion",
    "datacontenttype",
    "dataschema",
    "subject",
    "time",
    "data",
    "topic",
];

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

impl Event {
    /// From a dict: `data` that is a string travels as its UTF-8 bytes,
    /// anything else as its JSON text; other keys become extensions
    /// (`correlationid` first).
    pub fn from_dict(d: &Value) -> Self {
        let get = |k: &str| d.get(k).map(text).unwrap_or_default();
        let mut extensions: Vec<(String, String)> = Vec::new();
        if let Value::Object(m) = d {
            if let Some(c) = m.get("correlationid") {
                extensions.push(("correlationid".into(), text(c)));
            }
            for (k, v) in m {
                if !CORE.contains(&k.as_str()) && k != "correlationid" {
                    extensions.push((k.clone(), text(v)));
                }
            }
        }
        let data = match d.get("data") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => s.clone().into_bytes(),
            Some(other) => other.to_string().into_bytes(),
        };
        Self {
            id: get("id"),
            r#type: get("type"),
            source: get("source"),
            specversion: get("specversion"),
            datacontenttype: get("datacontenttype"),
            dataschema: get("dataschema"),
            subject: get("subject"),
            time: get("time"),
            data,
            extensions,
        }
    }

    /// To a dict: `data` is parsed when the content type says JSON (and
    /// parses), a string otherwise; extensions are top-level keys.
    pub fn to_dict(&self) -> Value {
        let mut m = Map::new();
        for (k, v) in &self.extensions {
            m.insert(k.clone(), Value::String(v.clone()));
        }
        for (k, v) in [
            ("id", &self.id),
            ("type", &self.r#type),
            ("source", &self.source),
            ("specversion", &self.specversion),
            ("datacontenttype", &self.datacontenttype),
            ("dataschema", &self.dataschema),
            ("subject", &self.subject),
            ("time", &self.time),
        ] {
            if !v.is_empty() {
                m.insert(k.into(), Value::String(v.clone()));
            } else {
                m.remove(k);
            }
        }
        let json = self.datacontenttype.is_empty() || self.datacontenttype.contains("json");
        let data = if self.data.is_empty() {
            Value::Null
        } else if json && let Ok(v) = serde_json::from_slice::<Value>(&self.data) {
            v
        } else {
            Value::String(String::from_utf8_lossy(&self.data).into_owned())
        };
        m.insert("data".into(), data);
        Value::Object(m)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::Event;

    #[test]
    fn dicts_round_trip_with_correlation_first() {
        let d = json!({"id": "1", "type": "t", "source": "s", "specversion": "1.0",
            "datacontenttype": "application/json", "topic": "jobs",
            "region": "eu", "correlationid": "c-1", "data": {"n": 1}});
        let e = Event::from_dict(&d);
        assert_eq!(e.extensions[0], ("correlationid".into(), "c-1".into()));
        assert_eq!(e.extension("region"), Some("eu"));
        assert_eq!(e.data, br#"{"n":1}"#);
        let back = e.to_dict();
        assert_eq!(back["data"], json!({"n": 1}));
        assert_eq!(back["region"], "eu");
        assert!(back.get("topic").is_none());
    }
}
