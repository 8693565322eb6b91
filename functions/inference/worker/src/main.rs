//! `darkroom-inference`: the GPU worker. Loads the SDXL model named by `DARKROOM_MODEL`, then
//! consumes the jobs stream until SIGINT/SIGTERM (finishing or handing back the job in hand).
//! Settings come from `DARKROOM_*` variables or the file named by `DARKROOM_CONFIG` (see
//! `WorkerConfig`).

use clap::{Parser, Subcommand};
use darkroom_inference_worker::config::WorkerConfig;

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

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config: WorkerConfig = darkroom_shared::config::load()?;
    darkroom_shared::telemetry::init_logging(&config.runtime);
    match args.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            darkroom_shared::telemetry::init_metrics(&config.runtime)?;
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(async {
                    let shutdown = darkroom_shared::shutdown::on_signal();
                    darkroom_inference_worker::service::serve(config, shutdown).await
                })
        }
    }
}
