//! Starts a real virtufin-api in this process, on ports it bound itself,
//! on the embedded backend or on a real valkey-server.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{net::SocketAddr, time::Duration};

use tokio_util::sync::CancellationToken;
use virtufin_api::{BackendKind, Config};
use virtufin_api_client::ApiClient;
use virtufin_testkit::{
    ValkeyServer,
    daprd::{Daprd, DaprdOptions},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Memory,
    Valkey,
    /// Through real daprd (packaging/daprd) over a real Valkey.
    Dapr,
}

/// Every kind of content type a publisher may name (Dapr carries each
/// differently: JSON value, string, base64).
pub const CONTENT_TYPES: &[(&str, &str)] = &[
    ("application/json", r#"{"n":[1,2]}"#),
    ("application/json; charset=utf-8", r#""a JSON string""#),
    ("application/cloudevents+json", r#"{"nested":true}"#),
    ("text/plain", "plain text ✓"),
    ("text/json", r#"{"as":"text"}"#),
    ("text/csv", "a,b\n1,2"),
    ("application/xml", "<a>1</a>"),
    ("application/vnd.api+json", r#"{"data":[]}"#),
    ("application/octet-stream", "opaque \u{1} bytes"),
    ("image/svg", "<svg/>"),
];

pub struct TestApi {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub client: ApiClient,
    pub valkey: Option<ValkeyServer>,
    pub dapr: Option<Daprd>,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<Result<(), virtufin_api::RunError>>,
}

impl TestApi {
    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

pub fn test_config() -> Config {
    let mut c = Config::defaults();
    c.http_urls = virtufin_api::config::ListenUrls(vec!["127.0.0.1:0".parse().unwrap()]);
    c.http_port = None;
    c.grpc_port = 0;
    c.grpc_host = "127.0.0.1".parse().unwrap();
    c.processing_timeout = Duration::from_millis(500);
    c.reclaim_interval = Duration::from_millis(100);
    c.retry_delay = Duration::from_millis(50);
    c.probe_interval = Duration::from_millis(100);
    c.drain_timeout = Duration::from_secs(2);
    c
}

pub async fn start(kind: Kind) -> TestApi {
    start_with(kind, |_| {}).await
}

pub async fn start_with(kind: Kind, tweak: impl FnOnce(&mut Config)) -> TestApi {
    let mut config = test_config();
    let valkey = match kind {
        Kind::Memory => {
            config.backend = Some(BackendKind::Memory);
            config.valkey_url = None;
            None
        }
        Kind::Valkey => {
            let v = ValkeyServer::start();
            config.backend = Some(BackendKind::Valkey);
            config.valkey_url = Some(v.url());
            Some(v)
        }
        Kind::Dapr => {
            let v = ValkeyServer::start();
            config.backend = Some(BackendKind::Dapr);
            config.valkey_url = None;
            Some(v)
        }
    };
    tweak(&mut config);
    let dapr = match kind {
        Kind::Dapr => {
            let binary = virtufin_testkit::daprd::binary()
                .expect("a Kind::Dapr test runs only where daprd exists (see both_backends!)");
            let d = Daprd::start(
                &binary,
                valkey.as_ref().unwrap(),
                DaprdOptions {
                    app_id: config.app_id.clone(),
                    processing_timeout: config.processing_timeout,
                    redeliver_interval: config.reclaim_interval,
                    ..DaprdOptions::default()
                },
            );
            config.dapr_grpc_port = d.grpc_port;
            config.dapr_http_port = d.http_port;
            Some(d)
        }
        _ => None,
    };
    let mut api = start_config(config, valkey).await;
    api.dapr = dapr;
    api
}

pub async fn start_config(config: Config, valkey: Option<ValkeyServer>) -> TestApi {
    let listeners = virtufin_api::bind(&config).await.unwrap();
    let grpc = listeners.grpc_addr().unwrap();
    let http = listeners.http_addrs()[0];
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(virtufin_api::run(config, listeners, shutdown.clone()));
    let client = ApiClient::lazy(&grpc.to_string()).unwrap();
    TestApi {
        grpc,
        http,
        client,
        valkey,
        dapr: None,
        shutdown,
        task,
    }
}

/// Waits until the api reports ready (the handshake answers OK).
pub async fn ready(api: &TestApi) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut backoff = Duration::from_millis(10);
    loop {
        match api.client.handshake().await {
            Ok(_) => return,
            Err(e) if tokio::time::Instant::now() > deadline => panic!("api never ready: {e}"),
            Err(_) => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(200));
            }
        }
    }
}

/// One test per backend (memory, Valkey, Dapr through real daprd; the Dapr
/// cases say SKIP where there is no daprd).
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() { super::$name($crate::common::Kind::Memory).await }
            )*
        }
        mod valkey {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() { super::$name($crate::common::Kind::Valkey).await }
            )*
        }
        mod dapr {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if virtufin_testkit::daprd::require(stringify!($name)).is_some() {
                        super::$name($crate::common::Kind::Dapr).await
                    }
                }
            )*
        }
    };
}
