//! Frames between the workmanager and a worker host process (4-byte
//! length, JSON body), both directions; a decoded frame encodes and
//! decodes again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtufin_worker_abi::frame::{self, Frame};

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    while let Ok(f) = frame::read(&mut r, 1 << 16) {
        let again = Frame::from_bytes(&f.to_bytes()).unwrap();
        assert_eq!(std::mem::discriminant(&again), std::mem::discriminant(&f));
        let mut out = Vec::new();
        frame::write(&mut out, &f).unwrap();
    }
    let _ = Frame::from_bytes(data);
});
