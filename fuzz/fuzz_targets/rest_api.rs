//! REST bodies, paths and queries against a real api (embedded backend)
//! started once in this process; its Gateway has the api itself as the
//! backend `self`, so invoke requests go through reflection and protobuf
//! JSON to a real gRPC service. A 500 or a dropped connection is a crash.
#![no_main]

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::OnceLock,
    time::Duration,
};

use libfuzzer_sys::{arbitrary, fuzz_target};

#[derive(arbitrary::Arbitrary, Debug)]
enum Req {
    Save(Vec<u8>),
    Register(Vec<u8>),
    Invoke(Vec<u8>),
    InvokeSelf {
        method: String,
        request: String,
    },
    Get {
        service: String,
        key: String,
    },
    Delete {
        service: String,
        key: String,
        query: String,
    },
    Methods {
        query: String,
    },
    Schema {
        service: String,
        method: String,
        query: String,
    },
}

fn api() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let dir = tempfile::tempdir().unwrap();
                let mut c = virtufin_api::Config::defaults();
                c.http_urls =
                    virtufin_api::config::ListenUrls(vec!["127.0.0.1:0".parse().unwrap()]);
                c.http_port = None;
                c.grpc_port = 0;
                c.grpc_host = "127.0.0.1".parse().unwrap();
                c.backend = Some(virtufin_api::BackendKind::Memory);
                c.valkey_url = None;
                let listeners = virtufin_api::bind(&c).await.unwrap();
                let grpc = listeners.grpc_addr().unwrap();
                let http = listeners.http_addrs()[0];
                let services = dir.path().join("services.json");
                // A short deadline: a streaming method never ends by itself.
                std::fs::write(
                    &services,
                    format!(
                        r#"{{"services":[{{"name":"self","grpc":{{"host":"127.0.0.1","port":{}}},"resilience":{{"timeoutMs":200,"retries":0}}}}]}}"#,
                        grpc.port()
                    ),
                )
                .unwrap();
                c.services_config = Some(services);
                let shutdown = tokio_util::sync::CancellationToken::new();
                let server = tokio::spawn(virtufin_api::run(c, listeners, shutdown.clone()));
                tx.send(http).unwrap();
                let _keep = (dir, shutdown);
                let _ = server.await;
            });
        });
        let http = rx.recv().unwrap();
        // Ready when /health answers 200 (the embedded backend connects at once).
        for _ in 0..200 {
            if let Some((200, _)) = request(http, "GET", "/health", b"") {
                return http;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the api never became ready");
    })
}

/// Percent-encodes everything but unreserved characters (a path segment).
fn segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Keeps `&` and `=` so the fuzzer can shape a query.
fn query(s: &str) -> String {
    s.split_inclusive(['&', '='])
        .map(|part| match part.strip_suffix(['&', '=']) {
            Some(p) => format!("{}{}", segment(p), &part[p.len()..]),
            None => segment(part),
        })
        .collect()
}

/// One HTTP/1.1 request on a fresh connection: the status and body.
fn request(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Option<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: fuzz\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).ok()?;
    s.write_all(body).ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    let text = String::from_utf8_lossy(&out);
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let at = out.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    Some((status, out[at..].to_vec()))
}

fuzz_target!(|r: Req| {
    let addr = api();
    let (method, path, body) = match &r {
        Req::Save(b) => ("POST", "/v1/state/save-state".to_owned(), b.clone()),
        Req::Register(b) => ("POST", "/v1/state/register-keys".to_owned(), b.clone()),
        Req::Invoke(b) => ("POST", "/v1/gateway/invoke".to_owned(), b.clone()),
        Req::InvokeSelf { method, request } => (
            "POST",
            "/v1/gateway/invoke".to_owned(),
            serde_json::json!({"service": "self", "method": method, "requestData": request})
                .to_string()
                .into_bytes(),
        ),
        Req::Get { service, key } => (
            "GET",
            format!("/v1/state/{}/{}", segment(service), segment(key)),
            Vec::new(),
        ),
        Req::Delete {
            service,
            key,
            query: q,
        } => (
            "DELETE",
            format!(
                "/v1/state/{}/{}?{}",
                segment(service),
                segment(key),
                query(q)
            ),
            Vec::new(),
        ),
        Req::Methods { query: q } => (
            "GET",
            format!("/v1/gateway/list-methods?{}", query(q)),
            Vec::new(),
        ),
        Req::Schema {
            service,
            method,
            query: q,
        } => (
            "GET",
            format!(
                "/v1/grpc/{}/schema/{}?{}",
                segment(service),
                segment(method),
                query(q)
            ),
            Vec::new(),
        ),
    };
    let (status, answer) = request(addr, method, &path, &body)
        .unwrap_or_else(|| panic!("no answer to {method} {path}"));
    assert!(
        status != 500,
        "{method} {path} {}: {status} {}",
        String::from_utf8_lossy(&body),
        String::from_utf8_lossy(&answer)
    );
});
