//! Worker code from a Nix store path: the `nix:`/`file://` URL, the NAR
//! hash in its three spellings, and the path checks (inside a store made
//! for the run; nothing outside it may be read).
#![no_main]

use std::sync::OnceLock;

use base64::Engine;
use libfuzzer_sys::{arbitrary, fuzz_target};
use virtufin_workmanager::source::{SourceRules, nix_path, parse_nar_hash, read_nix};

#[derive(arbitrary::Arbitrary, Debug)]
struct Input {
    url: String,
    hash: String,
    bytes: [u8; 32],
}

struct Env {
    _dir: tempfile::TempDir,
    rules: SourceRules,
    rt: tokio::runtime::Runtime,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let item = store.join("0123456789abcdfghijklmnpqrsvwxyz-worker");
        std::fs::create_dir_all(item.join("lib")).unwrap();
        std::fs::write(
            item.join("lib/worker.py"),
            "def Process(e):\n    return e\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("secret"), "outside the store").unwrap();
        Env {
            rules: SourceRules {
                allow: Vec::new(),
                max_bytes: 1 << 20,
                timeout: std::time::Duration::from_secs(1),
                nix_store: store,
            },
            rt: tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap(),
            _dir: dir,
        }
    })
}

fuzz_target!(|i: Input| {
    // Every spelling of a hash parses back to its bytes.
    let hex: String = i.bytes.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(parse_nar_hash(&hex).unwrap(), i.bytes);
    let sri = format!(
        "sha256-{}",
        base64::engine::general_purpose::STANDARD.encode(i.bytes)
    );
    assert_eq!(parse_nar_hash(&sri).unwrap(), i.bytes);
    let _ = parse_nar_hash(&i.hash);

    let env = env();
    let path = match nix_path(&i.url) {
        Some(p) => p.to_owned(),
        // Paths under the test store, as a caller would name them.
        None => format!("{}/{}", env.rules.nix_store.display(), i.url),
    };
    let hash = if i.hash.is_empty() { sri } else { i.hash };
    if let Ok(code) = env.rt.block_on(read_nix(&env.rules, &path, &hash)) {
        // Only the one file in the store, and only with its real hash.
        assert_eq!(code, b"def Process(e):\n    return e\n");
    }
});
