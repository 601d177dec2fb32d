//! The Gateway's services file (JSON or YAML).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The settled read refuses what is not UTF-8.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(file) = virtufin_gateway::config::parse(text, "services.yaml") {
        for s in &file.services {
            let r = &s.resilience;
            let _ = (r.timeout(), r.backoff(), r.cooldown());
            let _ = r.listed_safe("pkg.Service", "Method");
        }
    }
});
