//! `PublishEvent{topic, data, metadata}` → the CloudEvent envelope (the
//! `ce-` metadata, the data by its content type), and back to what a
//! subscriber receives: whatever is accepted reads back unchanged.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::{arbitrary, fuzz_target};
use virtufin_api::cloudevent::{Defaults, build, to_topic_event};
use virtufin_store::content_type::{DataEncoding, claims_json, encoding};

#[derive(arbitrary::Arbitrary, Debug)]
struct Input {
    topic: String,
    data: String,
    metadata: Vec<(String, String)>,
    content_type: Option<String>,
}

fuzz_target!(|i: Input| {
    let mut md: HashMap<String, String> = i.metadata.into_iter().collect();
    if let Some(ct) = &i.content_type {
        let _ = (encoding(ct), claims_json(ct));
        md.insert("ce-datacontenttype".into(), ct.clone());
    }
    let Ok((id, bytes)) = build(
        &i.topic,
        &i.data,
        &md,
        &Defaults::default(),
        64,
        &virtufin_common::trace::TraceContext::new_root(),
    ) else {
        return;
    };
    let ev = to_topic_event(&i.topic, "1-0", &bytes, "pubsub");
    assert_eq!(ev.id, id);
    assert_eq!(ev.topic, i.topic);
    match encoding(&ev.data_content_type) {
        DataEncoding::Text | DataEncoding::Base64 => {
            assert_eq!(ev.data, i.data.as_bytes(), "{}", ev.data_content_type)
        }
        // Numbers may be respelled; the value must still be JSON.
        DataEncoding::Json => {
            serde_json::from_slice::<serde_json::Value>(&ev.data).unwrap();
        }
    }
});
