//! The api on Valkey Sentinel: a real primary, replica and three Sentinels
//! (the server binary in --sentinel mode). The api follows a failover by
//! itself (not ready while no primary answers, ready again after), and with
//! VIRTUFIN_VALKEY_MIN_REPLICAS=1 a write is confirmed only when a replica
//! has it: what was confirmed survives the primary's death, and without a
//! replica a write is UNAVAILABLE.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{collections::HashMap, time::Duration};

use tonic::Code;
use virtufin_api::BackendKind;
use virtufin_api_client::{ClientError, pb};
use virtufin_testkit::{Sentinel, ValkeyServer};

const WAIT: Duration = Duration::from_secs(30);

async fn conn(server: &ValkeyServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Waits until `replica` reports its link to the primary up.
async fn in_sync(replica: &ValkeyServer) {
    let mut c = conn(replica).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut c)
            .await
            .unwrap();
        if info.contains("master_link_status:up") {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "replica never in sync: {info}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn status(e: &ClientError) -> Code {
    match e {
        ClientError::Status(s) => s.code(),
        other => panic!("expected a gRPC status, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_a_failover_and_keeps_what_replicas_confirmed() {
    let primary = ValkeyServer::start();
    let replica = ValkeyServer::start_replica_of(&primary);
    in_sync(&replica).await;
    let down_after = Duration::from_millis(500);
    let sentinels: Vec<Sentinel> = (0..3)
        .map(|_| Sentinel::start(&primary, "virtufin", 2, down_after))
        .collect();
    let url = format!(
        "redis+sentinel://{}/virtufin",
        sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect::<Vec<_>>()
            .join(",")
    );
    let mut config = common::test_config();
    config.backend = Some(BackendKind::Valkey);
    config.valkey_url = Some(url);
    config.valkey_min_replicas = 1;
    config.valkey_wait_timeout = Duration::from_millis(500);
    let api = common::start_config(config, None).await;
    common::ready(&api).await;

    // Confirmed writes: the replica has them when the call returns.
    let etag = api.client.save("svc", "before", "kept", "").await.unwrap();
    let mut md = HashMap::new();
    md.insert("ce-id".to_owned(), "ev-before".to_owned());
    api.client.publish("survives", "e", md).await.unwrap();
    let on_replica: Option<String> = redis::cmd("HGET")
        .arg("virtufin-api||svc/before")
        .arg("data")
        .query_async(&mut conn(&replica).await)
        .await
        .unwrap();
    assert_eq!(
        on_replica.as_deref(),
        Some("kept"),
        "WAIT 1 before the answer"
    );

    // The primary dies; Sentinel promotes the replica.
    drop(primary);
    let started = tokio::time::Instant::now();
    let mut saw_unready = false;
    loop {
        let health = reqwest::get(api.http_url("/health")).await.unwrap();
        if health.status().as_u16() == 503 {
            saw_unready = true;
        } else if saw_unready && api.client.handshake().await.is_ok() {
            break;
        }
        assert!(
            started.elapsed() < WAIT,
            "the api did not follow the failover (saw not-ready: {saw_unready})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("failover followed in {:?}", started.elapsed());

    // What was confirmed is there.
    let (value, e) = api.client.get("svc", "before").await.unwrap().unwrap();
    assert_eq!((value.as_str(), e.as_str()), ("kept", etag.as_str()));
    let mut sub = api
        .client
        .pubsub()
        .subscribe(pb::SubscribeRequest {
            topic: "survives".into(),
            subscriber: "r".into(),
            group: "after".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let ev = tokio::time::timeout(WAIT, sub.message())
        .await
        .expect("the confirmed event in time")
        .unwrap()
        .unwrap();
    assert_eq!(ev.id, "ev-before");

    // No replica left: a write cannot be confirmed.
    let err = api.client.save("svc", "alone", "x", "").await.unwrap_err();
    assert_eq!(status(&err), Code::Unavailable, "{err:?}");
    assert!(format!("{err:?}").contains("not confirmed"), "{err:?}");

    // A new replica of the promoted primary: confirmed again.
    let again = ValkeyServer::start_replica_of(&replica);
    in_sync(&again).await;
    api.client.save("svc", "after", "ok", "").await.unwrap();
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sentinel_urls_are_refused_with_the_rule() {
    for (url, says) in [
        ("redis+sentinel://127.0.0.1:1", "primary"),
        ("redis+sentinel://127.0.0.1/virtufin", "no port"),
        ("redis+sentinel://user:secret@127.0.0.1:1/p", "password"),
    ] {
        let mut config = common::test_config();
        config.backend = Some(BackendKind::Valkey);
        config.valkey_url = Some(url.into());
        let err = config.check().unwrap_err();
        assert!(
            err.contains(says) && err.contains("VIRTUFIN_VALKEY_URL"),
            "{url}: {err}"
        );
    }
}
