//! The Valkey layout is Dapr's own: what the api writes, Dapr's
//! state.redis / pubsub.redis would read, and the other way round. These
//! tests talk to the real valkey-server directly with the `redis` crate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{collections::HashMap, time::Duration};

use common::{Kind, ready, start};
use virtufin_api_client::pb;

async fn raw(api: &common::TestApi) -> redis::aio::MultiplexedConnection {
    let url = api.valkey.as_ref().unwrap().url();
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saved_state_is_a_dapr_state_redis_hash() {
    let api = start(Kind::Valkey).await;
    ready(&api).await;
    let mut r = raw(&api).await;
    let e1 = api
        .client
        .save(
            "websocketmanager",
            "connections/abc",
            r#"{"url":"wss://x"}"#,
            "",
        )
        .await
        .unwrap();
    let h: HashMap<String, String> = redis::cmd("HGETALL")
        .arg("virtufin-api||websocketmanager/connections/abc")
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(
        h.get("data").map(String::as_str),
        Some(r#"{"url":"wss://x"}"#)
    );
    assert_eq!(h.get("version").map(String::as_str), Some("1"));
    assert_eq!(e1, "1", "the etag is Dapr's version");
    api.client
        .save("websocketmanager", "connections/abc", "v2", &e1)
        .await
        .unwrap();
    let v: String = redis::cmd("HGET")
        .arg("virtufin-api||websocketmanager/connections/abc")
        .arg("version")
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(v, "2");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_written_by_dapr_reads_back_with_its_etag() {
    let api = start(Kind::Valkey).await;
    ready(&api).await;
    let mut r = raw(&api).await;
    let _: () = redis::cmd("HSET")
        .arg("virtufin-api||workmanager/workers/index")
        .arg("data")
        .arg("[\"w1\"]")
        .arg("version")
        .arg(7)
        .query_async(&mut r)
        .await
        .unwrap();
    let got = api
        .client
        .get("workmanager", "workers/index")
        .await
        .unwrap();
    assert_eq!(got, Some(("[\"w1\"]".to_owned(), "7".to_owned())));
    let e = api
        .client
        .save("workmanager", "workers/index", "[\"w1\",\"w2\"]", "7")
        .await
        .unwrap();
    assert_eq!(e, "8");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_added_like_dapr_pubsub_redis_reaches_a_subscriber() {
    let api = start(Kind::Valkey).await;
    ready(&api).await;
    let mut sub = api
        .client
        .pubsub()
        .subscribe(pb::SubscribeRequest {
            topic: "prices".into(),
            subscriber: "s".into(),
            group: "g".into(),
        })
        .await
        .unwrap()
        .into_inner();
    // What daprd's pubsub.redis XADDs for a publish with the default
    // CloudEvent envelope.
    let envelope = serde_json::json!({
        "specversion": "1.0",
        "id": "5929aaac-a5e2-4ca1-859c-edfe73f11565",
        "source": "some-dapr-app",
        "type": "com.dapr.event.sent",
        "datacontenttype": "application/json",
        "data": {"symbol": "EURUSD", "bid": 1.0842},
        "topic": "prices",
        "pubsubname": "pubsub",
        "traceid": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "tracestate": "",
        "time": "2026-11-29T10:00:00Z"
    });
    let mut r = raw(&api).await;
    let _: String = redis::cmd("XADD")
        .arg("prices")
        .arg("MAXLEN")
        .arg("~")
        .arg(10000)
        .arg("*")
        .arg("data")
        .arg(serde_json::to_vec(&envelope).unwrap())
        .query_async(&mut r)
        .await
        .unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(10), sub.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(ev.id, "5929aaac-a5e2-4ca1-859c-edfe73f11565");
    assert_eq!(ev.source, "some-dapr-app");
    assert_eq!(ev.r#type, "com.dapr.event.sent");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&ev.data).unwrap(),
        envelope["data"]
    );
    let ext = ev.extensions.unwrap().fields;
    assert!(ext.contains_key("traceparent") && ext.contains_key("time"));
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_events_are_stream_entries_with_a_cloudevent_in_data() {
    let api = start(Kind::Valkey).await;
    ready(&api).await;
    let mut md = HashMap::new();
    md.insert("ce-id".to_owned(), "e-1".to_owned());
    md.insert("ce-type".to_owned(), "com.example".to_owned());
    api.client.publish("audit", r#"{"a":1}"#, md).await.unwrap();
    let mut r = raw(&api).await;
    let v: Vec<(String, HashMap<String, Vec<u8>>)> = {
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg("audit")
            .arg("-")
            .arg("+")
            .query_async(&mut r)
            .await
            .unwrap();
        reply
            .ids
            .into_iter()
            .map(|e| {
                (
                    e.id,
                    e.map
                        .into_iter()
                        .map(|(k, v)| (k, redis::from_redis_value::<Vec<u8>>(v).unwrap()))
                        .collect(),
                )
            })
            .collect()
    };
    assert_eq!(v.len(), 1);
    let fields = &v[0].1;
    assert_eq!(
        fields.keys().collect::<Vec<_>>(),
        vec!["data"],
        "one field, as pubsub.redis writes"
    );
    let ce: serde_json::Value = serde_json::from_slice(&fields["data"]).unwrap();
    assert_eq!(ce["specversion"], "1.0");
    assert_eq!(ce["id"], "e-1");
    assert_eq!(ce["type"], "com.example");
    assert_eq!(ce["topic"], "audit");
    assert_eq!(ce["pubsubname"], "pubsub");
    assert_eq!(ce["data"], serde_json::json!({"a":1}));
    api.stop().await;
}
