//! The Gateway and API keys against real backends: a real
//! websocketmanager (which itself presents its own key to this api), a
//! second real api (server-streaming Subscribe), a real gRPC server without
//! reflection, and a port nobody listens on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use common::{Kind, TestApi};
use serde_json::{Value, json};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use virtufin_api_client::{ApiClient, pb};
use virtufin_testkit::files::{Rewrite, rewrite};

const ADMIN_KEY: &str = "admin-0123456789abcdef0123456789";
const WSM_KEY: &str = "wsm-0123456789abcdef0123456789ab";
const WM_ONLY_KEY: &str = "wmonly-0123456789abcdef012345678";

// --- the set-up ------------------------------------------------------------

struct Setup {
    api: TestApi,
    /// The second api, a backend of the first (no keys).
    backend_api: TestApi,
    wsm_shutdown: CancellationToken,
    services_file: PathBuf,
    _dir: tempfile::TempDir,
    down_port: u16,
    noreflect: SocketAddr,
}

impl Setup {
    fn client(&self, key: Option<&str>) -> ApiClient {
        ApiClient::lazy(&self.api.grpc.to_string())
            .unwrap()
            .with_key(key)
            .unwrap()
    }

    fn http(&self, path: &str) -> String {
        self.api.http_url(path)
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.wsm_shutdown.cancel();
    }
}

/// A real gRPC server that serves only `grpc.health.v1` (no reflection).
async fn start_without_reflection() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    addr
}

fn services_json(
    wsm: SocketAddr,
    backend_api: SocketAddr,
    down: u16,
    noreflect: SocketAddr,
) -> Value {
    json!({"services": [
        {"name": "websocketmanager", "grpc": {"host": "127.0.0.1", "port": wsm.port(), "reflectionEnabled": true},
         "state": {"storeName": "statestore"}, "pubsub": {"pubsubName": "pubsub"}},
        {"name": "backendapi", "grpc": {"host": "127.0.0.1", "port": backend_api.port(), "reflectionEnabled": true}},
        {"name": "down", "grpc": {"host": "127.0.0.1", "port": down, "reflectionEnabled": true},
         "resilience": {"timeoutMs": 1000, "retries": 1, "retryBackoffMs": 10, "breakerFailures": 2, "breakerCooldownMs": 60000}},
        {"name": "noreflect", "grpc": {"host": "127.0.0.1", "port": noreflect.port(), "reflectionEnabled": true}},
        {"name": "disabled", "grpc": {"host": "127.0.0.1", "port": noreflect.port(), "reflectionEnabled": false}},
    ]})
}

async fn setup() -> Setup {
    virtufin_testkit::logs::capture();
    let dir = tempfile::tempdir().unwrap();
    let backend_api = common::start(Kind::Memory).await;
    common::ready(&backend_api).await;
    let noreflect = start_without_reflection().await;
    let down_port = virtufin_testkit::free_port();

    // The wsm's port is needed in the services file before it starts (it
    // needs the api first), so bind its gRPC listener now.
    let wsm_grpc = virtufin_testkit::free_port();
    let services_file = dir.path().join("services.json");
    std::fs::write(
        &services_file,
        services_json(
            SocketAddr::from(([127, 0, 0, 1], wsm_grpc)),
            backend_api.grpc,
            down_port,
            noreflect,
        )
        .to_string(),
    )
    .unwrap();
    let keys_file = dir.path().join("keys.yaml");
    std::fs::write(
        &keys_file,
        format!(
            "keys:\n  - name: admin\n    key: {ADMIN_KEY}\n  - name: wsm\n    key: {WSM_KEY}\n    services: [websocketmanager]\n  - name: wm-only\n    key: {WM_ONLY_KEY}\n    services: [workmanager]\n"
        ),
    )
    .unwrap();
    let (sf, kf) = (services_file.clone(), keys_file.clone());
    let api = common::start_with(Kind::Memory, move |c| {
        c.services_config = Some(sf);
        c.services_reload_interval = Duration::from_millis(50);
        c.api_keys_file = Some(kf);
        c.cors_origins = vec!["https://app.example".into()];
    })
    .await;
    // The handshake (Health) needs no key.
    common::ready(&api).await;

    // A real websocketmanager presenting its own key to this api.
    let mut wc = virtufin_websocketmanager::Config::defaults();
    wc.http_urls =
        virtufin_websocketmanager::config::ListenUrls(vec!["127.0.0.1:0".parse().unwrap()]);
    wc.http_port = None;
    wc.grpc_port = wsm_grpc;
    wc.grpc_host = "127.0.0.1".parse().unwrap();
    wc.link.api_host = "127.0.0.1".into();
    wc.link.api_grpc_port = api.grpc.port();
    wc.link.api_key = Some(WSM_KEY.into());
    wc.link.probe_interval = Duration::from_millis(100);
    wc.instance_id = Some("gw-test".into());
    wc.drain_timeout = Duration::from_secs(1);
    let listeners = virtufin_websocketmanager::bind(&wc).await.unwrap();
    let wsm_http = listeners.http_addrs()[0];
    let wsm_shutdown = CancellationToken::new();
    tokio::spawn(virtufin_websocketmanager::run(
        wc,
        listeners,
        wsm_shutdown.clone(),
    ));
    // Ready means it did its state round trip through this api with its key.
    let url = format!("http://{wsm_http}/health");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if reqwest::get(&url)
            .await
            .map(|r| r.status() == 200)
            .unwrap_or(false)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "websocketmanager never ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Setup {
        api,
        backend_api,
        wsm_shutdown,
        services_file,
        _dir: dir,
        down_port,
        noreflect,
    }
}

async fn invoke(c: &ApiClient, service: &str, method: &str, data: Value) -> pb::InvokeResponse {
    c.gateway()
        .invoke(pb::InvokeRequest {
            service: service.into(),
            method: method.into(),
            request_data: data.to_string(),
            timeout_ms: 0,
        })
        .await
        .unwrap()
        .into_inner()
}

async fn invoke_err(c: &ApiClient, service: &str, method: &str, data: &str) -> tonic::Status {
    c.gateway()
        .invoke(pb::InvokeRequest {
            service: service.into(),
            method: method.into(),
            request_data: data.into(),
            timeout_ms: 0,
        })
        .await
        .unwrap_err()
}

/// Asserts a refusal's code and that its message says `needle`.
fn refused(e: &tonic::Status, code: tonic::Code, needle: &str) {
    assert_eq!(e.code(), code, "{}", e.message());
    assert!(e.message().contains(needle), "{}", e.message());
}

// --- tests -----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gateway_calls_real_backends_over_grpc_and_rest() {
    let s = setup().await;
    let c = s.client(Some(ADMIN_KEY));

    let list = c
        .gateway()
        .list_services(pb::ListServicesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        list.services,
        vec![
            "backendapi",
            "disabled",
            "down",
            "noreflect",
            "websocketmanager"
        ]
    );

    let methods = c
        .gateway()
        .list_methods(pb::ListMethodsRequest {
            service: "websocketmanager".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .methods;
    let connect = methods
        .iter()
        .find(|m| m.full_name == "virtufin.websocketmanager.v1.WebSocketManager/Connect")
        .expect("Connect listed");
    assert_eq!(
        connect.input_type,
        "virtufin.websocketmanager.v1.ConnectRequest"
    );
    assert!(!connect.is_server_streaming);

    // JSON -> protobuf -> the real websocketmanager -> protobuf -> JSON.
    let peer = virtufin_testkit::ws_echo().await;
    let r = invoke(
        &c,
        "websocketmanager",
        "Connect",
        json!({"url": peer, "autoReconnect": false}),
    )
    .await;
    assert!(r.success, "{r:?}");
    let connected: Value = serde_json::from_str(&r.response_data).unwrap();
    let id = connected["id"].as_str().expect("an id").to_owned();
    let r = invoke(&c, "websocketmanager", "WebSocketManager/List", json!({})).await;
    assert!(r.success, "{r:?}");
    let listed: Value = serde_json::from_str(&r.response_data).unwrap();
    assert!(
        listed["connections"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["id"] == id.as_str() && x["url"] == peer.as_str()),
        "{listed}"
    );

    // The backend's own error: in-band for Invoke, the status for InvokeJson.
    let r = invoke(
        &c,
        "websocketmanager",
        "Disconnect",
        json!({"id": "no-such-id"}),
    )
    .await;
    assert!(!r.success);
    assert_eq!(r.status, "NOT_FOUND", "{r:?}");
    let e = c
        .invoke("websocketmanager", "Disconnect", r#"{"id":"no-such-id"}"#)
        .await
        .unwrap_err();
    assert!(
        matches!(e, virtufin_api_client::ClientError::Status(ref s) if s.code() == tonic::Code::NotFound),
        "{e}"
    );
    let ok = c
        .invoke(
            "websocketmanager",
            "Disconnect",
            &json!({"id": id}).to_string(),
        )
        .await
        .unwrap();
    assert_eq!(ok, "{}");

    // Schema of the input.
    let schema = c
        .gateway()
        .get_method_schema(pb::GetMethodSchemaRequest {
            service: "websocketmanager".into(),
            method: "Connect".into(),
            r#type: "input".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let input: Value = serde_json::from_str(&schema.input_schema).unwrap();
    let names: Vec<&str> = input["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["url", "auto_reconnect"]);
    assert_eq!(schema.output_schema, "");

    // Server streaming: Subscribe on the backend api, then publish there.
    let mut stream = c
        .gateway()
        .invoke_stream(pb::InvokeRequest {
            service: "backendapi".into(),
            method: "virtufin.api.v1.Pubsub/Subscribe".into(),
            request_data: json!({"topic": "gw-topic", "subscriber": "gw-sub"}).to_string(),
            timeout_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    // The signal that the backend subscribed: its subscription list.
    let subs = s.backend_api.http_url("/v1/pubsub/subscriptions");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let v: Value = reqwest::get(&subs).await.unwrap().json().await.unwrap();
        if v["count"].as_u64() == Some(1) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.backend_api
        .client
        .publish("gw-topic", "hello-through-gateway", Default::default())
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("an event through the gateway stream")
        .unwrap()
        .unwrap();
    assert!(first.success);
    let ev: Value = serde_json::from_str(&first.response_data).unwrap();
    assert_eq!(ev["topic"], "gw-topic");
    // bytes are base64 in protobuf JSON.
    assert_eq!(ev["data"], "aGVsbG8tdGhyb3VnaC1nYXRld2F5");

    // REST mirrors.
    let http = reqwest::Client::new();
    let get = |p: &str| http.get(s.http(p)).header("x-api-key", ADMIN_KEY).send();
    let v: Value = get("/v1/gateway/list-services")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["services"].as_array().unwrap().len(), 5);
    assert_eq!(v["config"]["error"], Value::Null);
    let v: Value = get("/v1/gateway/list-methods?service=websocketmanager")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        v["methods"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "Send")
    );
    let v: Value = get("/v1/grpc/websocketmanager/methods")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(v["methods"].as_array().unwrap().len() >= 7);
    let v: Value = get("/v1/grpc/websocketmanager/schema/WebSocketManager/Send")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        v["method"]["full_name"],
        "virtufin.websocketmanager.v1.WebSocketManager/Send"
    );
    assert!(
        v["input_schema"]["fields"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["name"] == "timeout_ms" && f["type"] == "int32")
    );
    let r = http
        .post(s.http("/v1/gateway/invoke"))
        .header("x-api-key", ADMIN_KEY)
        .json(&json!({"service": "websocketmanager", "method": "List", "request": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["success"], true);
    let r = http
        .post(s.http("/v1/gateway/invoke"))
        .header("x-api-key", ADMIN_KEY)
        .json(&json!({"service": "websocketmanager", "method": "Disconnect", "request": {"id": "nope"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], "NOT_FOUND");

    // Audit lines name the caller.
    assert!(!virtufin_testkit::logs::lines_with(&["gateway call", "admin", "Connect"]).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gateway_refuses_bad_requests_and_protects_itself_from_bad_backends() {
    let s = setup().await;
    let c = s.client(Some(ADMIN_KEY));

    use tonic::Code;
    // (service, method, request, code, what the message must say)
    let cases = [
        (
            "nosuch",
            "List",
            "{}",
            Code::NotFound,
            "configured: backendapi",
        ),
        // Lists what exists.
        (
            "websocketmanager",
            "Frobnicate",
            "{}",
            Code::NotFound,
            "WebSocketManager/Connect",
        ),
        (
            "websocketmanager",
            "Connect",
            "{\"url\": ",
            Code::InvalidArgument,
            "not valid JSON for virtufin.websocketmanager.v1.ConnectRequest",
        ),
        // An unknown field, a wrong type.
        (
            "websocketmanager",
            "Connect",
            r#"{"uri": "ws://x"}"#,
            Code::InvalidArgument,
            "uri",
        ),
        (
            "websocketmanager",
            "Connect",
            r#"{"url": 5}"#,
            Code::InvalidArgument,
            "ConnectRequest",
        ),
        (
            "backendapi",
            "SubscribeTopicEvents",
            "{}",
            Code::Unimplemented,
            "client-streaming",
        ),
        (
            "",
            "List",
            "{}",
            Code::InvalidArgument,
            "service is required",
        ),
        // A backend without reflection, and one with reflection switched off.
        (
            "noreflect",
            "Check",
            "{}",
            Code::FailedPrecondition,
            "does not serve gRPC reflection",
        ),
        (
            "disabled",
            "Check",
            "{}",
            Code::FailedPrecondition,
            "reflectionEnabled: false",
        ),
    ];
    for (service, method, data, code, needle) in cases {
        let e = invoke_err(&c, service, method, data).await;
        refused(&e, code, needle);
    }
    let _ = s.noreflect;

    // Unreachable: the backend's failure comes back in-band; after two the
    // circuit opens, calls are refused at once, and /health says so while
    // the api stays ready.
    for _ in 0..2 {
        let r = invoke(&c, "down", "List", json!({})).await;
        assert!(!r.success);
        assert_eq!(r.status, "UNAVAILABLE", "{r:?}");
        assert!(
            r.message.contains(&format!("{}", s.down_port)) || r.message.contains("unreachable"),
            "{r:?}"
        );
    }
    let r = invoke(&c, "down", "List", json!({})).await;
    assert_eq!(r.status, "UNAVAILABLE");
    assert!(
        r.message.contains("circuit to service 'down' is open"),
        "{r:?}"
    );
    let list = c
        .gateway()
        .list_services(pb::ListServicesRequest {})
        .await
        .unwrap()
        .into_inner();
    let down = list.details.iter().find(|d| d.name == "down").unwrap();
    assert_eq!(down.circuit, "open");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let r = reqwest::get(s.http("/health")).await.unwrap();
        assert_eq!(
            r.status(),
            200,
            "an open circuit does not make the api unready"
        );
        let v: Value = r.json().await.unwrap();
        if v["checks"]["gateway:down"]["status"] == "Degraded" {
            assert_eq!(v["status"], "Degraded");
            assert_eq!(v["checks"]["gateway:websocketmanager"]["status"], "Healthy");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls the REST list until `check` holds (the reload is observed, not
/// waited for blindly).
async fn until_listed(s: &Setup, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let v: Value = reqwest::Client::new()
            .get(s.http("/v1/gateway/list-services"))
            .header("x-api-key", ADMIN_KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if check(&v) {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "never: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn services_file_is_reloaded_and_a_broken_one_keeps_the_last_good() {
    let s = setup().await;
    let mut file: Value =
        serde_json::from_str(&std::fs::read_to_string(&s.services_file).unwrap()).unwrap();
    file["services"].as_array_mut().unwrap().push(
        json!({"name": "extra", "grpc": {"host": "127.0.0.1", "port": s.backend_api.grpc.port()}}),
    );
    std::fs::write(&s.services_file, file.to_string()).unwrap();
    until_listed(&s, |v| {
        v["services"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n == "extra")
    })
    .await;
    // The new backend works at once.
    let r = invoke(
        &s.client(Some(ADMIN_KEY)),
        "extra",
        "Health/HealthCheck",
        json!({}),
    )
    .await;
    assert!(r.success, "{r:?}");

    // `std::fs::write` truncates, then writes: a reload that looks in
    // between (seen under load) rightly reports an empty file first, so wait
    // for this file's own error rather than for any error.
    std::fs::write(&s.services_file, "{\"services\": [ {\"name\": ").unwrap();
    let v = until_listed(&s, |v| {
        v["config"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("not valid JSON or YAML"))
    })
    .await;
    assert!(
        v["services"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n == "extra"),
        "last good kept: {v}"
    );
    let h: Value = reqwest::get(s.http("/health"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h["checks"]["services-file"]["status"], "Degraded", "{h}");

    // YAML, and a file whose content is wrong (a name twice).
    std::fs::write(
        &s.services_file,
        "services:\n  - {name: a, grpc: {host: h, port: 1}}\n  - {name: a}\n",
    )
    .unwrap();
    let v = until_listed(&s, |v| {
        v["config"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("listed twice"))
    })
    .await;
    assert!(
        v["services"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n == "extra")
    );
    std::fs::write(
        &s.services_file,
        format!(
            "services:\n  - name: only\n    grpc: {{host: 127.0.0.1, port: {}}}\n",
            s.backend_api.grpc.port()
        ),
    )
    .unwrap();
    let v = until_listed(&s, |v| v["services"] == json!(["only"])).await;
    assert_eq!(v["config"]["error"], Value::Null);
}

/// A server-streaming method that never ends (grpc.health.v1.Health/Watch
/// here) called by Invoke, which collects the messages: the deadline ends
/// the call with DEADLINE_EXCEEDED. Found by the `rest_api` fuzz target:
/// the deadline only bounded the stream's opening, so the call (and the
/// REST request) stayed open for good. InvokeStream with a timeout ends
/// the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_that_never_ends_is_cut_at_the_deadline() {
    let s = setup().await;
    let c = s.client(Some(ADMIN_KEY));
    let watch = pb::InvokeRequest {
        service: "backendapi".into(),
        method: "grpc.health.v1.Health/Watch".into(),
        request_data: "{}".into(),
        timeout_ms: 300,
    };
    // Only a guard against hanging for good (what the defect did).
    let guard = Duration::from_secs(60);
    let r = tokio::time::timeout(guard, c.gateway().invoke(watch.clone()))
        .await
        .expect("Invoke of a never-ending stream hung past its deadline")
        .unwrap()
        .into_inner();
    assert!(!r.success, "{r:?}");
    assert_eq!(r.status, "DEADLINE_EXCEEDED", "{r:?}");
    assert!(
        r.message.contains("InvokeStream"),
        "says what to use: {r:?}"
    );

    let rest = tokio::time::timeout(
        guard,
        reqwest::Client::new()
            .post(s.http("/v1/gateway/invoke"))
            .header("x-api-key", ADMIN_KEY)
            .json(&json!({"service": "backendapi", "method": "Watch", "requestData": "", "timeoutMs": 300}))
            .send(),
    )
    .await
    .expect("REST invoke of a never-ending stream hung")
    .unwrap();
    assert_eq!(rest.status(), 504, "{:?}", rest.text().await);

    let mut stream = c.gateway().invoke_stream(watch).await.unwrap().into_inner();
    let ended = tokio::time::timeout(guard, async {
        let mut last = None;
        while let Some(item) = stream.next().await {
            last = Some(item);
        }
        last
    })
    .await
    .expect("InvokeStream with a timeout never ended");
    match ended {
        Some(Err(e)) => assert_eq!(e.code(), tonic::Code::DeadlineExceeded, "{e}"),
        Some(Ok(r)) => assert_eq!(r.status, "DEADLINE_EXCEEDED", "{r:?}"),
        None => panic!("no message and no status"),
    }
}

/// Calls through the Gateway never see a missing backend while the
/// services file is rewritten in every way operators do (in place, slowly,
/// by rename, deleted and created again; JSON and YAML), and each new
/// version is taken once written. Before the settled read, an empty file
/// read mid-rewrite was taken as "no backends".
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_never_see_a_missing_backend_while_the_services_file_changes() {
    let s = setup().await;
    let base: Value =
        serde_json::from_str(&std::fs::read_to_string(&s.services_file).unwrap()).unwrap();
    let stop = CancellationToken::new();
    let (calls, failures) = (
        Arc::new(std::sync::atomic::AtomicU64::new(0)),
        Arc::new(std::sync::Mutex::new(Vec::<String>::new())),
    );
    let mut callers = Vec::new();
    for _ in 0..2 {
        let (c, stop, calls, failures) = (
            s.client(Some(ADMIN_KEY)),
            stop.clone(),
            calls.clone(),
            failures.clone(),
        );
        callers.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                let r = c
                    .gateway()
                    .invoke(pb::InvokeRequest {
                        service: "backendapi".into(),
                        method: "Health/HealthCheck".into(),
                        request_data: "{}".into(),
                        timeout_ms: 0,
                    })
                    .await;
                calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                match r {
                    Ok(r) if r.get_ref().success => {}
                    Ok(r) => failures
                        .lock()
                        .unwrap()
                        .push(format!("{:?}", r.into_inner())),
                    Err(e) => failures.lock().unwrap().push(e.to_string()),
                }
            }
        }));
    }
    for round in 0..8 {
        let how = Rewrite::ALL[round % Rewrite::ALL.len()];
        let mut file = base.clone();
        let name = format!("round{round}");
        file["services"].as_array_mut().unwrap().push(
            json!({"name": name, "grpc": {"host": "127.0.0.1", "port": s.backend_api.grpc.port()}}),
        );
        // Half the rounds in YAML, whose truncated prefixes often parse.
        let text = if round % 2 == 0 {
            serde_json::to_string_pretty(&file).unwrap()
        } else {
            serde_norway::to_string(&file).unwrap()
        };
        let path = s.services_file.clone();
        tokio::task::spawn_blocking(move || rewrite(&path, &text, how))
            .await
            .unwrap();
        let v = until_listed(&s, |v| {
            v["services"].as_array().unwrap().iter().any(|n| *n == name)
        })
        .await;
        assert_eq!(
            v["services"].as_array().unwrap().len(),
            base["services"].as_array().unwrap().len() + 1,
            "{how:?}: {v}"
        );
        assert_eq!(v["config"]["error"], Value::Null, "{how:?}: {v}");
    }
    stop.cancel();
    for c in callers {
        c.await.unwrap();
    }
    let calls = calls.load(std::sync::atomic::Ordering::Relaxed);
    let failures = failures.lock().unwrap();
    println!(
        "gateway calls during 8 rewrites: {calls}, failed: {}",
        failures.len()
    );
    assert!(calls > 0);
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_keys_matrix() {
    let s = setup().await;
    let none = s.client(None);
    let wrong = s.client(Some("wrong-key-0000000000000000000000"));
    let admin = s.client(Some(ADMIN_KEY));
    let wm_only = s.client(Some(WM_ONLY_KEY));

    // No key or a wrong key: UNAUTHENTICATED on every guarded service.
    for c in [&none, &wrong] {
        let e = c.get("workmanager", "k").await.unwrap_err();
        assert!(
            matches!(e, virtufin_api_client::ClientError::Status(ref s) if s.code() == tonic::Code::Unauthenticated),
            "{e}"
        );
        let e = c.publish("t", "x", Default::default()).await.unwrap_err();
        assert!(
            matches!(e, virtufin_api_client::ClientError::Status(ref s) if s.code() == tonic::Code::Unauthenticated),
            "{e}"
        );
        let e = c
            .gateway()
            .list_services(pb::ListServicesRequest {})
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        // Health stays open.
        assert!(c.handshake().await.is_ok());
    }
    let e = none.get("workmanager", "k").await.unwrap_err().to_string();
    assert!(e.contains("x-api-key"), "says how to authenticate: {e}");
    // Reflection is guarded too.
    let mut refl = tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(
        tonic::transport::Channel::from_shared(format!("http://{}", s.api.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let req = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    let e = refl
        .server_reflection_info(tokio_stream::once(req))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);

    // REST: 401 without or with a wrong key, health open.
    let http = reqwest::Client::new();
    for (path, key, want) in [
        ("/v1/state/workmanager/k", None, 401),
        ("/v1/state/workmanager/k", Some("nope"), 401),
        ("/v1/gateway/list-services", None, 401),
        ("/health", None, 200),
    ] {
        let mut r = http.get(s.http(path));
        if let Some(k) = key {
            r = r.header("x-api-key", k);
        }
        assert_eq!(
            r.send().await.unwrap().status(),
            want,
            "{path} with {key:?}"
        );
    }

    // A key bound to workmanager: its own state yes, another's no (nothing
    // changes), and the gateway only to its services.
    let etag = wm_only.save("workmanager", "k", "v1", "").await.unwrap();
    assert!(!etag.is_empty());
    let e = wm_only
        .save("websocketmanager", "k", "evil", "")
        .await
        .unwrap_err();
    assert!(
        matches!(e, virtufin_api_client::ClientError::Status(ref s) if s.code() == tonic::Code::PermissionDenied),
        "{e}"
    );
    assert!(
        e.to_string().contains("wm-only") && e.to_string().contains("websocketmanager"),
        "{e}"
    );
    assert_eq!(
        admin.get("websocketmanager", "k").await.unwrap(),
        None,
        "nothing saved"
    );
    let e = wm_only
        .delete("websocketmanager", "instances/gw-test", "")
        .await
        .unwrap_err();
    assert!(
        matches!(e, virtufin_api_client::ClientError::Status(ref s) if s.code() == tonic::Code::PermissionDenied)
    );
    let r = http
        .post(s.http("/v1/state/save-state"))
        .header("x-api-key", WM_ONLY_KEY)
        .json(&json!({"service": "websocketmanager", "key": "k", "value": "evil"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = http
        .get(s.http("/v1/state/workmanager/k"))
        .header("x-api-key", WM_ONLY_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let listed = wm_only
        .gateway()
        .list_services(pb::ListServicesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed.services.is_empty(),
        "no configured service is bound to wm-only: {listed:?}"
    );
    let e = wm_only
        .gateway()
        .invoke(pb::InvokeRequest {
            service: "websocketmanager".into(),
            method: "List".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);

    // The admin key reaches everything; the websocketmanager's own key was
    // good enough for it to become ready (its records are there).
    assert!(!admin.get_all("websocketmanager").await.unwrap().is_empty());
    admin.save("anything", "k", "v", "").await.unwrap();

    // Audit lines carry the key's name as the caller.
    assert!(
        !virtufin_testkit::logs::lines_with(&["state saved", "wm-only", "workmanager"]).is_empty()
    );
    assert!(
        !virtufin_testkit::logs::lines_with(&["state saved", "caller=\"wsm\"", "websocketmanager"])
            .is_empty()
    );

    // gRPC-Web over HTTP/1.1 with CORS for the configured origin only.
    let frame = [0u8, 0, 0, 0, 0]; // an empty ListServicesRequest
    let grpc_web = |key: Option<&str>| {
        let mut r = http
            .post(format!(
                "http://{}/virtufin.api.v1.Gateway/ListServices",
                s.api.grpc
            ))
            .header("content-type", "application/grpc-web+proto")
            .header("x-grpc-web", "1")
            .header("origin", "https://app.example")
            .body(frame.to_vec());
        if let Some(k) = key {
            r = r.header("x-api-key", k);
        }
        r.send()
    };
    let r = grpc_web(Some(ADMIN_KEY)).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let body = r.bytes().await.unwrap();
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("grpc-status:0"), "trailer frame: {text:?}");
    assert!(text.contains("websocketmanager"), "{text:?}");
    let r = grpc_web(None).await.unwrap();
    let status = r
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = String::from_utf8_lossy(&r.bytes().await.unwrap()).to_string();
    assert!(
        status.as_deref() == Some("16") || body.contains("grpc-status:16"),
        "{status:?} {body:?}"
    );
    let pre = http
        .request(
            reqwest::Method::OPTIONS,
            s.http("/v1/gateway/list-services"),
        )
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "GET")
        .send()
        .await
        .unwrap();
    assert!(pre.headers().get("access-control-allow-origin").is_none());
    let pre = http
        .request(
            reqwest::Method::OPTIONS,
            s.http("/v1/gateway/list-services"),
        )
        .header("origin", "https://app.example")
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "x-api-key")
        .send()
        .await
        .unwrap();
    assert_eq!(
        pre.headers()["access-control-allow-origin"],
        "https://app.example"
    );
}

#[tokio::test]
async fn cors_is_off_and_auth_is_off_by_default() {
    let api = common::start(Kind::Memory).await;
    common::ready(&api).await;
    let r = reqwest::Client::new()
        .get(api.http_url("/v1/gateway/list-services"))
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "no key needed when none is configured");
    assert!(r.headers().get("access-control-allow-origin").is_none());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["services"], json!([]));
    let e = api
        .client
        .invoke("x", "y", "{}")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no services are configured (SERVICES_CONFIG_PATH)"),
        "{e}"
    );
    api.stop().await;
}

/// A reflection-enabled test service (the api's own Health contract) that
/// answers UNAVAILABLE to its first `fail_first` calls.
#[derive(Clone)]
struct Flaky {
    calls: Arc<std::sync::atomic::AtomicU32>,
    fail_first: u32,
}

#[tonic::async_trait]
impl pb::health_server::Health for Flaky {
    async fn health_check(
        &self,
        _: tonic::Request<pb::HealthCheckRequest>,
    ) -> Result<tonic::Response<pb::HealthCheckResponse>, tonic::Status> {
        let n = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        if n <= self.fail_first {
            return Err(tonic::Status::unavailable(format!("flaky call {n}")));
        }
        Ok(tonic::Response::new(pb::HealthCheckResponse {
            healthy: true,
            status: format!("answered on call {n}"),
            ..Default::default()
        }))
    }
}

/// `v1alpha_only`: serves only the older reflection service (as grpcurl
/// 1.8-era servers do), so discovery must fall back to it.
async fn start_flaky(
    fail_first: u32,
    v1alpha_only: bool,
) -> (SocketAddr, Arc<std::sync::atomic::AtomicU32>) {
    let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(virtufin_proto::API_DESCRIPTOR_SET);
    let svc = pb::health_server::HealthServer::new(Flaky {
        calls: calls.clone(),
        fail_first,
    });
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let server = tonic::transport::Server::builder().add_service(svc);
    if v1alpha_only {
        let r = reflection.build_v1alpha().unwrap();
        tokio::spawn(server.add_service(r).serve_with_incoming(incoming));
    } else {
        let r = reflection.build_v1().unwrap();
        tokio::spawn(server.add_service(r).serve_with_incoming(incoming));
    }
    (addr, calls)
}

#[tokio::test]
async fn retries_only_calls_marked_safe_with_backoff_and_v1alpha_reflection_works() {
    let (safe_addr, safe_calls) = start_flaky(2, false).await;
    // Its methods are learnt through v1alpha reflection.
    let (unsafe_addr, unsafe_calls) = start_flaky(2, true).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("services.yaml");
    std::fs::write(
        &file,
        format!(
            "services:\n  - name: safe\n    grpc: {{host: 127.0.0.1, port: {}}}\n    resilience: {{retries: 2, retryBackoffMs: 20, retryMethods: ['Health/*']}}\n  - name: unsafe\n    grpc: {{host: 127.0.0.1, port: {}}}\n    resilience: {{retries: 2, retryBackoffMs: 20}}\n",
            safe_addr.port(),
            unsafe_addr.port()
        ),
    )
    .unwrap();
    let api = common::start_with(Kind::Memory, move |c| c.services_config = Some(file)).await;
    common::ready(&api).await;

    let started = std::time::Instant::now();
    let r = invoke(&api.client, "safe", "HealthCheck", json!({})).await;
    assert!(r.success, "{r:?}");
    assert_eq!(
        safe_calls.load(std::sync::atomic::Ordering::SeqCst),
        3,
        "two retries"
    );
    assert!(r.response_data.contains("answered on call 3"), "{r:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(60),
        "20 ms then 40 ms of backoff"
    );

    let r = invoke(&api.client, "unsafe", "HealthCheck", json!({})).await;
    assert!(!r.success);
    assert_eq!(r.status, "UNAVAILABLE");
    assert_eq!(r.message, "flaky call 1");
    assert_eq!(
        unsafe_calls.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "not retried"
    );
    api.stop().await;
}
