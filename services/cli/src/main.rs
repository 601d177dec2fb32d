//! `virtufin`: the command-line client of the Virtufin stack.

use std::{collections::HashMap, process::ExitCode, sync::OnceLock};

use clap::{Args, Parser, Subcommand};
use virtufin_api_client::ApiClient;

mod events;
mod gateway;
mod smoke;
mod up;
mod workers;
mod ws;

#[derive(Debug, Parser)]
#[command(
    name = "virtufin",
    version,
    about = "Command-line client of the Virtufin stack"
)]
struct Cli {
    /// The api's gRPC address. Default: VIRTUFIN_API_HOST:VIRTUFIN_API_GRPC_PORT,
    /// else 127.0.0.1:5002.
    #[arg(long, env = "VIRTUFIN_API", global = true)]
    api: Option<String>,

    /// The API key to present to the api (x-api-key), when it requires one.
    #[arg(long, env = "VIRTUFIN_API_KEY", global = true, hide_env_values = true)]
    api_key: Option<String>,

    /// The websocketmanager's gRPC address.
    #[arg(
        long,
        env = "VIRTUFIN_WSM",
        global = true,
        default_value = "127.0.0.1:5202"
    )]
    wsm: String,

    /// The workmanager's gRPC address.
    #[arg(
        long,
        env = "VIRTUFIN_WM",
        global = true,
        default_value = "127.0.0.1:5102"
    )]
    wm: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the seed's smoke check against the api: health, subscribe,
    /// publish, receive, unsubscribe; one PASS/FAIL line per step.
    Smoke,
    /// Reads and writes a service's state.
    #[command(subcommand)]
    State(StateCmd),
    /// Publishes one event.
    Publish(PublishArgs),
    /// Prints a topic's events as JSON lines until interrupted.
    Subscribe(SubscribeArgs),
    /// Starts the stack locally in dependency order and stops it on Ctrl-C.
    Up(up::UpArgs),
    /// Drives the websocketmanager's connections.
    #[command(subcommand)]
    Ws(ws::WsCmd),
    /// Manages the workmanager's workers.
    #[command(subcommand)]
    Workers(workers::WorkersCmd),
    /// Calls configured backends through the api's Gateway.
    #[command(subcommand)]
    Gateway(gateway::GatewayCmd),
}

#[derive(Debug, Subcommand)]
enum StateCmd {
    /// Prints a value and its etag.
    Get { service: String, key: String },
    /// Saves a value; prints the new etag.
    Set {
        service: String,
        key: String,
        value: String,
        /// Only if the stored etag still equals this one.
        #[arg(long, default_value = "")]
        etag: String,
    },
    /// Deletes a value.
    Delete {
        service: String,
        key: String,
        #[arg(long, default_value = "")]
        etag: String,
    },
    /// Prints every registered key of a service with its value.
    List { service: String },
}

#[derive(Debug, Args)]
struct PublishArgs {
    topic: String,
    /// The event data (JSON is embedded as JSON, anything else as text).
    data: String,
    /// CloudEvent type (ce-type).
    #[arg(long = "type")]
    event_type: Option<String>,
    /// CloudEvent source (ce-source).
    #[arg(long)]
    source: Option<String>,
    /// CloudEvent id (ce-id); generated when absent.
    #[arg(long)]
    id: Option<String>,
    /// More metadata, NAME=VALUE (e.g. ce-correlationid=abc); repeatable.
    #[arg(short = 'm', long = "metadata", value_parser = parse_pair)]
    metadata: Vec<(String, String)>,
}

#[derive(Debug, Args)]
struct SubscribeArgs {
    topic: String,
    /// This member's name.
    #[arg(long, default_value = "virtufin-cli")]
    subscriber: String,
    /// The consumer group (default: the subscriber's name).
    #[arg(long, default_value = "")]
    group: String,
    /// Stop after this many events.
    #[arg(long)]
    count: Option<u64>,
}

pub(crate) fn parse_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("'{s}' is not NAME=VALUE"))
}

static API_KEY: OnceLock<Option<String>> = OnceLock::new();

/// A client of the api at `addr`, presenting the configured key.
pub fn api_client(addr: &str) -> anyhow::Result<ApiClient> {
    let key = API_KEY.get().and_then(|k| k.as_deref());
    Ok(ApiClient::lazy(addr)?.with_key(key)?)
}

/// The api address from the flag or the seed's environment names.
pub fn api_addr(flag: Option<String>) -> String {
    if let Some(a) = flag {
        return a;
    }
    let host = std::env::var("VIRTUFIN_API_HOST").unwrap_or_else(|_| "127.0.0.1".into());
    let port = std::env::var("VIRTUFIN_API_GRPC_PORT").unwrap_or_else(|_| "5002".into());
    format!("{host}:{port}")
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = virtufin_common::config::parse_or_exit();
    let addr = api_addr(cli.api);
    let _ = API_KEY.set(cli.api_key);
    let result = match cli.command {
        Command::Up(args) => {
            virtufin_common::logging::init("virtufin");
            up::run(args).await
        }
        Command::Smoke => smoke::run(&addr).await,
        Command::State(c) => state(&addr, c).await,
        Command::Publish(p) => publish(&addr, p).await,
        Command::Subscribe(s) => subscribe(&addr, s).await,
        Command::Ws(c) => ws::run(&cli.wsm, c).await,
        Command::Workers(c) => workers::run(&cli.wm, &addr, c).await,
        Command::Gateway(c) => gateway::run(&addr, c).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("virtufin: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn state(addr: &str, cmd: StateCmd) -> anyhow::Result<ExitCode> {
    let api = api_client(addr)?;
    match cmd {
        StateCmd::Get { service, key } => match api.get(&service, &key).await? {
            Some((value, etag)) => {
                println!(
                    "{}",
                    serde_json::json!({"key": key, "value": value, "etag": etag})
                );
            }
            None => {
                eprintln!("no state stored for {service}/{key}");
                return Ok(ExitCode::from(3));
            }
        },
        StateCmd::Set {
            service,
            key,
            value,
            etag,
        } => {
            let etag = api.save(&service, &key, &value, &etag).await?;
            println!("{}", serde_json::json!({"etag": etag}));
        }
        StateCmd::Delete { service, key, etag } => {
            if !api.delete(&service, &key, &etag).await? {
                eprintln!("no state stored for {service}/{key}");
                return Ok(ExitCode::from(3));
            }
        }
        StateCmd::List { service } => {
            let values = api
                .state()
                .get_all_state(virtufin_api_client::pb::GetAllStateRequest { service })
                .await
                .map_err(virtufin_api_client::ClientError::from)?
                .into_inner()
                .values;
            println!("{}", serde_json::json!({ "values": values }));
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn publish(addr: &str, p: PublishArgs) -> anyhow::Result<ExitCode> {
    let api = api_client(addr)?;
    let mut md: HashMap<String, String> = p.metadata.into_iter().collect();
    let attrs = [
        ("ce-type", p.event_type),
        ("ce-source", p.source),
        ("ce-id", p.id),
    ];
    for (k, v) in attrs {
        if let Some(v) = v {
            md.insert(k.into(), v);
        }
    }
    let id = api.publish(&p.topic, &p.data, md).await?;
    println!("{}", serde_json::json!({"id": id}));
    Ok(ExitCode::SUCCESS)
}

async fn subscribe(addr: &str, s: SubscribeArgs) -> anyhow::Result<ExitCode> {
    let api = api_client(addr)?;
    let mut stream = api
        .pubsub()
        .subscribe(virtufin_api_client::pb::SubscribeRequest {
            topic: s.topic,
            subscriber: s.subscriber,
            group: s.group,
        })
        .await
        .map_err(virtufin_api_client::ClientError::from)?
        .into_inner();
    let mut n = 0u64;
    loop {
        let msg = tokio::select! {
            m = stream.message() => m.map_err(virtufin_api_client::ClientError::from)?,
            _ = tokio::signal::ctrl_c() => None,
        };
        let Some(ev) = msg else { break };
        println!("{}", events::to_json(&ev));
        n += 1;
        if s.count.is_some_and(|c| n >= c) {
            break;
        }
    }
    Ok(ExitCode::SUCCESS)
}
