//! State over gRPC and REST, on both backends: etags, the key registry,
//! `state-changes` events, and bad input that changes nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Kind, ready, start};
use tonic::Code;
use virtufin_api_client::pb;

fn save(service: &str, key: &str, value: &str, etag: &str) -> pb::SaveStateRequest {
    pb::SaveStateRequest {
        service: service.into(),
        key: key.into(),
        value: value.into(),
        etag: etag.into(),
        include_value: true,
    }
}

async fn etags_guard_writes(kind: Kind) {
    let api = start(kind).await;
    ready(&api).await;
    let mut s = api.client.state();
    let r = s
        .save_state(save("ws", "conn/1", "a", ""))
        .await
        .unwrap()
        .into_inner();
    assert!(r.success);
    let e1 = r.etag;
    let e2 = api.client.save("ws", "conn/1", "b", &e1).await.unwrap();
    let err = s
        .save_state(save("ws", "conn/1", "stale", &e1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    assert!(err.message().contains("etag mismatch"), "{}", err.message());
    assert_eq!(
        api.client.get("ws", "conn/1").await.unwrap(),
        Some(("b".into(), e2.clone()))
    );
    // Delete: stale etag refused, current accepted, then the key is gone.
    match api.client.delete("ws", "conn/1", &e1).await {
        Err(virtufin_api_client::ClientError::Status(s)) => assert_eq!(s.code(), Code::Aborted),
        other => panic!("stale delete: {other:?}"),
    }
    assert!(api.client.delete("ws", "conn/1", &e2).await.unwrap());
    assert_eq!(api.client.get("ws", "conn/1").await.unwrap(), None);
    assert!(!api.client.delete("ws", "conn/1", "").await.unwrap());
    // Services do not see each other's keys.
    api.client.save("a", "k", "from-a", "").await.unwrap();
    api.client.save("b", "k", "from-b", "").await.unwrap();
    assert_eq!(api.client.get("a", "k").await.unwrap().unwrap().0, "from-a");
    api.stop().await;
}

/// Etag "0" creates only: of many concurrent creators exactly one wins
/// (what the workmanager's recovery lease relies on).
async fn etag_zero_creates_only_once(kind: Kind) {
    let api = start(kind).await;
    ready(&api).await;
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let c = api.client.clone();
            tokio::spawn(async move { c.save("wm", "lease", &format!("holder-{i}"), "0").await })
        })
        .collect();
    let mut won = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.unwrap() {
            Ok(_) => won.push(i),
            Err(virtufin_api_client::ClientError::Status(s)) => {
                assert_eq!(s.code(), Code::Aborted, "{s:?}")
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(won.len(), 1, "exactly one creator wins: {won:?}");
    let (value, _) = api.client.get("wm", "lease").await.unwrap().unwrap();
    assert_eq!(value, format!("holder-{}", won[0]));
    api.stop().await;
}

async fn get_all_returns_registered_keys(kind: Kind) {
    let api = start(kind).await;
    ready(&api).await;
    let mut s = api.client.state();
    api.client
        .save("wm", "workers/index", "[1]", "")
        .await
        .unwrap();
    api.client.save("wm", "workers/1", "{}", "").await.unwrap();
    api.client.save("other", "x", "y", "").await.unwrap();
    s.register_keys(pb::RegisterKeysRequest {
        service: "wm".into(),
        keys: vec!["never-written".into()],
    })
    .await
    .unwrap();
    let all = s
        .get_all_state(pb::GetAllStateRequest {
            service: "wm".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .values;
    let mut keys: Vec<_> = all.keys().cloned().collect();
    keys.sort();
    assert_eq!(
        keys,
        vec!["workers/1", "workers/index"],
        "registered keys that hold values"
    );
    assert_eq!(all["workers/index"], "[1]");
    api.stop().await;
}

async fn saves_and_deletes_are_announced(kind: Kind) {
    let api = start(kind).await;
    ready(&api).await;
    let mut stream = api
        .client
        .pubsub()
        .subscribe(pb::SubscribeRequest {
            topic: "state-changes".into(),
            subscriber: "watcher".into(),
            group: "watchers".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut s = api.client.state();
    s.save_state(save("ws", "k", "v1", "")).await.unwrap();
    let mut quiet = save("ws", "k", "v2", "");
    quiet.include_value = false;
    s.save_state(quiet).await.unwrap();
    s.delete_state(pb::DeleteStateRequest {
        service: "ws".into(),
        key: "k".into(),
        include_value: true,
        etag: String::new(),
    })
    .await
    .unwrap();
    let mut seen = Vec::new();
    for _ in 0..3 {
        let ev = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("state change in time")
            .unwrap()
            .unwrap();
        assert_eq!(ev.topic, "state-changes");
        assert_eq!(ev.source, "urn:com.virtufin.api");
        seen.push(serde_json::from_slice::<serde_json::Value>(&ev.data).unwrap());
    }
    assert_eq!(
        seen[0],
        serde_json::json!({"service":"ws","key":"k","action":"save","value":"v1"})
    );
    assert_eq!(
        seen[1],
        serde_json::json!({"service":"ws","key":"k","action":"save"})
    );
    assert_eq!(
        seen[2],
        serde_json::json!({"service":"ws","key":"k","action":"delete","value":"v2"})
    );
    api.stop().await;
}

async fn bad_input_is_refused_and_changes_nothing(kind: Kind) {
    let api = start_limited(kind).await;
    ready(&api).await;
    api.client.save("ws", "k", "original", "").await.unwrap();
    let mut s = api.client.state();
    let cases = [
        save("", "k", "v", ""),
        save("has space", "k", "v", ""),
        save("a/b", "k", "v", ""),
        save("ws", "", "v", ""),
        save("ws", "a||b", "v", ""),
        save("ws", "ctl\u{7}", "v", ""),
        save("ws", &"k".repeat(600), "v", ""),
        save("ws", "k", &"x".repeat(2048), ""),
    ];
    for c in cases {
        let err = s.save_state(c.clone()).await.unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{:?}: {err:?}",
            (c.service, &c.key[..c.key.len().min(10)])
        );
        assert!(!err.message().is_empty());
    }
    let err = s
        .get_state(pb::GetStateRequest {
            service: "".into(),
            key: "k".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("service is required"),
        "{}",
        err.message()
    );
    let err = s
        .register_keys(pb::RegisterKeysRequest {
            service: "ws".into(),
            keys: vec!["ok".into(), "".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let all = s
        .get_all_state(pb::GetAllStateRequest {
            service: "ws".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .values;
    assert_eq!(
        all.len(),
        1,
        "the refused RegisterKeys registered nothing: {all:?}"
    );
    assert_eq!(
        api.client.get("ws", "k").await.unwrap().unwrap().0,
        "original"
    );
    api.stop().await;
}

async fn start_limited(kind: Kind) -> common::TestApi {
    common::start_with(kind, |c| c.max_value_bytes = 1024).await
}

async fn rest_routes(kind: Kind) {
    let api = start(kind).await;
    ready(&api).await;
    let http = reqwest::Client::new();
    let r = http
        .post(api.http_url("/v1/state/save-state"))
        .body(r#"{"service":"ws","key":"a/b c","value":"v","include_value":true}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["status"]["success"], true);
    let etag = body["etag"].as_str().unwrap().to_owned();
    let r = http
        .get(api.http_url("/v1/state/ws/a/b%20c"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        body,
        serde_json::json!({"key":"a/b c","value":"v","etag":etag})
    );
    let r = http.get(api.http_url("/v1/state/ws")).send().await.unwrap();
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["values"]["a/b c"], "v");
    // Stale etag: 412, nothing changed.
    let r = http
        .post(api.http_url("/v1/state/save-state"))
        .body(r#"{"service":"ws","key":"a/b c","value":"w","etag":"999"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 412);
    // Malformed and incomplete JSON, unknown fields: 400 with a reason.
    for bad in [
        r#"{"service":"ws""#,
        r#"{"service":"ws","key":"k"}"#,
        r#"{"service":"ws","key":"k","value":"v","bogus":1}"#,
        "[]",
    ] {
        let r = http
            .post(api.http_url("/v1/state/save-state"))
            .body(bad)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{bad}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert!(body["error"].as_str().unwrap().contains("JSON"), "{body}");
    }
    let r = http
        .get(api.http_url("/v1/state/bad%20name/k"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = http
        .get(api.http_url("/v1/state/ws/missing"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = http
        .delete(api.http_url("/v1/state/ws/a/b%20c?etag=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .delete(api.http_url("/v1/state/ws/a/b%20c"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(api.client.get("ws", "a/b c").await.unwrap(), None);
    api.stop().await;
}

both_backends!(
    etags_guard_writes,
    etag_zero_creates_only_once,
    get_all_returns_registered_keys,
    saves_and_deletes_are_announced,
    bad_input_is_refused_and_changes_nothing,
    rest_routes,
);
