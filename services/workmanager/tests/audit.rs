//! Audit lines name who asked and carry a correlation id: through the api's
//! Gateway (which passes on the caller it authenticated and the request's
//! correlation id) and directly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use base64::Engine as _;
use serde_json::json;
use virtufin_api_client::pb as api_pb;
use virtufin_proto::workmanager::v1 as pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn audit_lines_name_the_caller_and_the_correlation_id() {
    virtufin_testkit::logs::capture();
    let lines_with = virtufin_testkit::logs::lines_with;

    let s = common::stack().await;
    let wm = common::wm(&s, |_| {}).await;
    // The workmanager as a Gateway backend of the api (hot reload).
    common::gateway_backend(&s, &wm).await;

    // Through the Gateway, with the caller's correlation id.
    let code =
        base64::engine::general_purpose::STANDARD.encode("def Process(event):\n    return None\n");
    let mut req = tonic::Request::new(api_pb::InvokeJsonRequest {
        service: "workmanager".into(),
        method: "CreateWorker".into(),
        request_data: json!({"codeSource": {"content": code}, "mimeType": "text/x-python", "topic": "audit-jobs"}).to_string(),
        timeout_ms: 0,
    });
    req.metadata_mut()
        .insert("x-correlation-id", "corr-audit-1".parse().unwrap());
    let r = s.api.gateway().invoke_json(req).await.unwrap().into_inner();
    let id = serde_json::from_str::<serde_json::Value>(&r.response_data).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let wm_lines = lines_with(&["worker created", &id, "corr-audit-1"]);
    assert_eq!(wm_lines.len(), 1, "{wm_lines:?}");
    assert!(
        wm_lines[0].contains("caller=anonymous"),
        "auth is off: {}",
        wm_lines[0]
    );
    let api_lines = lines_with(&["gateway call", "CreateWorker", "corr-audit-1"]);
    assert_eq!(
        api_lines.len(),
        1,
        "the api's line shares the id: {api_lines:?}"
    );

    // Directly: "local", with a fresh correlation id.
    let mut c = wm.client.clone();
    c.start_worker(pb::StartWorkerRequest { id: id.clone() })
        .await
        .unwrap();
    let started = lines_with(&["worker started", &id]);
    assert_eq!(started.len(), 1, "{started:?}");
    assert!(started[0].contains("caller=local"), "{}", started[0]);
    assert!(started[0].contains("correlation_id="), "{}", started[0]);
    wm.stop().await;
}
