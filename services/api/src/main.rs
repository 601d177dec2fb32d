//! The virtufin-api binary: parse the settings, bind, run until SIGTERM.

use std::process::ExitCode;

use anyhow::Context;

use virtufin_api::Config;
use virtufin_common::{config::parse_or_exit, logging, shutdown};

#[tokio::main]
async fn main() -> ExitCode {
    let config: Config = parse_or_exit();
    if let Err(e) = config.check() {
        eprintln!("virtufin-api: {e}");
        return ExitCode::from(1);
    }
    logging::init("virtufin-api");
    match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line on stderr (the journal keeps it under systemd); the
            // error's own message already names its cause.
            eprintln!("virtufin-api: {e}");
            ExitCode::from(1)
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let shutdown = shutdown::on_signals().context("cannot install signal handlers")?;
    let listeners = virtufin_api::bind(&config).await?;
    virtufin_api::run(config, listeners, shutdown).await?;
    Ok(())
}
