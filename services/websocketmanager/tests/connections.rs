//! The websocketmanager against real WebSocket peers (a Rust one and a
//! Python `websockets` one), a real api and a real Valkey.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use base64::Engine;
use common::*;
use tonic::Code;
use virtufin_proto::websocketmanager::v1 as ws;
use virtufin_testkit::ValkeyServer;

const STATUS: &str = "websocketmanager.connectionstatus";

fn connect(url: &str, auto: bool) -> ws::ConnectRequest {
    ws::ConnectRequest {
        url: url.into(),
        auto_reconnect: auto,
    }
}

fn raw(id: &str, message: &str, content_type: &str) -> ws::SendRawRequest {
    ws::SendRawRequest {
        id: id.into(),
        message: message.into(),
        content_type: content_type.into(),
        message_bytes: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_send_and_forward_text_binary_and_large_frames() {
    let valkey = ValkeyServer::start();
    let api = Api::start(&valkey).await;
    let mut status = subscribe(&api.client, STATUS, "status-watch").await;
    let mut feed = subscribe(&api.client, "feed", "feed-watch").await;
    let wsm = Wsm::start(api.addr, "inst-1").await;
    let mut c = wsm.client().await;
    let peer = EchoPeer::start().await;

    let r = c
        .connect(connect(&peer.url(), false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status, "connected");
    let id = r.id;
    let (kind, data) = next_lifecycle(&mut status, &id).await;
    assert_eq!(kind, "connected");
    assert_eq!(
        data,
        serde_json::json!({"connection_id": id, "url": peer.url(), "instance_id": "inst-1"})
    );

    // Correlated send: the echo carries the prefix back; it is stripped.
    let reply = c
        .send(ws::SendRequest {
            id: id.clone(),
            message: "hello".into(),
            timeout_ms: 2000,
            content_type: "text/plain".into(),
            message_bytes: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.response, "hello");
    assert_eq!(reply.response_bytes, b"hello");

    // Forwarding: text, binary, 1 MiB.
    c.start_publish(ws::StartPublishRequest {
        id: id.clone(),
        topic: "feed".into(),
    })
    .await
    .unwrap();
    c.send_raw(raw(&id, "tick-1", "text/plain")).await.unwrap();
    let (t, env) = next_event(&mut feed).await;
    assert_eq!(t, "com.virtufin.websocketmanager.message");
    assert_eq!(env["WebSocketId"], id.as_str());
    assert_eq!(env["WebSocketUrl"], peer.url().as_str());
    assert_eq!(env["Payload"], "tick-1");
    assert_eq!(env["ContentType"], "text/plain");
    assert!(env["Timestamp"].as_str().unwrap().ends_with('Z'));

    let bin = vec![0u8, 1, 2, 255, 254];
    c.send_raw(ws::SendRawRequest {
        id: id.clone(),
        message: String::new(),
        content_type: String::new(),
        message_bytes: bin.clone(),
    })
    .await
    .unwrap();
    let (_, env) = next_event(&mut feed).await;
    assert_eq!(env["ContentType"], "application/octet-stream");
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(env["Payload"].as_str().unwrap())
            .unwrap(),
        bin
    );

    let big = "x".repeat(1 << 20);
    c.send_raw(raw(&id, &big, "application/json; charset=utf-8"))
        .await
        .map(|_| ())
        .unwrap_or_else(|e| {
            // application/json needs JSON-free text? No: any UTF-8 goes as a text frame.
            panic!("{e:?}")
        });
    let (_, env) = next_event(&mut feed).await;
    assert_eq!(
        env["Payload"].as_str().unwrap().len(),
        1 << 20,
        "a 1 MiB frame is forwarded whole"
    );

    // StopPublish: frames are no longer forwarded; StartPublish again: they are.
    c.stop_publish(ws::StopPublishRequest { id: id.clone() })
        .await
        .unwrap();
    c.send_raw(raw(&id, "unseen", "text/plain")).await.unwrap();
    // The correlated round trip proves the echo of "unseen" was read.
    c.send(ws::SendRequest {
        id: id.clone(),
        message: "sync".into(),
        timeout_ms: 2000,
        ..Default::default()
    })
    .await
    .unwrap();
    c.start_publish(ws::StartPublishRequest {
        id: id.clone(),
        topic: "feed".into(),
    })
    .await
    .unwrap();
    c.send_raw(raw(&id, "seen", "text/plain")).await.unwrap();
    let (_, env) = next_event(&mut feed).await;
    assert_eq!(env["Payload"], "seen");

    let list = c
        .list(ws::ListRequest {})
        .await
        .unwrap()
        .into_inner()
        .connections;
    let me = list.iter().find(|x| x.id == id).unwrap();
    assert_eq!(
        (
            me.status.as_str(),
            me.topic.as_str(),
            me.instance_id.as_str()
        ),
        ("connected", "feed", "inst-1")
    );

    c.disconnect(ws::DisconnectRequest { id: id.clone() })
        .await
        .unwrap();
    let (kind, _) = next_lifecycle(&mut status, &id).await;
    assert_eq!(kind, "disconnected");
    let list = c
        .list(ws::ListRequest {})
        .await
        .unwrap()
        .into_inner()
        .connections;
    assert!(
        list.iter().all(|x| x.id != id),
        "a disconnected connection is forgotten"
    );
    wsm.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_answers_gives_deadline_exceeded() {
    let valkey = ValkeyServer::start();
    let api = Api::start(&valkey).await;
    let wsm = Wsm::start(api.addr, "inst-2").await;
    let mut c = wsm.client().await;
    let peer = PyPeer::start().await;
    let id = c
        .connect(connect(&peer.url("/silent"), false))
        .await
        .unwrap()
        .into_inner()
        .id;
    let started = std::time::Instant::now();
    let err = c
        .send(ws::SendRequest {
            id: id.clone(),
            message: "anyone?".into(),
            timeout_ms: 300,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("300 ms"), "{}", err.message());
    assert!(started.elapsed() >= Duration::from_millis(300));
    // The Python peer echoes on /echo: text and binary frames keep their type.
    let echo = c
        .connect(connect(&peer.url("/echo"), false))
        .await
        .unwrap()
        .into_inner()
        .id;
    let r = c
        .send(ws::SendRequest {
            id: echo,
            message: "py".into(),
            timeout_ms: 2000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.response, "py");
    wsm.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_contracted_errors() {
    let valkey = ValkeyServer::start();
    let api = Api::start(&valkey).await;
    let wsm = Wsm::start(api.addr, "inst-3").await;
    let mut c = wsm.client().await;
    for (url, code) in [
        ("", Code::InvalidArgument),
        ("http://example.com", Code::InvalidArgument),
        ("ws://", Code::InvalidArgument),
        ("not a url", Code::InvalidArgument),
    ] {
        let err = c.connect(connect(url, false)).await.unwrap_err();
        assert_eq!(err.code(), code, "{url:?}: {err:?}");
    }
    // Nothing listens there: no auto-reconnect means a clear failure.
    let closed = virtufin_testkit::free_port();
    let err = c
        .connect(connect(&format!("ws://127.0.0.1:{closed}/"), false))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        err.message().contains("cannot connect"),
        "{}",
        err.message()
    );
    assert!(
        c.list(ws::ListRequest {})
            .await
            .unwrap()
            .into_inner()
            .connections
            .is_empty(),
        "the failed connection left nothing behind"
    );

    let err = c
        .disconnect(ws::DisconnectRequest {
            id: "no-such-id".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = c.send_raw(raw("no-such-id", "x", "")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let peer = EchoPeer::start().await;
    let id = c
        .connect(connect(&peer.url(), false))
        .await
        .unwrap()
        .into_inner()
        .id;
    let err = c
        .start_publish(ws::StartPublishRequest {
            id: id.clone(),
            topic: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c
        .start_publish(ws::StartPublishRequest {
            id: id.clone(),
            topic: "not a topic".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::InvalidArgument,
        "the api's topic rules apply here too"
    );
    let err = c
        .send(ws::SendRequest {
            id: id.clone(),
            message: "x".into(),
            timeout_ms: -1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // A connection owned by another instance.
    let foreign = serde_json::json!({"id":"foreign-1","url":"ws://127.0.0.1:1/","auto_reconnect":false,"topic":null,"instance_id":"elsewhere","created_at":"2026-01-01T00:00:00Z","status":"connected"});
    api.client
        .save(
            "websocketmanager",
            "connections/foreign-1",
            &foreign.to_string(),
            "",
        )
        .await
        .unwrap();
    let err = c
        .disconnect(ws::DisconnectRequest {
            id: "foreign-1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("elsewhere"), "{}", err.message());

    // Not connected: a peer gone without auto-reconnect.
    drop(peer);
    wait_until(|| {
        let mut c = c.clone();
        let id = id.clone();
        async move {
            c.list(ws::ListRequest {})
                .await
                .unwrap()
                .into_inner()
                .connections
                .iter()
                .any(|x| x.id == id && x.status == "disconnected")
        }
    })
    .await;
    let err = c.send_raw(raw(&id, "x", "")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("not connected"), "{}", err.message());

    // REST mirrors it: malformed JSON, unknown id.
    let http = reqwest::Client::new();
    let r = http
        .post(format!("http://{}/v1/connections", wsm.http))
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = http
        .delete(format!("http://{}/v1/connections/nope", wsm.http))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    wsm.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_reconnect_and_give_up_in_causal_order() {
    let valkey = ValkeyServer::start();
    let api = Api::start(&valkey).await;
    let mut status = subscribe(&api.client, STATUS, "order-watch").await;
    let wsm = Wsm::start(api.addr, "inst-4").await;
    let mut c = wsm.client().await;
    let mut peer = PyPeer::start().await;
    let id = c
        .connect(connect(&peer.url("/drop"), true))
        .await
        .unwrap()
        .into_inner()
        .id;
    assert_eq!(next_lifecycle(&mut status, &id).await.0, "connected");
    // The peer aborts the TCP connection: error, reconnecting, connected.
    c.send_raw(raw(&id, "drop", "text/plain")).await.unwrap();
    let (k1, d1) = next_lifecycle(&mut status, &id).await;
    assert_eq!(k1, "error", "{d1}");
    assert!(
        d1["error_type"].is_string() && d1["error_message"].is_string(),
        "{d1}"
    );
    let (k2, d2) = next_lifecycle(&mut status, &id).await;
    assert_eq!(
        (k2.as_str(), &d2["attempt"]),
        ("reconnecting", &serde_json::json!(1))
    );
    assert_eq!(next_lifecycle(&mut status, &id).await.0, "connected");
    // The peer dies for good: error, reconnecting, then disconnected after
    // the last attempt (3 here).
    peer.child.kill().await.unwrap();
    let kinds: Vec<String> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(next_lifecycle(&mut status, &id).await.0);
        }
        v
    };
    assert_eq!(kinds, vec!["error", "reconnecting", "disconnected"]);
    let list = c
        .list(ws::ListRequest {})
        .await
        .unwrap()
        .into_inner()
        .connections;
    assert_eq!(
        list.iter().find(|x| x.id == id).unwrap().status,
        "disconnected"
    );
    wsm.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_restores_connections_before_ready() {
    let valkey = ValkeyServer::start();
    let api = Api::start(&valkey).await;
    let peer = EchoPeer::start().await;
    let wsm = Wsm::start(api.addr, "inst-5").await;
    let mut c = wsm.client().await;
    let id = c
        .connect(connect(&peer.url(), true))
        .await
        .unwrap()
        .into_inner()
        .id;
    c.start_publish(ws::StartPublishRequest {
        id: id.clone(),
        topic: "restored".into(),
    })
    .await
    .unwrap();
    wsm.stop().await;

    // Same instance id: once /health is 200 the connection is back.
    let wsm = Wsm::start(api.addr, "inst-5").await;
    let mut c = wsm.client().await;
    let list = c
        .list(ws::ListRequest {})
        .await
        .unwrap()
        .into_inner()
        .connections;
    let me = list
        .iter()
        .find(|x| x.id == id)
        .expect("the connection survived the restart");
    assert_eq!(
        (me.status.as_str(), me.topic.as_str()),
        ("connected", "restored")
    );
    let r = c
        .send(ws::SendRequest {
            id: id.clone(),
            message: "again".into(),
            timeout_ms: 2000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.response, "again");
    wsm.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_of_a_vanished_instance_are_reclaimed() {
    let valkey = ValkeyServer::start();
    let api = Api::start(&valkey).await;
    let peer = EchoPeer::start().await;
    let ghost = serde_json::json!({"id":"ghost-1","url":peer.url(),"auto_reconnect":true,"topic":null,"instance_id":"ghost","created_at":"2026-01-01T00:00:00Z","status":"connected"});
    api.client
        .save(
            "websocketmanager",
            "connections/ghost-1",
            &ghost.to_string(),
            "",
        )
        .await
        .unwrap();
    let mut status = subscribe(&api.client, STATUS, "reclaim-watch").await;
    let cfg = quick_reclaim(api.addr, "heir", Duration::from_millis(300));
    let wsm = Wsm::start_with(cfg).await;
    // The take-over says so: the first `connected` names the old owner.
    let (kind, data) = next_lifecycle(&mut status, "ghost-1").await;
    assert_eq!(kind, "connected", "{data}");
    assert_eq!(data["instance_id"], "heir", "{data}");
    assert_eq!(data["reclaimed_from"], "ghost", "{data}");
    let mut c = wsm.client().await;
    wait_until(|| {
        let mut c = c.clone();
        async move {
            c.list(ws::ListRequest {})
                .await
                .unwrap()
                .into_inner()
                .connections
                .iter()
                .any(|x| x.id == "ghost-1" && x.instance_id == "heir" && x.status == "connected")
        }
    })
    .await;
    let r = c
        .send(ws::SendRequest {
            id: "ghost-1".into(),
            message: "mine now".into(),
            timeout_ms: 2000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.response, "mine now");
    wsm.stop().await;
    api.stop().await;
}

/// The reclaim grace of the two-host tests (heartbeats and checks every
/// 100 ms).
const GRACE: Duration = Duration::from_millis(600);

fn quick_reclaim(
    api: std::net::SocketAddr,
    name: &str,
    grace: Duration,
) -> virtufin_websocketmanager::Config {
    let mut cfg = wsm_config(api, name);
    cfg.heartbeat_interval = Duration::from_millis(100);
    cfg.reclaim_interval = Duration::from_millis(100);
    cfg.reclaim_after = grace;
    cfg
}

/// The stored record of connection `id`.
async fn record(api: &Api, id: &str) -> serde_json::Value {
    let (rec, _) = api
        .client
        .get("websocketmanager", &format!("connections/{id}"))
        .await
        .unwrap()
        .unwrap();
    serde_json::from_str(&rec).unwrap()
}

async fn stop_two_hosts(a: Wsm, b: Wsm, api_a: Api, api_b: Api) {
    a.stop().await;
    b.stop().await;
    api_a.stop().await;
    api_b.stop().await;
}

/// Two hosts, each a websocketmanager with its own api on one Valkey.
/// Host a is cut off from the store (its api stops) longer than the
/// reclaim grace while its connection to the peer stays up: b takes the
/// connection over. Once a reaches the store again it must let go, not
/// write the record back as its own, so the peer keeps one connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_back_from_a_partition_lets_go_of_what_another_took_over() {
    let valkey = ValkeyServer::start();
    let api_a = Api::start(&valkey).await;
    let api_b = Api::start(&valkey).await;
    let peer = EchoPeer::start().await;
    let mut status = subscribe(&api_b.client, STATUS, "partition-watch").await;
    let a = Wsm::start_with(quick_reclaim(api_a.addr, "a", GRACE)).await;
    let b = Wsm::start_with(quick_reclaim(api_b.addr, "b", GRACE)).await;
    let mut ca = a.client().await;
    let id = ca
        .connect(connect(&peer.url(), true))
        .await
        .unwrap()
        .into_inner()
        .id;
    assert_eq!(next_lifecycle(&mut status, &id).await.0, "connected");

    // The partition: a's heartbeats stop reaching the store.
    let (grpc, http) = api_a.stop().await;
    let (kind, data) = next_lifecycle(&mut status, &id).await;
    assert_eq!(kind, "connected", "{data}");
    assert_eq!(data["instance_id"], "b", "{data}");
    assert_eq!(data["reclaimed_from"], "a", "{data}");
    // Until a hears of it, the peer has both (the documented window).
    wait_until(|| async { peer.open_now() == 2 }).await;

    // The heal: a lets go within a heartbeat and says who has it now.
    let api_a = Api::start_on(&valkey, grpc, http).await;
    let (kind, data) = next_lifecycle(&mut status, &id).await;
    assert_eq!(kind, "disconnected", "{data}");
    assert_eq!(data["instance_id"], "a", "{data}");
    assert_eq!(data["reclaimed_by"], "b", "{data}");
    wait_until(|| async { peer.open_now() == 1 }).await;
    // The record is still b's, and b's connection works; a's own list
    // shows it as b's.
    let rec = record(&api_b, &id).await;
    assert_eq!(rec["instance_id"], "b", "{rec}");
    assert_eq!(rec["status"], "connected", "{rec}");
    let mut cb = b.client().await;
    let r = cb
        .send(ws::SendRequest {
            id: id.clone(),
            message: "still one".into(),
            timeout_ms: 2000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.response, "still one");
    let listed = ca.list(ws::ListRequest {}).await.unwrap().into_inner();
    assert!(
        listed
            .connections
            .iter()
            .any(|x| x.id == id && x.instance_id == "b"),
        "{listed:?}"
    );
    stop_two_hosts(a, b, api_a, api_b).await;
}

/// A store outage longer than the reclaim grace (a failover, Valkey
/// restarting) silences every instance's heartbeat at once; it is no
/// host's death. Once the store is back, nobody takes anything over: a
/// reclaim waits until its own heartbeats have worked for the grace, by
/// which time the others' have too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_longer_than_the_grace_reclaims_nothing() {
    let valkey = ValkeyServer::start();
    let api_a = Api::start(&valkey).await;
    let api_b = Api::start(&valkey).await;
    let peer = EchoPeer::start().await;
    let grace = GRACE;
    let a = Wsm::start_with(quick_reclaim(api_a.addr, "a", GRACE)).await;
    let b = Wsm::start_with(quick_reclaim(api_b.addr, "b", GRACE)).await;
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let id_a = ca
        .connect(connect(&peer.url(), true))
        .await
        .unwrap()
        .into_inner()
        .id;
    let id_b = cb
        .connect(connect(&peer.url(), true))
        .await
        .unwrap()
        .into_inner()
        .id;
    let health = |w: &Wsm| format!("http://{}/health", w.http);
    let healthy = |url: String| async move {
        reqwest::get(&url)
            .await
            .map(|r| r.status().as_u16() == 200)
            .unwrap_or(false)
    };
    valkey.pause();
    // Both notice (their state round trips fail), and stay cut off for
    // more than twice the grace.
    wait_until(|| {
        let (ua, ub) = (health(&a), health(&b));
        async move { !healthy(ua).await && !healthy(ub).await }
    })
    .await;
    tokio::time::sleep(grace * 2).await;
    valkey.resume();
    wait_until(|| healthy(health(&a))).await;
    wait_until(|| healthy(health(&b))).await;
    // Several graces of reclaim checks on both sides (nothing to wait
    // for: the assertion is that nothing happens).
    tokio::time::sleep(grace * 4).await;
    for (id, owner) in [(&id_a, "a"), (&id_b, "b")] {
        let rec = record(&api_a, id).await;
        assert_eq!(rec["instance_id"], owner, "{rec}");
    }
    assert_eq!(peer.open_now(), 2);
    stop_two_hosts(a, b, api_a, api_b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_restart_loses_nothing_and_needs_no_restart_here() {
    let valkey = ValkeyServer::start();
    let api = Api::start(&valkey).await;
    let peer = EchoPeer::start().await;
    let wsm = Wsm::start(api.addr, "inst-6").await;
    let mut c = wsm.client().await;
    let id = c
        .connect(connect(&peer.url(), false))
        .await
        .unwrap()
        .into_inner()
        .id;
    c.start_publish(ws::StartPublishRequest {
        id: id.clone(),
        topic: "through-restart".into(),
    })
    .await
    .unwrap();
    // A durable group that exists before the api goes away.
    drop(subscribe(&api.client, "through-restart", "late-reader").await);

    let (grpc, http) = api.stop().await;
    // The connection stays up; frames arriving now wait in the queue.
    for i in 0..5 {
        c.send_raw(raw(&id, &format!("while-down-{i}"), "text/plain"))
            .await
            .unwrap();
    }
    let health = format!("http://{}/health", wsm.http);
    wait_until(|| {
        let h = health.clone();
        async move {
            reqwest::get(&h)
                .await
                .map(|r| r.status().as_u16() == 503)
                .unwrap_or(false)
        }
    })
    .await;

    let api = Api::start_on(&valkey, grpc, http).await;
    wait_until(|| {
        let h = health.clone();
        async move {
            reqwest::get(&h)
                .await
                .map(|r| r.status().as_u16() == 200)
                .unwrap_or(false)
        }
    })
    .await;
    let mut s = subscribe(&api.client, "through-restart", "late-reader").await;
    for i in 0..5 {
        let (_, env) = next_event(&mut s).await;
        assert_eq!(
            env["Payload"],
            format!("while-down-{i}"),
            "queued frames arrive, in order"
        );
    }
    let r = c
        .send(ws::SendRequest {
            id,
            message: "still here".into(),
            timeout_ms: 2000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.response, "still here");
    wsm.stop().await;
    api.stop().await;
}
