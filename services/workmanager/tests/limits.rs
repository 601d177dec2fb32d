//! Per-worker limits: `limits.memory_mb` and `limits.event_timeout_ms`
//! tags lower the workmanager's settings for one worker (real python3
//! processes, a real api).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{create, create_started, first_error, publish, stack, subscribe, wm};
use virtufin_proto::workmanager::v1 as pb;

fn with_tags(mut r: pb::CreateWorkerRequest, tags: &[(&str, &str)]) -> pb::CreateWorkerRequest {
    r.tags = tags
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn limits_tags_lower_one_workers_memory_and_timeout() {
    let s = stack().await;
    let mut status = subscribe(&s.api, "workmanager.workerstatus").await;
    let mut answers = subscribe(&s.api, "big-answers").await;
    // Settings: 512 MiB, 5 s per event.
    let mut w = wm(&s, |c| {
        c.memory_limit_mb = 512;
        c.event_timeout = Duration::from_secs(5);
    })
    .await;

    // The same 200 MB allocation: refused under a 64 MiB tag, fine without.
    let big = "def Process(event):\n    b = bytearray(200 * 1024 * 1024)\n    return {\"type\": \"big-answers\", \"data\": str(len(b))}\n";
    let small = w
        .client
        .create_worker(with_tags(
            create(big, "big-small", &[]),
            &[("limits.memory_mb", "64")],
        ))
        .await
        .unwrap()
        .into_inner()
        .id;
    let roomy = w
        .client
        .create_worker(create(big, "big-roomy", &[]))
        .await
        .unwrap()
        .into_inner()
        .id;
    for id in [&small, &roomy] {
        w.client
            .start_worker(pb::StartWorkerRequest { id: id.clone() })
            .await
            .unwrap();
    }
    publish(&s.api, "big-small", "x", &[]).await;
    let d = first_error(&mut status, &small).await;
    assert_eq!(d["error_type"], "MemoryError", "{d}");
    publish(&s.api, "big-roomy", "x", &[]).await;
    let ev = common::next(&mut answers).await;
    assert_eq!(String::from_utf8_lossy(&ev.data), "209715200");

    // A hang: the tag's 300 ms, not the settings' 5 s.
    let hangs = "def Process(event):\n    while True:\n        pass\n";
    let quick = create_started(
        &mut w.client,
        with_tags(
            create(hangs, "hang-quick", &[]),
            &[("limits.event_timeout_ms", "300")],
        ),
    )
    .await;
    publish(&s.api, "hang-quick", "x", &[]).await;
    let d = first_error(&mut status, &quick).await;
    assert_eq!(d["error_type"], "timeout", "{d}");
    assert!(
        d["error_message"].as_str().unwrap().contains("300ms"),
        "{d}"
    );

    // Bad limit tags: INVALID_ARGUMENT naming the rule, nothing created or
    // changed.
    let before = w
        .client
        .list_workers(pb::ListWorkersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .workers
        .len();
    for (k, v, says) in [
        ("limits.memory_mb", "0", "from 1 to 512"),
        ("limits.memory_mb", "4096", "raise that to allow more"),
        ("limits.event_timeout_ms", "9000", "from 1 to 5000"),
        ("limits.event_timeout_ms", "soon", "whole number"),
        ("limits.cpu", "1", "unknown limit tag"),
    ] {
        let e = w
            .client
            .create_worker(with_tags(create(hangs, "never", &[]), &[(k, v)]))
            .await
            .unwrap_err();
        assert_eq!(
            e.code(),
            tonic::Code::InvalidArgument,
            "{k}={v}: {}",
            e.message()
        );
        assert!(e.message().contains(says), "{k}={v}: {}", e.message());
    }
    let e = w
        .client
        .set_tag(pb::SetTagRequest {
            id: quick.clone(),
            key: "limits.memory_mb".into(),
            value: "-1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let tags = w
        .client
        .get_tags(pb::GetTagsRequest { id: quick.clone() })
        .await
        .unwrap()
        .into_inner()
        .tags;
    assert_eq!(tags.get("limits.memory_mb"), None, "unchanged: {tags:?}");
    let after = w
        .client
        .list_workers(pb::ListWorkersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .workers
        .len();
    assert_eq!(before, after);
    w.stop().await;
}
