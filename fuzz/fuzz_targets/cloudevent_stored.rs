//! A stored stream entry (written by us, Dapr or any other producer) →
//! what a subscriber receives.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtufin_api::cloudevent::to_topic_event;

fuzz_target!(|raw: &[u8]| {
    let ev = to_topic_event("t", "1-0", raw, "pubsub");
    // An event always has an id (the entry id when it names none).
    assert!(!ev.id.is_empty());
});
