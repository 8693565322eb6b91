//! `darkroom-notifier`: the notifier function.
//!
//! `serve` (the default) consumes the events stream; `lambda` runs the same handler on AWS
//! Lambda. Settings come from `DARKROOM_*` variables or the file named by `DARKROOM_CONFIG`
//! (see `NotifierConfig`).

use clap::{Parser, Subcommand};
use darkroom_notifier::config::NotifierConfig;

#[derive(Parser)]
#[command(
    version,
    about = "Darkroom's notifier: lifecycle events out to NATS subjects and signed webhooks"
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Consume the events stream on NATS (the default).
    Serve,
    /// Run as an AWS Lambda function (the CloudEvent as payload, or SQS records).
    Lambda,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config: NotifierConfig = darkroom_shared::config::load_or_exit("darkroom-notifier");
    darkroom_shared::telemetry::init_logging(&config.runtime);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match args.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            darkroom_shared::telemetry::init_metrics(&config.runtime)?;
            runtime.block_on(async {
                let shutdown = darkroom_shared::shutdown::on_signal();
                darkroom_notifier::service::serve(config, shutdown).await
            })
        }
        Command::Lambda => runtime
            .block_on(darkroom_notifier::service::lambda(config))
            .map_err(|e| anyhow::anyhow!(e)),
    }
}
