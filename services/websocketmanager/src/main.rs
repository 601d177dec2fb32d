//! The virtufin-websocketmanager binary: parse, bind, run until SIGTERM.

use std::process::ExitCode;

use anyhow::Context;
use virtufin_common::{config::parse_or_exit, logging, shutdown};
use virtufin_websocketmanager::Config;

#[tokio::main]
async fn main() -> ExitCode {
    let config: Config = parse_or_exit();
    if let Err(e) = config.check() {
        eprintln!("virtufin-websocketmanager: {e}");
        return ExitCode::from(1);
    }
    logging::init("virtufin-websocketmanager");
    match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("virtufin-websocketmanager: {e}");
            ExitCode::from(1)
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let shutdown = shutdown::on_signals().context("cannot install signal handlers")?;
    let listeners = virtufin_websocketmanager::bind(&config).await?;
    virtufin_websocketmanager::run(config, listeners, shutdown).await?;
    Ok(())
}
