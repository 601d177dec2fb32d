//! The api with real daprd (packaging/daprd, the deployment's resource
//! files): READY only once the sidecar works, recovery when daprd is
//! killed, and interop both ways on one Valkey between the api's direct
//! Valkey backend and Dapr itself (state, and events of every content
//! type). Every case says SKIP where there is no daprd.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{collections::HashMap, process::Stdio, time::Duration};

use common::{CONTENT_TYPES, Kind};
use dapr::dapr::proto::{common::v1 as dcommon, runtime::v1 as drt};
use tokio::process::Command;
use virtufin_api_client::ApiClient;
use virtufin_testkit::{
    NotifyListener, ValkeyServer,
    daprd::{self, Daprd, DaprdOptions},
    free_port,
};

const BIN: &str = env!("CARGO_BIN_EXE_virtufin-api");
const WAIT: Duration = Duration::from_secs(15);

type DaprClient = drt::dapr_client::DaprClient<tonic::transport::Channel>;

async fn dapr_client(d: &Daprd) -> DaprClient {
    DaprClient::connect(format!("http://127.0.0.1:{}", d.grpc_port))
        .await
        .unwrap()
}

async fn hgetall(valkey: &ValkeyServer, key: &str) -> HashMap<String, String> {
    let mut r = redis::Client::open(valkey.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd("HGETALL")
        .arg(key)
        .query_async(&mut r)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_only_once_the_sidecar_works_and_data_lands_in_daprs_layout() {
    let Some(binary) = daprd::require("the api's readiness on real daprd") else {
        return;
    };
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

    // daprd comes up on the ports the api expects.
    let valkey = ValkeyServer::start();
    let _dapr = Daprd::start_on(
        &binary,
        valkey.port,
        dapr_grpc,
        dapr_http,
        DaprdOptions::default(),
    );
    notify.wait_for("READY=1", Duration::from_secs(20)).await;

    let client = ApiClient::connect(&format!("127.0.0.1:{grpc}"))
        .await
        .unwrap();
    let h = client.handshake().await.unwrap();
    assert_eq!(h.backend, "dapr");
    let e1 = client
        .save("websocketmanager", "connections/x", "through-dapr", "")
        .await
        .unwrap();
    let e2 = client
        .save("websocketmanager", "connections/x", "guarded", &e1)
        .await
        .unwrap();
    let fields = hgetall(&valkey, "virtufin-api||websocketmanager/connections/x").await;
    assert_eq!(fields.get("data").map(String::as_str), Some("guarded"));
    assert_eq!(fields.get("version"), Some(&e2));
    assert_eq!(
        fields.len(),
        2,
        "only data and version (no first-write marker after a guarded save): {fields:?}"
    );
    // An unguarded save after a guarded one still works.
    client
        .save("websocketmanager", "connections/x", "plain", "")
        .await
        .unwrap();
    api.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovers_when_daprd_is_killed() {
    if daprd::require("the api's recovery from a killed daprd").is_none() {
        return;
    }
    let mut api = common::start(Kind::Dapr).await;
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
    dapr.kill();
    // The api notices: the handshake fails while the sidecar is away, and
    // /health says why.
    let deadline = tokio::time::Instant::now() + WAIT;
    while api.client.handshake().await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the api never noticed daprd going away"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let health = reqwest::get(api.http_url("/health")).await.unwrap();
    assert_eq!(health.status().as_u16(), 503);
    dapr.restart();
    api.dapr = Some(dapr);
    common::ready(&api).await;
    api.client.save("ws", "k", "after", "").await.unwrap();
    assert_eq!(api.client.get("ws", "k").await.unwrap().unwrap().0, "after");
    // The subscription opened before the crash delivers again.
    let mut md = HashMap::new();
    md.insert("ce-id".to_owned(), "after-1".to_owned());
    api.client.publish("after-restart", "x", md).await.unwrap();
    let ev = tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("event after the restart")
        .unwrap()
        .unwrap();
    assert_eq!(ev.id, "after-1");
    api.stop().await;
}

/// The api on its direct Valkey backend and a daprd (app id virtufin-api)
/// on the same Valkey.
async fn direct_api_beside_daprd() -> Option<(common::TestApi, Daprd, DaprClient)> {
    let binary = daprd::require("interop between the direct backend and daprd")?;
    let api = common::start(Kind::Valkey).await;
    common::ready(&api).await;
    let d = Daprd::start(
        &binary,
        api.valkey.as_ref().unwrap(),
        DaprdOptions::default(),
    );
    let client = dapr_client(&d).await;
    Some((api, d, client))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_written_by_either_side_reads_on_the_other() {
    let Some((api, _d, mut dapr)) = direct_api_beside_daprd().await else {
        return;
    };
    let etag = api.client.save("svc", "from-api", "A", "").await.unwrap();
    let got = dapr
        .get_state(drt::GetStateRequest {
            store_name: "statestore".into(),
            key: "svc/from-api".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (got.data.as_slice(), got.etag.as_str()),
        (&b"A"[..], etag.as_str())
    );

    dapr.save_state(drt::SaveStateRequest {
        store_name: "statestore".into(),
        states: vec![dcommon::StateItem {
            key: "svc/from-dapr".into(),
            value: b"D".to_vec(),
            ..Default::default()
        }],
    })
    .await
    .unwrap();
    let (value, etag) = api.client.get("svc", "from-dapr").await.unwrap().unwrap();
    assert_eq!((value.as_str(), etag.as_str()), ("D", "1"));
    // And the api's etag guard holds on what Dapr wrote.
    api.client
        .save("svc", "from-dapr", "D2", "1")
        .await
        .unwrap();
    let err = api
        .client
        .save("svc", "from-dapr", "D3", "1")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, virtufin_api_client::ClientError::Status(s) if s.code() == tonic::Code::Aborted),
        "{err:?}"
    );
    api.stop().await;
}

async fn dapr_subscribe(
    dapr: &mut DaprClient,
    topic: &str,
) -> (
    tokio::sync::mpsc::Sender<drt::SubscribeTopicEventsRequestAlpha1>,
    tonic::Streaming<drt::SubscribeTopicEventsResponseAlpha1>,
) {
    use drt::subscribe_topic_events_request_alpha1::SubscribeTopicEventsRequestType as Req;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(drt::SubscribeTopicEventsRequestAlpha1 {
        subscribe_topic_events_request_type: Some(Req::InitialRequest(
            drt::SubscribeTopicEventsRequestInitialAlpha1 {
                pubsub_name: "pubsub".into(),
                topic: topic.into(),
                ..Default::default()
            },
        )),
    })
    .await
    .unwrap();
    let mut stream = dapr
        .subscribe_topic_events_alpha1(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().expect("initial response");
    (tx, stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_the_api_publishes_reach_a_dapr_subscriber_with_their_data() {
    use drt::{
        subscribe_topic_events_request_alpha1::SubscribeTopicEventsRequestType as Req,
        subscribe_topic_events_response_alpha1::SubscribeTopicEventsResponseType as Resp,
    };
    let Some((api, _d, mut dapr)) = direct_api_beside_daprd().await else {
        return;
    };
    let (acks, mut stream) = dapr_subscribe(&mut dapr, "to-dapr").await;
    for (i, (ct, data)) in CONTENT_TYPES.iter().enumerate() {
        let mut md = HashMap::new();
        md.insert("ce-datacontenttype".to_owned(), (*ct).to_owned());
        md.insert("ce-id".to_owned(), format!("d{i}"));
        api.client.publish("to-dapr", data, md).await.unwrap();
    }
    let mut got = HashMap::new();
    while got.len() < CONTENT_TYPES.len() {
        let m = tokio::time::timeout(WAIT, stream.message())
            .await
            .expect("daprd delivers in time")
            .unwrap()
            .unwrap();
        if let Some(Resp::EventMessage(ev)) = m.subscribe_topic_events_response_type {
            acks.send(drt::SubscribeTopicEventsRequestAlpha1 {
                subscribe_topic_events_request_type: Some(Req::EventProcessed(
                    drt::SubscribeTopicEventsRequestProcessedAlpha1 {
                        id: ev.id.clone(),
                        status: Some(drt::TopicEventResponse { status: 0 }),
                    },
                )),
            })
            .await
            .unwrap();
            got.insert(ev.id.clone(), ev);
        }
    }
    for (i, (ct, data)) in CONTENT_TYPES.iter().enumerate() {
        let ev = &got[&format!("d{i}")];
        assert_eq!(ev.data_content_type, *ct);
        let want = match *ct {
            // daprd re-encodes JSON values: compare as JSON.
            "application/json"
            | "application/json; charset=utf-8"
            | "application/cloudevents+json" => {
                assert_eq!(
                    serde_json::from_slice::<serde_json::Value>(&ev.data).unwrap(),
                    serde_json::from_str::<serde_json::Value>(data).unwrap(),
                    "{ct}"
                );
                continue;
            }
            _ => data.as_bytes(),
        };
        assert_eq!(ev.data, want, "{ct}: Dapr hands over the published bytes");
    }
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_dapr_publishes_reach_the_api_with_their_data() {
    let Some((api, _d, mut dapr)) = direct_api_beside_daprd().await else {
        return;
    };
    let mut sub = api
        .client
        .pubsub()
        .subscribe(virtufin_api_client::pb::SubscribeRequest {
            topic: "from-dapr".into(),
            subscriber: "r".into(),
            group: "g".into(),
        })
        .await
        .unwrap()
        .into_inner();
    // application/cloudevents+json would tell daprd that the data IS an
    // envelope: not a payload type from this side.
    let types: Vec<_> = CONTENT_TYPES
        .iter()
        .filter(|(ct, _)| *ct != "application/cloudevents+json")
        .collect();
    for (ct, data) in &types {
        dapr.publish_event(drt::PublishEventRequest {
            pubsub_name: "pubsub".into(),
            topic: "from-dapr".into(),
            data: data.as_bytes().to_vec(),
            data_content_type: (*ct).to_owned(),
            metadata: HashMap::new(),
        })
        .await
        .unwrap();
    }
    for (ct, data) in &types {
        let ev = tokio::time::timeout(WAIT, sub.message())
            .await
            .expect("the api delivers in time")
            .unwrap()
            .unwrap();
        assert_eq!(ev.data_content_type, **ct);
        if ct.starts_with("application/json") {
            assert_eq!(
                serde_json::from_slice::<serde_json::Value>(&ev.data).unwrap(),
                serde_json::from_str::<serde_json::Value>(data).unwrap(),
                "{ct}"
            );
        } else {
            assert_eq!(String::from_utf8_lossy(&ev.data), **data, "{ct}");
        }
    }
    api.stop().await;
}
