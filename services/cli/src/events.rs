//! Renders received events for people: data as JSON when it is JSON.

use prost_types::value::Kind;
use serde_json::{Map, Value, json};
use virtufin_api_client::pb::TopicEventRequest;

fn prost_to_json(v: &prost_types::Value) -> Value {
    match &v.kind {
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::NumberValue(n)) => json!(n),
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::StructValue(s)) => Value::Object(
            s.fields
                .iter()
                .map(|(k, v)| (k.clone(), prost_to_json(v)))
                .collect(),
        ),
        Some(Kind::ListValue(l)) => Value::Array(l.values.iter().map(prost_to_json).collect()),
        Some(Kind::NullValue(_)) | None => Value::Null,
    }
}

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
                .map(|(k, v)| (k.clone(), prost_to_json(v)))
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
