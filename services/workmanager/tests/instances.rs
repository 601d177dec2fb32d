//! Two workmanager instances (as on two hosts) on one api: one worker run by
//! both is one group of two members — events spread over both processes,
//! none handled twice — and each instance stopping or recovering only its
//! own run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{create, next, publish, stack_with, subscribe, wm};
use virtufin_proto::workmanager::v1 as pb;

// Answers with the event's data and the worker process's pid, so the test
// can tell the two instances' processes apart.
const ECHO_PID: &str = r#"
import os
def Process(event):
    return {"type": "spread-answers", "data": {"got": event["data"], "pid": os.getpid()}}
"#;

/// The common stack's api hands an event to another member after 500 ms
/// unsettled; these tests need workers' processing to stay within the
/// processing timeout (else at-least-once delivery lets another member
/// have it too), as it does with the default 60 s.
async fn long_processing_stack() -> common::Stack {
    stack_with(|c| c.processing_timeout = std::time::Duration::from_secs(30)).await
}

/// A workmanager instance with its own id and state directory, as on a
/// host of its own.
async fn host(s: &common::Stack, id: &str, dir: &tempfile::TempDir) -> common::Wm {
    let id = id.to_owned();
    wm(s, |c| {
        c.instance_id = Some(id);
        c.state_dir = dir.path().to_path_buf();
    })
    .await
}

async fn instances_of(w: &mut common::Wm, id: &str) -> (i32, Vec<String>) {
    let list = w
        .client
        .list_workers(pb::ListWorkersRequest { filters: vec![] })
        .await
        .unwrap()
        .into_inner()
        .workers;
    let info = list.into_iter().find(|i| i.id == id).unwrap();
    (info.status, info.instances)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_on_two_instances_shares_its_events() {
    let s = long_processing_stack().await;
    let mut answers = subscribe(&s.api, "spread-answers").await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = host(&s, "host-a", &dir_a).await;
    let mut b = host(&s, "host-b", &dir_b).await;
    let id = a
        .client
        .create_worker(create(ECHO_PID, "spread", &[]))
        .await
        .unwrap()
        .into_inner()
        .id;
    for w in [&mut a, &mut b] {
        w.client
            .start_worker(pb::StartWorkerRequest { id: id.clone() })
            .await
            .unwrap();
    }
    let (status, instances) = instances_of(&mut b, &id).await;
    assert_eq!(status, pb::WorkerStatus::Running as i32);
    assert_eq!(instances, ["host-a", "host-b"]);

    let n = 60;
    for i in 0..n {
        publish(&s.api, "spread", &format!("\"e{i}\""), &[]).await;
    }
    let mut by_pid: BTreeMap<i64, usize> = BTreeMap::new();
    let mut got = Vec::new();
    while got.len() < n {
        let d: serde_json::Value = serde_json::from_slice(&next(&mut answers).await.data).unwrap();
        *by_pid.entry(d["pid"].as_i64().unwrap()).or_default() += 1;
        got.push(d["got"].as_str().unwrap().to_owned());
    }
    let unique: BTreeSet<&String> = got.iter().collect();
    assert_eq!(unique.len(), n, "every event answered once: {got:?}");
    assert_eq!(
        by_pid.len(),
        2,
        "both instances' worker processes answered: {by_pid:?}"
    );

    // Stopping it on one instance leaves it running on the other.
    a.client
        .stop_worker(pb::StopWorkerRequest { id: id.clone() })
        .await
        .unwrap();
    let (status, instances) = instances_of(&mut a, &id).await;
    assert_eq!(status, pb::WorkerStatus::Running as i32);
    assert_eq!(instances, ["host-b"]);
    publish(&s.api, "spread", "\"after-stop\"", &[]).await;
    let d: serde_json::Value = serde_json::from_slice(&next(&mut answers).await.data).unwrap();
    assert_eq!(d["got"], "after-stop");

    // A restarted instance recovers only what it ran: host-a's restart
    // does not take the worker back; host-b's does.
    a.stop().await;
    let mut a = host(&s, "host-a", &dir_a).await;
    assert_eq!(instances_of(&mut a, &id).await.1, ["host-b"]);
    b.stop().await;
    let mut b = host(&s, "host-b", &dir_b).await;
    assert_eq!(instances_of(&mut b, &id).await.1, ["host-b"]);
    publish(&s.api, "spread", "\"after-recovery\"", &[]).await;
    let d: serde_json::Value = serde_json::from_slice(&next(&mut answers).await.data).unwrap();
    assert_eq!(d["got"], "after-recovery");

    b.client
        .stop_worker(pb::StopWorkerRequest { id: id.clone() })
        .await
        .unwrap();
    let (status, instances) = instances_of(&mut b, &id).await;
    assert_eq!(status, pb::WorkerStatus::Stopped as i32);
    assert!(instances.is_empty());
    a.stop().await;
    b.stop().await;
    s.api_stop.cancel();
}

// Holds the event "slow" for two seconds before answering.
const SLOW: &str = r#"
import os, time
def Process(event):
    if event["data"] == "slow":
        time.sleep(2)
    return {"type": "held-answers", "data": {"got": event["data"], "pid": os.getpid()}}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_joins_does_not_take_what_another_holds() {
    let s = long_processing_stack().await;
    let mut answers = subscribe(&s.api, "held-answers").await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = host(&s, "host-a", &dir_a).await;
    let mut b = host(&s, "host-b", &dir_b).await;
    let id = a
        .client
        .create_worker(create(SLOW, "held", &[]))
        .await
        .unwrap()
        .into_inner()
        .id;
    a.client
        .start_worker(pb::StartWorkerRequest { id: id.clone() })
        .await
        .unwrap();
    publish(&s.api, "held", "\"slow\"", &[]).await;
    // Host A has the event in hand (pending in the worker's group).
    let valkey = redis::Client::open(s._valkey.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    common::until(|| {
        let (mut v, group) = (valkey.clone(), id.clone());
        async move {
            let p: redis::Value = redis::cmd("XPENDING")
                .arg("held")
                .arg(&group)
                .query_async(&mut v)
                .await
                .unwrap_or(redis::Value::Nil);
            matches!(p, redis::Value::Array(ref a) if matches!(a.first(), Some(redis::Value::Int(1))))
        }
    })
    .await;
    // Host B joins the group meanwhile: it must not be handed A's event
    // (a consumer name shared across instances would give it to B at once).
    b.client
        .start_worker(pb::StartWorkerRequest { id: id.clone() })
        .await
        .unwrap();
    let d: serde_json::Value = serde_json::from_slice(&next(&mut answers).await.data).unwrap();
    assert_eq!(d["got"], "slow");
    // Longer than A's two seconds of work: a second answer would be here.
    let again = tokio::time::timeout(std::time::Duration::from_secs(3), answers.message()).await;
    assert!(again.is_err(), "answered twice: {again:?}");
    a.stop().await;
    b.stop().await;
    s.api_stop.cancel();
}

/// Two instances restarting at once (a fleet-wide upgrade, a power cut of
/// both) recover their own workers one after the other: the recovery lease
/// has one holder at a time, as the journal's lease lines show.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_restarting_at_once_recover_one_at_a_time() {
    virtufin_testkit::logs::capture();
    let s = long_processing_stack().await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = host(&s, "lease-a", &dir_a).await;
    let mut b = host(&s, "lease-b", &dir_b).await;
    // Three workers on each: a recovery starts three Python processes,
    // long enough for the two to meet.
    for (w, name) in [(&mut a, "a"), (&mut b, "b")] {
        for i in 0..3 {
            let id = w
                .client
                .create_worker(create(ECHO_PID, &format!("lease-{name}{i}"), &[]))
                .await
                .unwrap()
                .into_inner()
                .id;
            w.client
                .start_worker(pb::StartWorkerRequest { id })
                .await
                .unwrap();
        }
    }
    let lease_lines = || {
        virtufin_testkit::logs::lines_with(&["recovery lease"])
            .into_iter()
            .filter(|l| l.contains("holder=lease-"))
            .collect::<Vec<_>>()
    };
    let before = lease_lines().len();
    a.stop().await;
    b.stop().await;
    let (a, b) = tokio::join!(host(&s, "lease-a", &dir_a), host(&s, "lease-b", &dir_b));
    let lines = lease_lines();
    let steps: Vec<(&str, &str)> = lines[before..]
        .iter()
        .map(|l| {
            let what = if l.contains("recovery lease taken") {
                "taken"
            } else {
                "released"
            };
            let holder = if l.contains("holder=lease-a") {
                "lease-a"
            } else {
                "lease-b"
            };
            (what, holder)
        })
        .collect();
    assert_eq!(steps.len(), 4, "{lines:#?}");
    let (first, second) = (steps[0].1, steps[2].1);
    assert_ne!(first, second, "{steps:?}");
    assert_eq!(
        steps,
        [
            ("taken", first),
            ("released", first),
            ("taken", second),
            ("released", second)
        ],
        "one holder at a time"
    );
    for w in [a, b] {
        w.stop().await;
    }
    s.api_stop.cancel();
}
