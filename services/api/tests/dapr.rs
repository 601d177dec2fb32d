//! The api on the Dapr backend as systemd runs it: READY only once the
//! sidecar's `/v1.0/healthz` answers and a state and a pub/sub round trip
//! through it succeed; STATUS names the sidecar meanwhile. The sidecar is
//! the Dapr double (the dapr crate's generated server over a real Valkey):
//! real daprd cannot be installed here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{net::SocketAddr, process::Stdio, time::Duration};

use tokio::process::Command;
use virtufin_api_client::ApiClient;
use virtufin_testkit::{NotifyListener, ValkeyServer, free_port};

const BIN: &str = env!("CARGO_BIN_EXE_virtufin-api");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_only_once_the_sidecar_works_and_data_lands_in_daprs_layout() {
    let notify = NotifyListener::bind();
    let (dapr_grpc, dapr_http, http, grpc) = (free_port(), free_port(), free_port(), free_port());
    let mut api = Command::new(BIN)
        .env("ASPNETCORE_URLS", format!("http://127.0.0.1:{http}"))
        .env("VIRTUFIN_GRPC_PORT", grpc.to_string())
        .env("VIRTUFIN_BACKEND", "dapr")
        .env("DAPR_GRPC_PORT", dapr_grpc.to_string())
        .env("DAPR_HTTP_PORT", dapr_http.to_string())
        .env("NOTIFY_SOCKET", notify.path())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let seen = notify
        .wait_for("STATUS=waiting for", Duration::from_secs(20))
        .await;
    assert!(seen.iter().all(|m| !m.contains("READY=1")), "{seen:?}");
    let status = seen.last().unwrap();
    assert!(
        status.contains("Dapr sidecar") && status.contains(&dapr_http.to_string()),
        "names the sidecar: {status}"
    );
    let health = reqwest::get(format!("http://127.0.0.1:{http}/health"))
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 503);

    // daprd (the double) comes up on the ports the api expects.
    let valkey = ValkeyServer::start();
    let _dapr = virtufin_dapr_double::start(
        &valkey.url(),
        "virtufin-api",
        virtufin_store::DeliveryOptions::default(),
        SocketAddr::from(([127, 0, 0, 1], dapr_grpc)),
        SocketAddr::from(([127, 0, 0, 1], dapr_http)),
    )
    .await
    .unwrap();
    notify.wait_for("READY=1", Duration::from_secs(20)).await;

    let client = ApiClient::connect(&format!("127.0.0.1:{grpc}"))
        .await
        .unwrap();
    let h = client.handshake().await.unwrap();
    assert_eq!(h.backend, "dapr");
    let etag = client
        .save("websocketmanager", "connections/x", "through-dapr", "")
        .await
        .unwrap();
    let mut r = redis::Client::open(valkey.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let fields: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg("virtufin-api||websocketmanager/connections/x")
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(fields.get("data").map(String::as_str), Some("through-dapr"));
    assert_eq!(fields.get("version"), Some(&etag));
    api.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_when_daprd_restarts() {
    let mut api = common::start(common::Kind::Dapr).await;
    common::ready(&api).await;
    let mut stream = api
        .client
        .pubsub()
        .subscribe(virtufin_api_client::pb::SubscribeRequest {
            topic: "after-restart".into(),
            subscriber: "s".into(),
            group: "g".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut dapr = api.dapr.take().unwrap();
    let (grpc, http) = (dapr.grpc, dapr.http);
    dapr.kill();
    // The api notices: the handshake fails while the sidecar is away.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while api.client.handshake().await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the api never noticed daprd going away"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let valkey_url = api.valkey.as_ref().unwrap().url();
    api.dapr = Some(
        virtufin_dapr_double::start(
            &valkey_url,
            "virtufin-api",
            virtufin_store::DeliveryOptions::default(),
            grpc,
            http,
        )
        .await
        .unwrap(),
    );
    common::ready(&api).await;
    api.client.save("ws", "k", "after", "").await.unwrap();
    assert_eq!(api.client.get("ws", "k").await.unwrap().unwrap().0, "after");
    // The subscription opened before the restart delivers again.
    let mut md = std::collections::HashMap::new();
    md.insert("ce-id".to_owned(), "after-1".to_owned());
    api.client.publish("after-restart", "x", md).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(15), stream.message())
        .await
        .expect("event after the restart")
        .unwrap()
        .unwrap();
    assert_eq!(ev.id, "after-1");
    api.stop().await;
}
