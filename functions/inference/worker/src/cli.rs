//! The `darkroom-inference` command line (its `main.rs` only calls [`main`]).

use clap::{Parser, Subcommand};

use crate::config::WorkerConfig;
use crate::service;

#[derive(Parser)]
#[command(
    version,
    about = "Darkroom's inference function: prepared jobs in, studio pictures and completion events out"
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Load the model and consume the jobs stream on NATS (the default).
    Serve,
}

/// The `darkroom-inference` command: parses the arguments, reads the settings and runs.
///
/// # Errors
/// Bad settings, or what [`service::serve`] reports.
pub fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config: WorkerConfig = darkroom_shared::config::load_or_exit("darkroom-inference");
    darkroom_shared::telemetry::init_logging(&config.runtime);
    match args.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            darkroom_shared::telemetry::init_metrics(&config.runtime)?;
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(async {
                    let shutdown = darkroom_shared::shutdown::on_signal();
                    service::serve(config, shutdown).await
                })
        }
    }
}
