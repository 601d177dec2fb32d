//! A WebSocket echo peer for the container chain test (no Python there):
//! `virtufin-ws-echo 127.0.0.1:9100` echoes every text and binary frame.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

#[tokio::main]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9100".into());
    let l = tokio::net::TcpListener::bind(&addr).await.expect("bind");
    println!("listening {addr}");
    virtufin_testkit::ws_echo_serve(l).await;
}
