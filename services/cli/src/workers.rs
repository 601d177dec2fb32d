//! `virtufin workers …`: the workmanager's workers from the shell.

use std::{collections::HashMap, path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::Subcommand;
use serde_json::json;
use virtufin_proto::workmanager::v1::{
    self as pb, code_source::Source, work_manager_client::WorkManagerClient,
};

#[derive(Debug, Subcommand)]
pub enum WorkersCmd {
    /// Creates a worker from a code file or URL; prints its id.
    Create {
        /// The worker's code: for Python a module defining Process(event),
        /// for native workers a .so exporting Process and FreeResult.
        #[arg(required_unless_present = "url", conflicts_with = "url")]
        file: Option<PathBuf>,
        /// Fetch the code instead: http(s)://… (the workmanager's
        /// VIRTUFIN_CODE_URL_ALLOW applies) or nix:/nix/store/… (with --sha256
        /// the store path's NAR hash, sha256-<base64>).
        #[arg(long)]
        url: Option<String>,
        /// Hex SHA-256 the code must have (for nix: the NAR hash).
        #[arg(long, default_value = "")]
        sha256: String,
        /// The topic it consumes.
        #[arg(long)]
        topic: String,
        /// Default: application/x-native-dll for a .so, text/x-python otherwise.
        #[arg(long)]
        mime_type: Option<String>,
        /// Consumer group (default: the worker's id).
        #[arg(long, default_value = "")]
        group: String,
        /// Stamped on each event, NAME=VALUE; repeatable.
        #[arg(long = "config", value_parser = crate::parse_pair)]
        config: Vec<(String, String)>,
        /// NAME=VALUE; repeatable.
        #[arg(long = "tag", value_parser = crate::parse_pair)]
        tags: Vec<(String, String)>,
        /// Start it right away.
        #[arg(long)]
        start: bool,
    },
    /// Lists the workers, one JSON object per line.
    List,
    Start {
        id: String,
    },
    Stop {
        id: String,
    },
    Delete {
        id: String,
    },
    /// Follows a worker's lifecycle events (created, started, stopped,
    /// error) until interrupted.
    Logs {
        id: String,
    },
}

async fn client(addr: &str) -> anyhow::Result<WorkManagerClient<tonic::transport::Channel>> {
    let url = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    let ch = tonic::transport::Endpoint::from_shared(url)?.connect_lazy();
    Ok(WorkManagerClient::new(ch)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20))
}

pub async fn run(addr: &str, api: &str, cmd: WorkersCmd) -> anyhow::Result<ExitCode> {
    let mut c = client(addr).await?;
    let st = |s: tonic::Status| anyhow::anyhow!("{:?}: {}", s.code(), s.message());
    match cmd {
        WorkersCmd::Create {
            file,
            url,
            sha256,
            topic,
            mime_type,
            group,
            config,
            tags,
            start,
        } => {
            let named = file
                .as_ref()
                .map(|f| f.display().to_string())
                .or(url.clone())
                .unwrap_or_default();
            let mime_type = mime_type.unwrap_or_else(|| {
                if named.ends_with(".so") {
                    "application/x-native-dll".into()
                } else {
                    "text/x-python".into()
                }
            });
            let source = match (file, url) {
                (Some(file), _) => Source::Content(
                    std::fs::read(&file)
                        .with_context(|| format!("cannot read {}", file.display()))?,
                ),
                (None, Some(url)) => Source::Url(url),
                (None, None) => anyhow::bail!("give a code file or --url"),
            };
            let id = c
                .create_worker(pb::CreateWorkerRequest {
                    code_source: Some(pb::CodeSource {
                        source: Some(source),
                        sha256,
                    }),
                    mime_type,
                    topic,
                    config: config.into_iter().collect::<HashMap<_, _>>(),
                    tags: tags.into_iter().collect::<HashMap<_, _>>(),
                    group,
                })
                .await
                .map_err(st)?
                .into_inner()
                .id;
            if start {
                c.start_worker(pb::StartWorkerRequest { id: id.clone() })
                    .await
                    .map_err(st)?;
            }
            println!("{}", json!({"id": id}));
        }
        WorkersCmd::List => {
            for w in c
                .list_workers(pb::ListWorkersRequest { filters: vec![] })
                .await
                .map_err(st)?
                .into_inner()
                .workers
            {
                let status = if w.status == pb::WorkerStatus::Running as i32 {
                    "running"
                } else {
                    "stopped"
                };
                println!(
                    "{}",
                    json!({"id": w.id, "status": status, "language": w.language, "mime_type": w.mime_type, "topic": w.topic, "group": w.group, "created_at": w.created_at, "tags": w.tags, "instances": w.instances})
                );
            }
        }
        WorkersCmd::Start { id } => {
            c.start_worker(pb::StartWorkerRequest { id })
                .await
                .map_err(st)?;
        }
        WorkersCmd::Stop { id } => {
            c.stop_worker(pb::StopWorkerRequest { id })
                .await
                .map_err(st)?;
        }
        WorkersCmd::Delete { id } => {
            c.delete_worker(pb::DeleteWorkerRequest { id })
                .await
                .map_err(st)?;
        }
        WorkersCmd::Logs { id } => {
            let api = crate::api_client(api)?;
            let mut s = api
                .pubsub()
                .subscribe(virtufin_api_client::pb::SubscribeRequest {
                    topic: "workmanager.workerstatus".into(),
                    subscriber: format!("cli-logs-{}", uuid::Uuid::new_v4()),
                    group: String::new(),
                })
                .await
                .map_err(st)?
                .into_inner();
            loop {
                let m = tokio::select! {
                    m = s.message() => m.map_err(st)?,
                    _ = tokio::signal::ctrl_c() => None,
                };
                let Some(ev) = m else { break };
                let data: serde_json::Value = serde_json::from_slice(&ev.data).unwrap_or_default();
                if data["worker_id"] == id.as_str() {
                    println!("{}", crate::events::to_json(&ev));
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
