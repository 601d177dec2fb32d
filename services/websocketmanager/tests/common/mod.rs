//! A real api (in process, on a real Valkey) and a real websocketmanager
//! (in process), on ports bound by the test; real WebSocket peers.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{net::SocketAddr, process::Stdio, time::Duration};

use futures_util::{SinkExt, StreamExt};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    net::TcpListener,
    process::{Child, Command},
};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use virtufin_api_client::{ApiClient, pb};
use virtufin_proto::websocketmanager::v1::web_socket_manager_client::WebSocketManagerClient;
use virtufin_testkit::ValkeyServer;

pub const WAIT: Duration = Duration::from_secs(15);

pub struct Api {
    pub addr: SocketAddr,
    pub http: SocketAddr,
    pub client: ApiClient,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), virtufin_api::RunError>>,
}

fn api_config(valkey: &ValkeyServer, grpc: u16, http: u16) -> virtufin_api::Config {
    let mut c = virtufin_api::Config::defaults();
    c.http_urls = virtufin_api::config::ListenUrls(vec![SocketAddr::from(([127, 0, 0, 1], http))]);
    c.http_port = None;
    c.grpc_port = grpc;
    c.grpc_host = "127.0.0.1".parse().unwrap();
    c.backend = Some(virtufin_api::BackendKind::Valkey);
    c.valkey_url = Some(valkey.url());
    c.probe_interval = Duration::from_millis(100);
    c.drain_timeout = Duration::from_secs(2);
    c
}

impl Api {
    pub async fn start(valkey: &ValkeyServer) -> Self {
        Self::start_on(valkey, 0, 0).await
    }

    /// On given ports (0: any), so a restart can take the same ones.
    pub async fn start_on(valkey: &ValkeyServer, grpc: u16, http: u16) -> Self {
        let config = api_config(valkey, grpc, http);
        let listeners = virtufin_api::bind(&config).await.unwrap();
        let addr = listeners.grpc_addr().unwrap();
        let http = listeners.http_addrs()[0];
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(virtufin_api::run(config, listeners, shutdown.clone()));
        let client = ApiClient::lazy(&addr.to_string()).unwrap();
        wait_until(|| async { client.handshake().await.is_ok() }).await;
        Self {
            addr,
            http,
            client,
            shutdown,
            task,
        }
    }

    pub async fn stop(self) -> (u16, u16) {
        self.shutdown.cancel();
        let _ = self.task.await;
        (self.addr.port(), self.http.port())
    }
}

pub struct Wsm {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub instance: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), virtufin_websocketmanager::RunError>>,
}

pub fn wsm_config(api: SocketAddr, instance: &str) -> virtufin_websocketmanager::Config {
    let mut c = virtufin_websocketmanager::Config::defaults();
    c.http_urls =
        virtufin_websocketmanager::config::ListenUrls(vec!["127.0.0.1:0".parse().unwrap()]);
    c.http_port = None;
    c.grpc_port = 0;
    c.grpc_host = "127.0.0.1".parse().unwrap();
    c.link.api_host = api.ip().to_string();
    c.link.api_grpc_port = api.port();
    c.instance_id = Some(instance.to_owned());
    c.reconnect_base_delay = Duration::from_millis(50);
    c.reconnect_max_delay = Duration::from_millis(400);
    c.reconnect_max_attempts = 3;
    c.connect_timeout = Duration::from_secs(3);
    c.link.probe_interval = Duration::from_millis(100);
    c.heartbeat_interval = Duration::from_millis(200);
    c.drain_timeout = Duration::from_secs(2);
    c
}

impl Wsm {
    pub async fn start(api: SocketAddr, instance: &str) -> Self {
        Self::start_with(wsm_config(api, instance)).await
    }

    pub async fn start_with(config: virtufin_websocketmanager::Config) -> Self {
        let instance = config.instance_id.clone().unwrap_or_default();
        let listeners = virtufin_websocketmanager::bind(&config).await.unwrap();
        let grpc = listeners.grpc_addr().unwrap();
        let http = listeners.http_addrs()[0];
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(virtufin_websocketmanager::run(
            config,
            listeners,
            shutdown.clone(),
        ));
        let this = Self {
            grpc,
            http,
            instance,
            shutdown,
            task,
        };
        // Ready = /health answers 200 (api handshake, state round trip, restore).
        let url = format!("http://{http}/health");
        wait_until(|| {
            let url = url.clone();
            async move {
                reqwest::get(&url)
                    .await
                    .map(|r| r.status().as_u16() == 200)
                    .unwrap_or(false)
            }
        })
        .await;
        this
    }

    pub async fn client(&self) -> WebSocketManagerClient<Channel> {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", self.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap();
        WebSocketManagerClient::new(ch)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

/// Polls an observable condition (a health endpoint, a handshake) until it
/// holds; there is no push signal for these.
pub async fn wait_until<F, Fut>(mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut pause = Duration::from_millis(5);
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached within {WAIT:?}"
        );
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Subscribes to a topic through the api.
pub async fn subscribe(
    api: &ApiClient,
    topic: &str,
    who: &str,
) -> tonic::Streaming<pb::TopicEventRequest> {
    api.pubsub()
        .subscribe(pb::SubscribeRequest {
            topic: topic.into(),
            subscriber: who.into(),
            group: who.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

pub async fn next_event(
    s: &mut tonic::Streaming<pb::TopicEventRequest>,
) -> (String, serde_json::Value) {
    let ev = tokio::time::timeout(WAIT, s.message())
        .await
        .expect("event in time")
        .unwrap()
        .expect("stream open");
    (ev.r#type, serde_json::from_slice(&ev.data).unwrap())
}

/// The next lifecycle event of connection `id` (others are skipped).
pub async fn next_lifecycle(
    s: &mut tonic::Streaming<pb::TopicEventRequest>,
    id: &str,
) -> (String, serde_json::Value) {
    loop {
        let (t, d) = next_event(s).await;
        if d["connection_id"] == id {
            let kind = t.rsplit('.').next().unwrap().to_owned();
            return (kind, d);
        }
    }
}

/// A Rust WebSocket peer (tokio-tungstenite) that echoes every frame.
pub struct EchoPeer {
    pub port: u16,
    /// WebSocket connections open right now.
    pub open: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: CancellationToken,
}

/// Counts one open connection for as long as it lives.
struct OpenGuard(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl EchoPeer {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = CancellationToken::new();
        let open = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (s, counter) = (stop.clone(), open.clone());
        tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! { _ = s.cancelled() => return, a = listener.accept() => a.unwrap() };
                let (s, counter) = (s.clone(), counter.clone());
                tokio::spawn(async move {
                    let cfg = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
                        .max_message_size(None)
                        .max_frame_size(None);
                    let Ok(mut ws) =
                        tokio_tungstenite::accept_async_with_config(tcp, Some(cfg)).await
                    else {
                        return;
                    };
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let _open = OpenGuard(counter);
                    loop {
                        let m = tokio::select! { _ = s.cancelled() => return, m = ws.next() => m };
                        match m {
                            Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
                                if ws.send(m).await.is_err() {
                                    return;
                                }
                            }
                            Some(Ok(_)) => {}
                            _ => return,
                        }
                    }
                });
            }
        });
        Self { port, open, stop }
    }

    pub fn open_now(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/", self.port)
    }
}

impl Drop for EchoPeer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The Python peer (`tests/peers/peer.py`, the `websockets` library).
pub struct PyPeer {
    pub port: u16,
    pub child: Child,
}

impl PyPeer {
    pub async fn start() -> Self {
        Self::start_on(virtufin_testkit::free_port()).await
    }

    pub async fn start_on(port: u16) -> Self {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/peer.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(port.to_string())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 (with the websockets package: pip install websockets)");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("peer starts")
            .unwrap();
        assert_eq!(
            line.as_deref(),
            Some(format!("listening {port}").as_str()),
            "the Python peer did not start (is the websockets package installed?)"
        );
        Self { port, child }
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://127.0.0.1:{}{path}", self.port)
    }
}
