//! FlatBuffers from native workers (`WorkerResponse`) and the
//! `CloudEvent` they are handed, as the worker host handles them: decode
//! (verified), to the runtime's JSON dict and back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtufin_worker_abi::{Event, Response};

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = Response::decode(data) {
        assert_eq!(Response::decode(&r.encode()).unwrap(), r);
        if let Some(e) = &r.event {
            let dict = e.to_dict();
            let back = Event::from_dict(&dict);
            let _ = Event::decode(&back.encode()).unwrap();
        }
    }
    if let Ok(e) = Event::decode(data) {
        assert_eq!(Event::decode(&e.encode()).unwrap(), e);
    }
});
