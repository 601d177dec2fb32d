//! API keys files rewritten under a running reloader, in every way
//! operators do: a keyed call never finds its key missing. The reloader is
//! what a reload (SIGHUP, a poll) does: `ApiKeys::load`, and on error keep
//! the keys it had.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    sync::{Arc, Mutex, mpsc},
    time::Duration,
};

use virtufin_common::auth::ApiKeys;
use virtufin_testkit::files::{Rewrite, rewrite};

const ADMIN: &str = "admin-0123456789abcdef0123456789";
const WSM: &str = "wsm-0123456789abcdef0123456789ab";

/// YAML, whose truncated prefixes parse (with keys missing) when the cut
/// falls at a line end.
fn keys_yaml(round: usize) -> String {
    format!(
        "keys:\n  - name: admin\n    key: {ADMIN}\n  - name: round{round}\n    key: round-{round:04}-0123456789abcdef\n  - name: wsm\n    key: {WSM}\n    services: [websocketmanager]\n"
    )
}

#[test]
fn keyed_calls_never_miss_a_key_while_the_keys_file_changes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api-keys.yaml");
    std::fs::write(&path, keys_yaml(0)).unwrap();
    let current = Arc::new(Mutex::new(Arc::new(ApiKeys::load(Some(&path)).unwrap())));

    // The reloader: load again and again; a refused file keeps the last good.
    let (seen_tx, seen_rx) = mpsc::channel::<Vec<String>>();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reloader = {
        let (path, current, stop) = (path.clone(), current.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut loads, mut refused) = (0u64, 0u64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match ApiKeys::load(Some(&path)) {
                    Ok(k) => {
                        loads += 1;
                        let names = k.names().iter().map(|s| s.to_string()).collect();
                        *current.lock().unwrap() = Arc::new(k);
                        let _ = seen_tx.send(names);
                    }
                    Err(_) => refused += 1,
                }
                // The poll interval of a reloader.
                std::thread::sleep(Duration::from_millis(10));
            }
            (loads, refused)
        })
    };
    // Keyed calls: authenticate with the keys every version has.
    let caller = {
        let (current, stop) = (current.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut calls, mut failures) = (0u64, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let keys = current.lock().unwrap().clone();
                for (key, name) in [(ADMIN, "admin"), (WSM, "wsm")] {
                    calls += 1;
                    match keys.authenticate(Some(key.as_bytes())) {
                        Ok(c) if c.name() == name => {}
                        other => {
                            failures.push(format!("{name}: {other:?} (keys {:?})", keys.names()))
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            (calls, failures)
        })
    };
    for round in 1..=8 {
        let how = Rewrite::ALL[round % Rewrite::ALL.len()];
        rewrite(&path, &keys_yaml(round), how);
        // Wait for the reloader to take this version (a signal, not a sleep).
        let want = format!("round{round}");
        loop {
            let names = seen_rx
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("{how:?}: round {round} never loaded"));
            if names.contains(&want) {
                assert_eq!(names.len(), 3, "{how:?}: {names:?}");
                break;
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (loads, refused) = reloader.join().unwrap();
    let (calls, failures) = caller.join().unwrap();
    println!(
        "keyed calls: {calls}, failed: {}; loads: {loads}, refused reads: {refused}",
        failures.len()
    );
    assert!(calls > 0);
    assert!(
        failures.is_empty(),
        "{:?}",
        &failures[..failures.len().min(5)]
    );
}

#[test]
fn an_empty_keys_file_is_refused_and_no_keys_is_spelled_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.json");
    std::fs::write(&path, "").unwrap();
    let e = ApiKeys::load(Some(&path)).unwrap_err();
    assert!(e.to_string().contains("empty"), "{e}");
    for text in [
        "{}",
        "# nothing\n",
        "keys:\n",
        "keys: ~\n",
        r#"{"keys": null}"#,
    ] {
        std::fs::write(&path, text).unwrap();
        assert!(ApiKeys::load(Some(&path)).is_err(), "{text:?}");
    }
    std::fs::write(&path, r#"{"keys": []}"#).unwrap();
    assert!(!ApiKeys::load(Some(&path)).unwrap().enabled());
}
