//! `virtufin ws …`: the websocketmanager's connections from the shell.

use std::{process::ExitCode, time::Duration};

use clap::Subcommand;
use serde_json::json;
use virtufin_websocketmanager_client::WsClient;

#[derive(Debug, Subcommand)]
pub enum WsCmd {
    /// Opens a connection (ws:// or wss://); prints its id and status.
    Connect {
        url: String,
        /// Reconnect with exponential backoff when the connection drops.
        #[arg(long)]
        auto_reconnect: bool,
        /// Forward every inbound frame to this topic.
        #[arg(long)]
        publish: Option<String>,
    },
    /// Lists every connection, one JSON object per line.
    List,
    /// Sends a message: correlated (waits for the reply) unless --raw.
    Send {
        id: String,
        message: String,
        /// Fire and forget, no correlation prefix.
        #[arg(long)]
        raw: bool,
        /// Reply timeout in milliseconds (correlated send).
        #[arg(long)]
        timeout_ms: Option<u64>,
        /// text/* and application/json go as text frames (with --raw).
        #[arg(long, default_value = "text/plain")]
        content_type: String,
    },
    /// Closes a connection and forgets it.
    Disconnect { id: String },
}

pub async fn run(addr: &str, cmd: WsCmd) -> anyhow::Result<ExitCode> {
    let c = WsClient::lazy(addr)?;
    match cmd {
        WsCmd::Connect {
            url,
            auto_reconnect,
            publish,
        } => {
            let r = c.connect(&url, auto_reconnect).await?;
            if let Some(topic) = publish {
                c.start_publish(&r.id, &topic).await?;
            }
            println!("{}", json!({"id": r.id, "status": r.status}));
        }
        WsCmd::List => {
            for x in c.list().await? {
                println!(
                    "{}",
                    json!({"id": x.id, "url": x.url, "status": x.status, "topic": x.topic, "instance_id": x.instance_id, "auto_reconnect": x.auto_reconnect, "created_at": x.created_at})
                );
            }
        }
        WsCmd::Send {
            id,
            message,
            raw,
            timeout_ms,
            content_type,
        } => {
            if raw {
                c.send_raw(&id, &message, &content_type).await?;
            } else {
                let r = c
                    .send(&id, &message, timeout_ms.map(Duration::from_millis))
                    .await?;
                println!("{}", r.response);
            }
        }
        WsCmd::Disconnect { id } => c.disconnect(&id).await?,
    }
    Ok(ExitCode::SUCCESS)
}
