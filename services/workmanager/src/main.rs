//! The virtufin-workmanager binary: parse, bind, run until SIGTERM.

use std::process::ExitCode;

use anyhow::Context;
use virtufin_common::{config::parse_or_exit, logging, shutdown};
use virtufin_workmanager::Config;

#[tokio::main]
async fn main() -> ExitCode {
    let config: Config = parse_or_exit();
    if let Err(e) = config.check() {
        eprintln!("virtufin-workmanager: {e}");
        return ExitCode::from(1);
    }
    logging::init("virtufin-workmanager");
    match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("virtufin-workmanager: {e}");
            ExitCode::from(1)
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let shutdown = shutdown::on_signals().context("cannot install signal handlers")?;
    let listeners = virtufin_workmanager::bind(&config).await?;
    virtufin_workmanager::run(config, listeners, shutdown).await?;
    Ok(())
}
