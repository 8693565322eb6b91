//! `darkroom-dev`: provisions the local stack and runs the demo. Started by `local-dev/stack`
//! and `local-dev/demo`; reads the same `DARKROOM_*` settings as the functions.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use darkroom_local_dev::{DemoOptions, demo, provision};
use darkroom_shared::RuntimeConfig;

#[derive(Parser)]
#[command(version, about = "Darkroom's local-stack tool")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create or update every stream, consumer and KV bucket, and the S3 bucket.
    Provision,
    /// Upload one photo and follow it through the pipeline.
    Demo {
        /// Photo to upload, JPEG, PNG or WebP (default: a generated test photo, which has no
        /// face: use it with a preset without `[face]`, e.g. `--preset desk-setup`).
        #[arg(long)]
        photo: Option<PathBuf>,
        /// Preset to render with (the inbox folder it is uploaded to).
        #[arg(long, default_value = "profile-warm")]
        preset: String,
        /// Seconds to wait for the upload's event and for the job to be queued.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// Seconds to wait for each sign of the render (started, a step, completed).
        #[arg(long, default_value_t = 600)]
        render_timeout: u64,
        /// Folder to download the result into.
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config: RuntimeConfig = darkroom_shared::config::load()?;
    darkroom_shared::telemetry::init_logging(&config);
    match args.command {
        Command::Provision => provision(&config).await,
        Command::Demo {
            photo,
            preset,
            timeout,
            render_timeout,
            out,
        } => {
            let options = DemoOptions {
                photo,
                preset,
                timeout: Duration::from_secs(timeout),
                render_timeout: Duration::from_secs(render_timeout),
                out,
            };
            demo(&config, &options).await
        }
    }
}
