//! The websocketmanager's correlated-send framing (16-byte key, then the
//! payload), the text/binary choice by content type and URL checks.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::{arbitrary, fuzz_target};
use virtufin_websocketmanager::{conn, manager};

#[derive(arbitrary::Arbitrary, Debug)]
struct Input {
    content_type: String,
    url: String,
    frame: Vec<u8>,
}

fuzz_target!(|i: Input| {
    let data = Bytes::from(i.frame);
    match conn::split_correlated(&data) {
        Some((key, reply)) => assert_eq!(conn::correlated(&key, &reply), data),
        None => assert!(data.len() < 16),
    }
    let _ = manager::frame(data, &i.content_type);
    let _ = manager::check_url(&i.url);
});
