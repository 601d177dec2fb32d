//! The stack the workmanager tests run against: a real Valkey, a real api,
//! the workmanager in process, and helpers to watch topics.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use virtufin_api_client::{ApiClient, pb as api_pb};
use virtufin_proto::workmanager::v1::{
    self as pb, code_source::Source, work_manager_client::WorkManagerClient,
};
use virtufin_testkit::ValkeyServer;

pub const WAIT: Duration = Duration::from_secs(20);

pub struct Stack {
    pub _valkey: ValkeyServer,
    pub api: ApiClient,
    pub api_addr: SocketAddr,
    pub api_stop: CancellationToken,
    pub state: tempfile::TempDir,
}

pub async fn stack() -> Stack {
    stack_with(|_| {}).await
}

/// The stack with the api's configuration changed by `tweak`.
pub async fn stack_with(tweak: impl FnOnce(&mut virtufin_api::Config)) -> Stack {
    let valkey = ValkeyServer::start();
    let mut c = virtufin_api::Config::defaults();
    c.http_urls = virtufin_api::config::ListenUrls(vec!["127.0.0.1:0".parse().unwrap()]);
    c.grpc_port = 0;
    c.backend = Some(virtufin_api::BackendKind::Valkey);
    c.valkey_url = Some(valkey.url());
    c.processing_timeout = Duration::from_millis(500);
    c.reclaim_interval = Duration::from_millis(100);
    c.retry_delay = Duration::from_millis(50);
    tweak(&mut c);
    let listeners = virtufin_api::bind(&c).await.unwrap();
    let api_addr = listeners.grpc_addr().unwrap();
    let state = tempfile::tempdir().unwrap();
    // One Gateway backend, the api itself (it serves reflection), so that
    // workers' gateway calls have somewhere real to go.
    let services = state.path().join("services.json");
    std::fs::write(
        &services,
        serde_json::json!({"services": [{"name": "api", "grpc": {
            "host": "127.0.0.1", "port": api_addr.port(), "reflectionEnabled": true}}]})
        .to_string(),
    )
    .unwrap();
    c.services_config = Some(services);
    let api_stop = CancellationToken::new();
    tokio::spawn(virtufin_api::run(c, listeners, api_stop.clone()));
    let api = ApiClient::lazy(&api_addr.to_string()).unwrap();
    until(|| async { api.handshake().await.is_ok() }).await;
    Stack {
        _valkey: valkey,
        api,
        api_addr,
        api_stop,
        state,
    }
}

pub struct Wm {
    pub client: WorkManagerClient<Channel>,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<Result<(), virtufin_workmanager::RunError>>,
}

pub async fn wm(s: &Stack, tweak: impl FnOnce(&mut virtufin_workmanager::Config)) -> Wm {
    let mut c = virtufin_workmanager::Config::defaults();
    c.http_urls = virtufin_workmanager::config::ListenUrls(vec!["127.0.0.1:0".parse().unwrap()]);
    c.grpc_port = 0;
    c.link.api_grpc_port = s.api_addr.port();
    c.instance_id = Some("wm-test".into());
    c.state_dir = s.state.path().to_path_buf();
    c.link.probe_interval = Duration::from_millis(100);
    c.event_timeout = Duration::from_secs(5);
    c.drain_timeout = Duration::from_secs(2);
    tweak(&mut c);
    let listeners = virtufin_workmanager::bind(&c).await.unwrap();
    let grpc = listeners.grpc_addr().unwrap();
    let http = listeners.http_addrs()[0];
    let stop = CancellationToken::new();
    let task = tokio::spawn(virtufin_workmanager::run(c, listeners, stop.clone()));
    let url = format!("http://{http}/health");
    until(|| {
        let u = url.clone();
        async move {
            reqwest::get(&u)
                .await
                .map(|r| r.status().as_u16() == 200)
                .unwrap_or(false)
        }
    })
    .await;
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    Wm {
        client: WorkManagerClient::new(ch),
        grpc,
        http,
        stop,
        task,
    }
}

impl Wm {
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Names the workmanager `wm` in the api's services file (hot reload) and
/// waits until the api's Gateway lists it.
pub async fn gateway_backend(s: &Stack, wm: &Wm) {
    std::fs::write(
        s.state.path().join("services.json"),
        serde_json::json!({"services": [{"name": "workmanager", "grpc": {
            "host": "127.0.0.1", "port": wm.grpc.port(), "reflectionEnabled": true}}]})
        .to_string(),
    )
    .unwrap();
    until(|| async {
        s.api
            .gateway()
            .list_services(api_pb::ListServicesRequest {})
            .await
            .is_ok_and(|r| r.into_inner().services == vec!["workmanager"])
    })
    .await;
}

pub async fn until<F, Fut>(mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn create(code: &str, topic: &str, config: &[(&str, &str)]) -> pb::CreateWorkerRequest {
    create_with(code.as_bytes(), "text/x-python", topic, config)
}

pub fn create_with(
    code: &[u8],
    mime: &str,
    topic: &str,
    config: &[(&str, &str)],
) -> pb::CreateWorkerRequest {
    pb::CreateWorkerRequest {
        code_source: Some(pb::CodeSource {
            source: Some(Source::Content(code.to_vec())),
            sha256: String::new(),
        }),
        mime_type: mime.into(),
        topic: topic.into(),
        config: config
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        tags: HashMap::new(),
        group: String::new(),
    }
}

pub async fn subscribe(
    api: &ApiClient,
    topic: &str,
) -> tonic::Streaming<api_pb::TopicEventRequest> {
    api.pubsub()
        .subscribe(api_pb::SubscribeRequest {
            topic: topic.into(),
            subscriber: format!("t-{topic}"),
            group: format!("t-{topic}"),
        })
        .await
        .unwrap()
        .into_inner()
}

pub async fn next(
    s: &mut tonic::Streaming<api_pb::TopicEventRequest>,
) -> api_pb::TopicEventRequest {
    tokio::time::timeout(WAIT, s.message())
        .await
        .expect("event in time")
        .unwrap()
        .expect("open")
}

/// The next lifecycle event of `worker`: (kind, data).
pub async fn lifecycle(
    s: &mut tonic::Streaming<api_pb::TopicEventRequest>,
    worker: &str,
) -> (String, serde_json::Value) {
    loop {
        let ev = next(s).await;
        let d: serde_json::Value = serde_json::from_slice(&ev.data).unwrap();
        if d["worker_id"] == worker {
            return (ev.r#type.rsplit('.').next().unwrap().to_owned(), d);
        }
    }
}

/// The first `error` lifecycle event of `worker`: its data.
pub async fn first_error(
    s: &mut tonic::Streaming<api_pb::TopicEventRequest>,
    worker: &str,
) -> serde_json::Value {
    loop {
        let (kind, d) = lifecycle(s, worker).await;
        if kind == "error" {
            return d;
        }
    }
}

/// Creates a worker and starts it; its id.
pub async fn create_started(
    client: &mut WorkManagerClient<Channel>,
    req: pb::CreateWorkerRequest,
) -> String {
    let id = client.create_worker(req).await.unwrap().into_inner().id;
    client
        .start_worker(pb::StartWorkerRequest { id: id.clone() })
        .await
        .unwrap();
    id
}

pub fn ext(ev: &api_pb::TopicEventRequest, k: &str) -> Option<String> {
    ev.extensions
        .as_ref()?
        .fields
        .get(k)
        .and_then(|v| match &v.kind {
            Some(prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
            _ => None,
        })
}

pub async fn publish(api: &ApiClient, topic: &str, data: &str, md: &[(&str, &str)]) {
    api.publish(
        topic,
        data,
        md.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
    .await
    .unwrap();
}
