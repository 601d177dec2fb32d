//! Python workers through a real api on a real Valkey: answers with
//! correlation and config, lifecycle events, errors, crashes, hangs,
//! blocked modules, recovery after a restart, and bad input.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use tonic::Code;
use virtufin_proto::workmanager::v1 as pb;

const ECHO: &str = r#"
def Process(event):
    return {"type": "answers", "source": "urn:echo", "data": {"got": event["data"], "region": event.get("region")}}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_worker_answers_with_config_and_correlation() {
    let s = stack().await;
    let mut status = subscribe(&s.api, "workmanager.workerstatus").await;
    let mut answers = subscribe(&s.api, "answers").await;
    let mut w = wm(&s, |_| {}).await;
    let id = w
        .client
        .create_worker(create(ECHO, "jobs", &[("region", "eu")]))
        .await
        .unwrap()
        .into_inner()
        .id;
    assert_eq!(
        lifecycle(&mut status, &id).await,
        (
            "created".into(),
            serde_json::json!({"worker_id": id, "group": id, "topic": "jobs"})
        )
    );
    w.client
        .start_worker(pb::StartWorkerRequest { id: id.clone() })
        .await
        .unwrap();
    w.client
        .start_worker(pb::StartWorkerRequest { id: id.clone() })
        .await
        .unwrap(); // idempotent
    assert_eq!(lifecycle(&mut status, &id).await.0, "started");
    publish(&s.api, "jobs", r#"{"n":1}"#, &[("ce-correlationid", "c-1")]).await;
    let a = next(&mut answers).await;
    assert_eq!(a.source, "urn:echo");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&a.data).unwrap(),
        serde_json::json!({"got": {"n": 1}, "region": "eu"})
    );
    assert_eq!(ext(&a, "correlationid").as_deref(), Some("c-1"));
    // replytopic overrides the answer's type as destination.
    let mut replies = subscribe(&s.api, "my-replies").await;
    publish(&s.api, "jobs", r#""x""#, &[("ce-replytopic", "my-replies")]).await;
    let r = next(&mut replies).await;
    assert_eq!(r.r#type, "answers");
    let list = w
        .client
        .list_workers(pb::ListWorkersRequest { filters: vec![] })
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert_eq!(list.len(), 1);
    assert_eq!(
        (list[0].status, list[0].language.as_str()),
        (pb::WorkerStatus::Running as i32, "python")
    );
    w.client
        .stop_worker(pb::StopWorkerRequest { id: id.clone() })
        .await
        .unwrap();
    assert_eq!(lifecycle(&mut status, &id).await.0, "stopped");
    w.stop().await;
    s.api_stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_crashes_hangs_and_blocked_modules_are_contained() {
    let s = stack().await;
    let mut status = subscribe(&s.api, "workmanager.workerstatus").await;
    let mut answers = subscribe(&s.api, "answers").await;
    let marker = s.state.path().join("crashed-once");
    let mut w = wm(&s, |c| c.event_timeout = Duration::from_millis(500)).await;

    // Dies mid-event the first time: the event comes again to a new process.
    let crash = r#"
import os
def Process(event):
    if not os.path.exists(event["marker"]):
        open(event["marker"], "w").close()
        os._exit(3)
    return {"type": "answers", "data": "survived"}
"#;
    let id = w
        .client
        .create_worker(create(
            crash,
            "crashy",
            &[("marker", marker.to_str().unwrap())],
        ))
        .await
        .unwrap()
        .into_inner()
        .id;
    w.client
        .start_worker(pb::StartWorkerRequest { id: id.clone() })
        .await
        .unwrap();
    publish(&s.api, "crashy", "go", &[]).await;
    let a = next(&mut answers).await;
    assert_eq!(a.data, b"survived");
    let mut kinds = Vec::new();
    loop {
        let (k, d) = lifecycle(&mut status, &id).await;
        if k == "error" {
            assert_eq!(d["error_type"], "crashed", "{d}");
            break;
        }
        kinds.push(k);
    }

    // A user exception: reported with its Python type, the worker lives on.
    let raises = "def Process(event):\n    raise ValueError('bad input ' + str(event['data']))\n";
    let id2 = create_started(&mut w.client, create(raises, "raisy", &[])).await;
    publish(&s.api, "raisy", "7", &[]).await;
    let d = first_error(&mut status, &id2).await;
    assert_eq!(d["error_type"], "ValueError", "{d}");
    assert!(
        d["error_message"].as_str().unwrap().contains("bad input 7"),
        "{d}"
    );

    // A hang: timed out, killed, reported.
    let hangs = "def Process(event):\n    while True:\n        pass\n";
    let id3 = create_started(&mut w.client, create(hangs, "hangy", &[])).await;
    publish(&s.api, "hangy", "x", &[]).await;
    let d = first_error(&mut status, &id3).await;
    assert_eq!(d["error_type"], "timeout", "{d}");

    // A blocked module: the code does not load.
    let blocked = "import subprocess\ndef Process(event):\n    return None\n";
    let id4 = create_started(&mut w.client, create(blocked, "blocky", &[])).await;
    publish(&s.api, "blocky", "x", &[]).await;
    let d = first_error(&mut status, &id4).await;
    assert_eq!(d["error_type"], "load:ImportError", "{d}");
    assert!(
        d["error_message"].as_str().unwrap().contains("not allowed"),
        "{d}"
    );

    // The workmanager itself is fine throughout.
    assert_eq!(
        reqwest::get(format!("http://{}/health", w.http))
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    w.stop().await;
    s.api_stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_workers_are_recovered_after_a_restart() {
    let s = stack().await;
    let mut answers = subscribe(&s.api, "answers").await;
    let mut w = wm(&s, |_| {}).await;
    let id = w
        .client
        .create_worker(create(ECHO, "durable", &[]))
        .await
        .unwrap()
        .into_inner()
        .id;
    w.client
        .start_worker(pb::StartWorkerRequest { id: id.clone() })
        .await
        .unwrap();
    w.stop().await;
    // While the workmanager is down, an event waits in the worker's group.
    publish(&s.api, "durable", "while-down", &[]).await;
    let mut w = wm(&s, |_| {}).await; // ready = recovery done
    let list = w
        .client
        .list_workers(pb::ListWorkersRequest { filters: vec![] })
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert_eq!(list[0].status, pb::WorkerStatus::Running as i32);
    let a = next(&mut answers).await;
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&a.data).unwrap()["got"],
        "while-down"
    );
    let h = w
        .client
        .get_worker_history(pb::GetWorkerHistoryRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(h.len(), 1);
    w.stop().await;
    s.api_stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors_and_change_nothing() {
    let s = stack().await;
    let mut w = wm(&s, |_| {}).await;
    let mut bad = create(ECHO, "t", &[]);
    bad.mime_type = "text/x-cobol".into();
    assert_eq!(
        w.client.create_worker(bad).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let mut dotnet = create(ECHO, "t", &[]);
    dotnet.mime_type = "application/x-dotnet-dll".into();
    let e = w.client.create_worker(dotnet).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains(".NET"), "{}", e.message());
    assert_eq!(
        w.client
            .create_worker(create(ECHO, "", &[]))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    let e = w
        .client
        .create_worker(create(ECHO, "bad topic", &[]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("invalid topic"), "{}", e.message());
    let mut sha = create(ECHO, "t", &[]);
    sha.code_source.as_mut().unwrap().sha256 = "00".repeat(32);
    assert_eq!(
        w.client.create_worker(sha).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let mut many = create(ECHO, "t", &[]);
    many.tags = (0..51).map(|i| (format!("k{i}"), "v".into())).collect();
    assert_eq!(
        w.client.create_worker(many).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert!(
        w.client
            .list_workers(pb::ListWorkersRequest { filters: vec![] })
            .await
            .unwrap()
            .into_inner()
            .workers
            .is_empty()
    );
    assert_eq!(
        w.client
            .start_worker(pb::StartWorkerRequest { id: "nope".into() })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    // Tags: limits and round trip.
    let id = w
        .client
        .create_worker(create(ECHO, "t", &[]))
        .await
        .unwrap()
        .into_inner()
        .id;
    w.client
        .set_tag(pb::SetTagRequest {
            id: id.clone(),
            key: "team".into(),
            value: "fx".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        w.client
            .get_tag(pb::GetTagRequest {
                id: id.clone(),
                key: "team".into()
            })
            .await
            .unwrap()
            .into_inner()
            .value,
        "fx"
    );
    let e = w
        .client
        .set_tag(pb::SetTagRequest {
            id: id.clone(),
            key: "k".repeat(129),
            value: "v".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let filtered = w
        .client
        .list_workers(pb::ListWorkersRequest {
            filters: vec![pb::TagFilter {
                key: "team".into(),
                value: "fx".into(),
            }],
        })
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert_eq!(filtered.len(), 1);
    w.client
        .delete_worker(pb::DeleteWorkerRequest { id: id.clone() })
        .await
        .unwrap();
    assert_eq!(
        w.client
            .get_tags(pb::GetTagsRequest { id })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    w.stop().await;
    s.api_stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_routes_mirror_the_rpcs() {
    let s = stack().await;
    let mut answers = subscribe(&s.api, "answers").await;
    let w = wm(&s, |_| {}).await;
    let http = reqwest::Client::new();
    let base = format!("http://{}/v1/workers", w.http);
    let r = http
        .post(&base)
        .body(serde_json::json!({"code": ECHO, "mime_type": "text/x-python", "topic": "rest-jobs", "tags": {"team": "fx"}}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let id = r.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        http.post(format!("{base}/{id}/start"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    publish(&s.api, "rest-jobs", "via-rest", &[]).await;
    let a = next(&mut answers).await;
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&a.data).unwrap()["got"],
        "via-rest"
    );
    let one: serde_json::Value = http
        .get(format!("{base}/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (one["status"].as_str(), one["tags"]["team"].as_str()),
        (Some("running"), Some("fx"))
    );
    let r = http
        .put(format!("{base}/{id}/tags/env"))
        .body(r#"{"value":"prod"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let t: serde_json::Value = http
        .get(format!("{base}/{id}/tags/env"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(t["value"], "prod");
    // Bad input: malformed JSON, ambiguous code, unknown worker.
    assert_eq!(
        http.post(&base).body("{").send().await.unwrap().status(),
        400
    );
    let both = serde_json::json!({"code": "x", "code_base64": "eA==", "mime_type": "text/x-python", "topic": "t"});
    assert_eq!(
        http.post(&base)
            .body(both.to_string())
            .send()
            .await
            .unwrap()
            .status(),
        400
    );
    assert_eq!(
        http.get(format!("{base}/nope"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(
        http.delete(format!("{base}/{id}"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let list: serde_json::Value = http.get(&base).send().await.unwrap().json().await.unwrap();
    assert_eq!(list["workers"].as_array().unwrap().len(), 0);
    w.stop().await;
    s.api_stop.cancel();
}
