//! `darkroom-ingest`: serves the S3-event webhook and reconciles the inbox.
//!
//! Configuration comes from `DARKROOM_*` variables (see `IngestConfig`); `reconcile` runs one
//! pass and exits, for cron jobs and for operators after an outage.

use clap::{Parser, Subcommand};
use darkroom_ingest::{IngestConfig, reconcile};

#[derive(Parser)]
#[command(
    version,
    about = "Darkroom's S3-event adapter: webhook in, S3 records on the uploads stream out"
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the webhook and reconcile periodically (the default).
    Serve,
    /// Run one reconciliation pass and exit.
    Reconcile,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config: IngestConfig = darkroom_shared::config::load_or_exit("darkroom-ingest");
    darkroom_shared::telemetry::init_logging(&config.runtime);
    darkroom_shared::telemetry::init_metrics(&config.runtime)?;
    match args.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let shutdown = darkroom_shared::shutdown::on_signal();
            darkroom_ingest::run(config, shutdown).await
        }
        Command::Reconcile => {
            let relay = darkroom_ingest::connect(&config).await?;
            let report = reconcile::reconcile(&relay, &config.runtime.bucket).await?;
            println!(
                "listed {} objects, published {}",
                report.listed, report.published
            );
            Ok(())
        }
    }
}
