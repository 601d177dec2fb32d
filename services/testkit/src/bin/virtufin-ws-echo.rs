//! A WebSocket echo peer for the container chain test (no Python there):
//! `virtufin-ws-echo 127.0.0.1:9100` echoes every text and binary frame.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use futures_util::{SinkExt, StreamExt};

#[tokio::main]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9100".into());
    let l = tokio::net::TcpListener::bind(&addr).await.expect("bind");
    println!("listening {addr}");
    while let Ok((tcp, _)) = l.accept().await {
        tokio::spawn(async move {
            let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                return;
            };
            while let Some(Ok(m)) = ws.next().await {
                if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                    return;
                }
            }
        });
    }
}
