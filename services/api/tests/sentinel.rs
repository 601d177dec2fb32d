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

/// Waits until `replica` acknowledges `primary`'s writes: a write of the
/// test's own, then `WAIT 1` on the same connection. Neither the replica's
/// `master_link_status:up` nor the primary's `state=online` is that signal:
/// a replica still loading the snapshot is both, and answers no GETACK
/// until it is done (seen under stress-ng: the api's confirmed write timed
/// out right after them, the primary listing the replica at `offset=0`).
async fn in_sync(primary: &ValkeyServer, replica: &ValkeyServer) {
    let mut c = conn(primary).await;
    let _: () = redis::cmd("SET")
        .arg("test-replica-sync")
        .arg(replica.port)
        .query_async(&mut c)
        .await
        .unwrap();
    // In short WAITs: the connection's own response timeout is shorter
    // than the whole wait.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let acked: i64 = redis::cmd("WAIT")
            .arg(1)
            .arg(200)
            .query_async(&mut c)
            .await
            .unwrap();
        if acked >= 1 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "replica {} never acknowledged",
            replica.port
        );
    }
}

fn status(e: &ClientError) -> Code {
    match e {
        ClientError::Status(s) => s.code(),
        other => panic!("expected a gRPC status, got {other:?}"),
    }
}

/// An api configuration on Valkey through these Sentinels (primary
/// `virtufin`).
fn through(sentinels: &[Sentinel]) -> virtufin_api::Config {
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
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_a_failover_and_keeps_what_replicas_confirmed() {
    let primary = ValkeyServer::start();
    let replica = ValkeyServer::start_replica_of(&primary);
    in_sync(&primary, &replica).await;
    let down_after = Duration::from_millis(500);
    let sentinels: Vec<Sentinel> = (0..3)
        .map(|_| Sentinel::start(&primary, "virtufin", 2, down_after))
        .collect();
    let mut config = through(&sentinels);
    config.valkey_min_replicas = 1;
    // A replica that acknowledges answers WAIT at once; the bound only
    // matters when none does (the UNAVAILABLE case below), so it can be
    // generous for a machine under load.
    config.valkey_wait_timeout = Duration::from_secs(2);
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
    in_sync(&replica, &again).await;
    api.client.save("svc", "after", "ok", "").await.unwrap();
    api.stop().await;
}

/// Waits until each of `sentinels` knows the `others` other Sentinels
/// (they find each other through the primary, every 2 s): a failover
/// needs a majority of the Sentinels one knows.
async fn sentinels_know_each_other(sentinels: &[Sentinel], others: usize) {
    let deadline = tokio::time::Instant::now() + WAIT;
    for s in sentinels {
        let mut c = redis::Client::open(format!("redis://127.0.0.1:{}", s.port))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        loop {
            let known: Vec<redis::Value> = redis::cmd("SENTINEL")
                .arg("SENTINELS")
                .arg("virtufin")
                .query_async(&mut c)
                .await
                .unwrap();
            if known.len() >= others {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "sentinel {} knows {} others",
                s.port,
                known.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A primary and a Sentinel that go silent (SIGSTOP: their ports still
/// take connections, nothing answers) are left behind in bounded time: the
/// api asks each Sentinel, and connects to the primary it names, for at
/// most its response timeout (5 s), so it follows the failover the two
/// other Sentinels make. (What a powered-off host does to connections —
/// no answer to the connect itself — is the multi-host test's:
/// checks/multihost.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_primary_and_sentinel_are_left_in_bounded_time() {
    let primary = ValkeyServer::start();
    let replica = ValkeyServer::start_replica_of(&primary);
    in_sync(&primary, &replica).await;
    let sentinels: Vec<Sentinel> = (0..3)
        .map(|_| Sentinel::start(&primary, "virtufin", 2, Duration::from_millis(500)))
        .collect();
    sentinels_know_each_other(&sentinels, 2).await;
    let api = common::start_config(through(&sentinels), None).await;
    common::ready(&api).await;
    api.client.save("svc", "k", "one", "").await.unwrap();

    // The first Sentinel listed and the primary go silent; the two others
    // promote the replica.
    sentinels[0].pause();
    primary.pause();
    let started = tokio::time::Instant::now();
    loop {
        if api.client.save("svc", "k", "two", "").await.is_ok() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the api did not follow the failover past the silent primary and Sentinel in 20 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("failover followed in {:?}", started.elapsed());
    let on_promoted: Option<String> = redis::cmd("HGET")
        .arg("virtufin-api||svc/k")
        .arg("data")
        .query_async(&mut conn(&replica).await)
        .await
        .unwrap();
    assert_eq!(
        on_promoted.as_deref(),
        Some("two"),
        "written to the promoted replica"
    );
    sentinels[0].resume();
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
