//! Renders received events for people: data as JSON when it is JSON.

use serde_json::{Map, Value, json};
use virtufin_api_client::pb::TopicEventRequest;

pub fn to_json(ev: &TopicEventRequest) -> Value {
    let data = serde_json::from_slice::<Value>(&ev.data).unwrap_or_else(|_| {
        match std::str::from_utf8(&ev.data) {
            Ok(s) => Value::String(s.to_owned()),
            Err(_) => {
                use base64::Engine;
                json!({ "base64": base64::engine::general_purpose::STANDARD.encode(&ev.data) })
            }
        }
    });
    let extensions: Map<String, Value> = ev
        .extensions
        .as_ref()
        .map(|s| {
            s.fields
                .iter()
                .map(|(k, v)| (k.clone(), virtufin_proto::json::from_prost(v)))
                .collect()
        })
        .unwrap_or_default();
    json!({
        "id": ev.id,
        "source": ev.source,
        "type": ev.r#type,
        "topic": ev.topic,
        "datacontenttype": ev.data_content_type,
        "data": data,
        "extensions": extensions,
    })
}
