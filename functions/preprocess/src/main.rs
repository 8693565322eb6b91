//! `darkroom-preprocess`: the preprocess function.
//!
//! `serve` (the default) consumes the uploads stream; `lambda` runs the same handler on AWS
//! Lambda; `local` runs the pipeline on a file. Settings come from `DARKROOM_*` variables
//! or the file named by `DARKROOM_CONFIG` (see `PreprocessConfig`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use darkroom_preprocess::config::PreprocessConfig;

#[derive(Parser)]
#[command(
    version,
    about = "Darkroom's preprocess function: S3 upload events in, SDXL-ready jobs out"
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Consume the uploads stream on NATS (the default).
    Serve,
    /// Run as an AWS Lambda function (S3 or SQS events).
    Lambda,
    /// Run the pipeline on a local file and write input.png, control-*.png and job.json.
    ///
    /// Exits 0 on success; on rejection prints `{"reason": …, "message": …}` on stdout and
    /// exits 2 (1 for local I/O errors).
    Local {
        /// The photo.
        #[arg(long)]
        input: PathBuf,
        /// The preset to prepare it for.
        #[arg(long)]
        preset: String,
        /// Directory to write the results to (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// What the preset's `{subject}` becomes (default: the configured default subject).
        #[arg(long)]
        subject: Option<String>,
    },
}

fn main() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    let config: PreprocessConfig = darkroom_shared::config::load_or_exit("darkroom-preprocess");
    darkroom_shared::telemetry::init_logging(&config.runtime);
    match args.command.unwrap_or(Command::Serve) {
        Command::Local {
            input,
            preset,
            out,
            subject,
        } => Ok(local(&config, &input, &preset, subject.as_deref(), &out)),
        Command::Serve => {
            darkroom_shared::telemetry::init_metrics(&config.runtime)?;
            runtime()?.block_on(async {
                let shutdown = darkroom_shared::shutdown::on_signal();
                darkroom_preprocess::service::serve(config, shutdown).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Lambda => {
            runtime()?
                .block_on(darkroom_preprocess::service::lambda(config))
                .map_err(|e| anyhow::anyhow!(e))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

fn local(
    config: &PreprocessConfig,
    input: &std::path::Path,
    preset: &str,
    subject: Option<&str>,
    out: &std::path::Path,
) -> ExitCode {
    match darkroom_preprocess::local::run(config, input, preset, subject, out) {
        Ok(job) => {
            eprintln!(
                "job {} ({}×{}, preset {}) written to {}",
                job.job_id,
                job.width,
                job.height,
                job.preset,
                out.display()
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            println!("{}", error.to_json());
            eprintln!("rejected: {error}");
            match error {
                darkroom_preprocess::local::LocalError::Rejected(_) => ExitCode::from(2),
                darkroom_preprocess::local::LocalError::Io { .. } => ExitCode::from(1),
            }
        }
    }
}
