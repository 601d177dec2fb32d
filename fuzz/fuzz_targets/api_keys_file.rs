//! The API keys file (JSON or YAML).
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtufin_common::auth::ApiKeys;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut keys = ApiKeys::default();
    if keys.add_text(text, "api-keys.yaml").is_ok() {
        let _ = keys.names();
        let _ = keys.authenticate(Some(data));
    }
});
