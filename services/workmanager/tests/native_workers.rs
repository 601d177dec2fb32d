//! Native workers (C ABI v1) through a real api on a real Valkey, each in
//! its own virtufin-worker-host process: the DevKit's example worker
//! answers with config, correlation and a Gateway round trip; a segfault,
//! a hang and an allocation past the memory limit are contained; code
//! comes from a URL (allow-list, SSRF block, SHA-256, no redirects) or a
//! Nix store path pinned by its NAR hash.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{path::PathBuf, time::Duration};

use base64::Engine as _;
use common::*;
use serde_json::{Value, json};
use tonic::Code;
use virtufin_proto::workmanager::v1::{self as pb, code_source::Source};

const NATIVE: &str = "application/x-native-dll";

/// A cdylib of this workspace, built as a dev-dependency of this package
/// (`target/<profile>/deps`) or as a workspace member (`target/<profile>`).
fn library(name: &str) -> Vec<u8> {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let file = format!("lib{name}.so");
    let candidates = [deps.join(&file), deps.parent().unwrap().join(&file)];
    let path = candidates
        .iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{file} not built; looked at {candidates:?}"));
    std::fs::read(path).unwrap()
}

fn host() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_virtufin-worker-host"))
}

fn data(ev: &virtufin_api_client::pb::TopicEventRequest) -> Value {
    serde_json::from_slice(&ev.data).unwrap()
}

async fn start(w: &mut Wm, req: pb::CreateWorkerRequest) -> String {
    let id = w.client.create_worker(req).await.unwrap().into_inner().id;
    w.client
        .start_worker(pb::StartWorkerRequest { id: id.clone() })
        .await
        .unwrap();
    id
}

/// The next `error` lifecycle event of `id`.
async fn next_error(
    status: &mut tonic::Streaming<virtufin_api_client::pb::TopicEventRequest>,
    id: &str,
) -> Value {
    loop {
        let (k, d) = lifecycle(status, id).await;
        if k == "error" {
            return d;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_devkit_worker_answers_with_config_correlation_gateway_and_hot_swap() {
    let s = stack().await;
    let mut status = subscribe(&s.api, "workmanager.workerstatus").await;
    let mut answers = subscribe(&s.api, "com.virtufin.example.echo.reply").await;
    let mut w = wm(&s, |c| c.worker_host = Some(host())).await;
    let so = library("virtufin_echo_worker");
    let id = start(
        &mut w,
        create_with(&so, NATIVE, "echo-jobs", &[("region", "eu")]),
    )
    .await;
    assert_eq!(lifecycle(&mut status, &id).await.0, "created");
    assert_eq!(lifecycle(&mut status, &id).await.0, "started");

    publish(
        &s.api,
        "echo-jobs",
        r#"{"command":"ECHO","payload":{"n":1}}"#,
        &[
            ("ce-correlationid", "c-1"),
            ("ce-datacontenttype", "application/json"),
        ],
    )
    .await;
    let a = next(&mut answers).await;
    assert_eq!(a.source, "urn:com.virtufin.example.echo");
    assert_eq!(a.r#type, "com.virtufin.example.echo.reply");
    assert_eq!(ext(&a, "correlationid").as_deref(), Some("c-1"));
    let d = data(&a);
    assert_eq!(
        (&d["success"], &d["echo"], &d["region"], &d["handled"]),
        (&json!(true), &json!({"n": 1}), &json!("eu"), &json!(1))
    );

    // replytopic wins over the answer's type; the same process answers
    // (its state counts events).
    let mut replies = subscribe(&s.api, "native-replies").await;
    publish(
        &s.api,
        "echo-jobs",
        r#"{"command":"echo","payload":"x"}"#,
        &[("ce-replytopic", "native-replies")],
    )
    .await;
    let r = next(&mut replies).await;
    assert_eq!(r.r#type, "com.virtufin.example.echo.reply");
    assert_eq!(data(&r)["handled"], 2);

    // An unknown command: the DevKit's error envelope.
    publish(&s.api, "echo-jobs", r#"{"command":"nope"}"#, &[]).await;
    let d = data(&next(&mut answers).await);
    assert_eq!(d["success"], false);
    assert!(
        d["message"]
            .as_str()
            .unwrap()
            .contains("unknown command 'nope'"),
        "{d}"
    );

    // gateway_call: worker → host → workmanager → the api's Gateway →
    // a backend (the api itself, see common::stack) and back.
    publish(
        &s.api,
        "echo-jobs",
        r#"{"command":"gateway","service":"api","method":"Health/HealthCheck","request":{}}"#,
        &[],
    )
    .await;
    let d = data(&next(&mut answers).await);
    assert_eq!(d["success"], true, "{d}");
    assert_eq!(d["response"]["healthy"], true, "{d}");

    // A backend that is not configured: the api's refusal comes back to
    // the worker (non-zero gateway_call), which answers it in its envelope.
    publish(
        &s.api,
        "echo-jobs",
        r#"{"command":"gateway","service":"nosuch","method":"Get","request":{"a":1}}"#,
        &[],
    )
    .await;
    let d = data(&next(&mut answers).await);
    assert_eq!(d["success"], false, "{d}");
    let msg = d["message"].as_str().unwrap();
    assert!(msg.starts_with("gateway call failed (1): "), "{msg}");
    assert!(msg.contains("nosuch"), "{msg}");

    // Hot swap: LoadCode with another library restarts the worker on it.
    let mut swapped = subscribe(&s.api, "testlib.answers").await;
    w.client
        .load_code(pb::LoadCodeRequest {
            id: id.clone(),
            code_source: Some(pb::CodeSource {
                source: Some(Source::Content(library("virtufin_worker_testlib"))),
                sha256: String::new(),
            }),
        })
        .await
        .unwrap();
    publish(&s.api, "echo-jobs", "swapped", &[]).await;
    assert_eq!(data(&next(&mut swapped).await), json!({"echo": "swapped"}));

    let list = w
        .client
        .list_workers(pb::ListWorkersRequest { filters: vec![] })
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert_eq!(
        (list[0].language.as_str(), list[0].mime_type.as_str()),
        ("native", NATIVE)
    );
    // The library was written privately: 0700 directory, 0500 file.
    use std::os::unix::fs::PermissionsExt;
    let dir = s.state.path().join("workers").join(&id);
    let mode = |p: PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        (mode(dir.clone()), mode(dir.join("worker.so"))),
        (0o700, 0o500)
    );
    w.stop().await;
    s.api_stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segfaults_hangs_and_memory_hogs_are_contained() {
    let s = stack().await;
    let mut status = subscribe(&s.api, "workmanager.workerstatus").await;
    let mut answers = subscribe(&s.api, "testlib.answers").await;
    let mut w = wm(&s, |c| {
        c.worker_host = Some(host());
        c.event_timeout = Duration::from_millis(500);
        c.max_attempts = 1;
        c.memory_limit_mb = 256;
    })
    .await;
    let so = library("virtufin_worker_testlib");
    let id = start(&mut w, create_with(&so, NATIVE, "native-tests", &[])).await;

    // A segfault kills the host, not the workmanager; the next event gets
    // a new host.
    publish(&s.api, "native-tests", "crash", &[]).await;
    let d = next_error(&mut status, &id).await;
    assert_eq!(d["error_type"], "crashed", "{d}");
    assert!(
        d["error_message"].as_str().unwrap().contains("SIGSEGV"),
        "{d}"
    );
    publish(&s.api, "native-tests", "after-crash", &[]).await;
    assert_eq!(
        data(&next(&mut answers).await),
        json!({"echo": "after-crash"})
    );

    // A hang is cut at the event timeout and its host killed.
    publish(&s.api, "native-tests", "hang", &[]).await;
    let d = next_error(&mut status, &id).await;
    assert_eq!(d["error_type"], "timeout", "{d}");
    publish(&s.api, "native-tests", "after-hang", &[]).await;
    assert_eq!(
        data(&next(&mut answers).await),
        json!({"echo": "after-hang"})
    );

    // 1 GiB against a 256 MiB address-space limit: refused inside the host.
    publish(&s.api, "native-tests", "alloc", &[]).await;
    let d = data(&next(&mut answers).await);
    assert!(
        d["message"]
            .as_str()
            .unwrap()
            .contains("allocation refused"),
        "{d}"
    );

    // A panic is caught by the DevKit: an error envelope and a worker.error.
    publish(&s.api, "native-tests", "panic", &[]).await;
    let d = data(&next(&mut answers).await);
    assert_eq!(d["message"], "asked to panic");

    // Not an ELF file: refused up front, nothing created.
    let e = w
        .client
        .create_worker(create_with(b"def Process(e): pass", NATIVE, "t", &[]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("ELF shared library"),
        "{}",
        e.message()
    );

    // A library without the ABI's symbols: a load error, reported.
    let bad = library("virtufin_worker_testlib")
        .windows(7)
        .position(|w| w == b"Process")
        .map(|_| {
            // Same bytes with the export renamed: still ELF, no Process.
            let mut b = library("virtufin_worker_testlib");
            let mut i = 0;
            while let Some(p) = b[i..].windows(8).position(|w| w == b"Process\0") {
                b[i + p] = b'X';
                i += p + 8;
            }
            b
        })
        .unwrap();
    let id2 = start(&mut w, create_with(&bad, NATIVE, "native-bad", &[])).await;
    publish(&s.api, "native-bad", "x", &[]).await;
    let d = next_error(&mut status, &id2).await;
    assert_eq!(d["error_type"], "load:LoadError", "{d}");
    assert!(
        d["error_message"]
            .as_str()
            .unwrap()
            .contains("exports no Process"),
        "{d}"
    );
    w.stop().await;
    s.api_stop.cancel();
}

/// A real HTTP server on 127.0.0.1 serving `body` at /worker.so and a
/// redirect at /moved.
async fn code_server(body: Vec<u8>) -> std::net::SocketAddr {
    use axum::{Router, http::header, response::IntoResponse, routing::get};
    let app = Router::new()
        .route("/worker.so", get(move || async move { body.clone() }))
        .route(
            "/moved",
            get(|| async {
                (
                    axum::http::StatusCode::FOUND,
                    [(header::LOCATION, "/worker.so")],
                )
                    .into_response()
            }),
        );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    addr
}

fn from_url(url: &str, sha256: &str, topic: &str) -> pb::CreateWorkerRequest {
    let mut r = create_with(b"", NATIVE, topic, &[]);
    r.code_source = Some(pb::CodeSource {
        source: Some(Source::Url(url.into())),
        sha256: sha256.into(),
    });
    r
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_comes_from_allowed_urls_and_pinned_nix_store_paths() {
    let s = stack().await;
    let mut answers = subscribe(&s.api, "testlib.answers").await;
    let so = library("virtufin_worker_testlib");
    let addr = code_server(so.clone()).await;
    let url = format!("http://{addr}/worker.so");

    // No allow-list: a loopback address is refused (SSRF).
    let mut w = wm(&s, |c| c.worker_host = Some(host())).await;
    let e = w
        .client
        .create_worker(from_url(&url, "", "u"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("127.0.0.1") && e.message().contains("VIRTUFIN_CODE_URL_ALLOW"),
        "{}",
        e.message()
    );
    let e = w
        .client
        .create_worker(from_url("ftp://example.com/x.so", "", "u"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    w.stop().await;

    // An allow-list without this host: refused by name.
    let mut w = wm(&s, |c| {
        c.worker_host = Some(host());
        c.code_url_allow = "code.example.com".into();
    })
    .await;
    let e = w
        .client
        .create_worker(from_url(&url, "", "u"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("not one of them"), "{}", e.message());
    w.stop().await;

    // Listed explicitly: fetched, checked, run.
    let mut w = wm(&s, |c| {
        c.worker_host = Some(host());
        c.code_url_allow = "127.0.0.1".into();
    })
    .await;
    let e = w
        .client
        .create_worker(from_url(&url, &"0".repeat(64), "u"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains(&sha256_hex(&so)), "{}", e.message());
    let e = w
        .client
        .create_worker(from_url(&format!("http://{addr}/moved"), "", "u"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("redirects are not followed"),
        "{}",
        e.message()
    );
    let listed = w
        .client
        .list_workers(pb::ListWorkersRequest { filters: vec![] })
        .await
        .unwrap();
    assert!(
        listed.into_inner().workers.is_empty(),
        "refusals created nothing"
    );
    let id = start(&mut w, from_url(&url, &sha256_hex(&so), "from-url")).await;
    publish(&s.api, "from-url", "fetched", &[]).await;
    assert_eq!(data(&next(&mut answers).await), json!({"echo": "fetched"}));
    w.client
        .stop_worker(pb::StopWorkerRequest { id })
        .await
        .unwrap();
    w.stop().await;

    // A Nix store path (a temporary directory stands in for /nix/store).
    let store = tempfile::tempdir().unwrap();
    let item = store
        .path()
        .join("0c6kzph7l0dcbfmjap64f0czdafn3b7x-testlib");
    std::fs::create_dir_all(item.join("lib")).unwrap();
    std::fs::write(item.join("lib/libtestlib.so"), &so).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", item.join("lib/escape")).unwrap();
    std::fs::write(item.join("run"), "#!/bin/sh\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(item.join("run"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let nar = {
        let mut enc = nix_nar::Encoder::new(&item).unwrap();
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut enc, &mut b).unwrap();
        b
    };
    // Where Nix itself is installed, its serialisation must be the same.
    if let Ok(out) = std::process::Command::new("nix-store")
        .arg("--dump")
        .arg(&item)
        .output()
        && out.status.success()
    {
        assert!(out.stdout == nar, "nix-nar and nix-store --dump differ");
    }
    let nar_hash = {
        use sha2::Digest;
        format!(
            "sha256-{}",
            base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(&nar))
        )
    };
    let store_root = store.path().to_path_buf();
    let mut w = wm(&s, |c| {
        c.worker_host = Some(host());
        c.nix_store = store_root;
    })
    .await;
    let nix = |sub: &str| format!("nix:{}/{sub}", item.display());
    let e = w
        .client
        .create_worker(from_url(
            &nix("lib/libtestlib.so"),
            "sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            "n",
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains(&nar_hash), "{}", e.message());
    let e = w
        .client
        .create_worker(from_url(&nix("lib/libtestlib.so"), "", "n"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = w
        .client
        .create_worker(from_url(&nix("lib/escape"), &nar_hash, "n"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = w
        .client
        .create_worker(from_url("nix:/etc/hostname", &nar_hash, "n"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("not inside the Nix store"),
        "{}",
        e.message()
    );
    start(
        &mut w,
        from_url(&nix("lib/libtestlib.so"), &nar_hash, "from-nix"),
    )
    .await;
    publish(&s.api, "from-nix", "pinned", &[]).await;
    assert_eq!(data(&next(&mut answers).await), json!({"echo": "pinned"}));
    w.stop().await;
    s.api_stop.cancel();
}
