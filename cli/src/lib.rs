//! `darkroom`, the user's command line for a Darkroom studio.
//!
//! A client of the bus and the bucket only: it reads the same settings as the functions
//! ([`RuntimeConfig`]: `DARKROOM_*` variables, or the TOML file named by `DARKROOM_CONFIG`),
//! so one configuration serves the local stack (`source local-dev/env.sh`) and real AWS/NATS.
//!
//! - [`upload`]: PUT a photo into the inbox, then follow its job to the result;
//! - [`watch`]: completion events of a bucket or key prefix as they arrive;
//! - [`status`]: a job's record and latest lifecycle events;
//! - [`get`]: download a finished job's result;
//! - [`presign`]: expiring URLs to a result (GET) or into the inbox (PUT), for clients without
//!   S3 credentials;
//! - [`replay`]: put dead letters back on their original subjects.
//!
//! Exit codes are the `EXIT_*` constants of [`error`]; `cli/README.md` documents them.

pub mod client;
pub mod error;
pub mod event;
pub mod get;
pub mod lookup;
pub mod presign;
pub mod progress;
pub mod replay;
pub mod sniff;
pub mod status;
pub mod upload;
pub mod watch;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use darkroom_events::{JobId, Stage};
use darkroom_shared::RuntimeConfig;

pub use error::{CliError, Result};

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "darkroom",
    version,
    about = "Upload photos to a Darkroom studio, follow their jobs and fetch the results",
    long_about = "Upload photos to a Darkroom studio, follow their jobs and fetch the results.\n\n\
        Settings come from DARKROOM_* variables or the TOML file named by DARKROOM_CONFIG \
        (DARKROOM_NATS_URL, DARKROOM_NATS_CREDS, DARKROOM_S3_ENDPOINT, DARKROOM_S3_ACCESS_KEY_ID, \
        DARKROOM_S3_SECRET_ACCESS_KEY, DARKROOM_BUCKET, …).\n\n\
        Exit codes: 0 done, 1 error (NATS, S3, files, configuration), 2 usage, 3 the job failed, \
        4 timed out, 5 unknown job or no result."
)]
pub struct Cli {
    /// The bucket (overrides DARKROOM_BUCKET).
    #[arg(long, global = true)]
    pub bucket: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Upload a photo to inbox/<preset>/<file name>; prints the job id, or with --wait follows
    /// the job and downloads its result.
    Upload(upload::UploadArgs),
    /// Print completion events (completed, failed) of the bucket or a key prefix as they arrive.
    Watch {
        /// Only uploads whose key starts with this (`inbox/profile-warm/`).
        #[arg(long, default_value = "")]
        prefix: String,
        /// Print each CloudEvent as JSON, one per line.
        #[arg(long)]
        json: bool,
    },
    /// Show a job's record and its latest lifecycle events.
    Status {
        /// The job id.
        #[arg(value_parser = parse_job)]
        job: JobId,
        /// Print JSON: {"job", "status", "record", "events": {kind: CloudEvent}}.
        #[arg(long)]
        json: bool,
    },
    /// Download a finished job's result.png and job.json as <out>/<job>.png and <out>/<job>.json.
    Get {
        /// The job id.
        #[arg(value_parser = parse_job)]
        job: JobId,
        /// Folder to write into (created if missing).
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
    /// Print a presigned GET URL of a finished job's result.png (or job.json), valid for
    /// --expires-in.
    Url {
        /// The job id.
        #[arg(value_parser = parse_job)]
        job: JobId,
        /// How long the URL works: 90s, 15m, 2h, 7d (at most 7 days).
        #[arg(long, default_value = presign::DEFAULT_EXPIRY, value_parser = presign::parse_expiry)]
        expires_in: std::time::Duration,
        /// The URL of job.json instead of result.png.
        #[arg(long)]
        metadata: bool,
    },
    /// Print a presigned PUT URL for inbox/<preset>/<file name>, valid for --expires-in: an
    /// upload through it (no S3 credentials needed) becomes a job like any other.
    UploadUrl(presign::UploadUrlArgs),
    /// Put dead letters back on their original subjects, each once, and delete them from the
    /// dead-letter stream.
    ReplayDlq {
        /// Only the dead letters of this stage: ingest, preprocess, inference or notifier.
        #[arg(long, value_parser = parse_stage)]
        stage: Option<Stage>,
        /// Only the dead letters of this job.
        #[arg(long, value_parser = parse_job)]
        job: Option<JobId>,
        /// Print what would be replayed; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

fn parse_job(text: &str) -> Result<JobId, String> {
    text.parse().map_err(|_| {
        format!(
            "{text:?} is not a job id (a UUID like 8f0d0879-5cb0-50ec-9f57-4ca82da9b7e6, as upload and watch print it)"
        )
    })
}

fn parse_stage(text: &str) -> Result<Stage, String> {
    serde_json::from_value(serde_json::Value::String(text.to_owned()))
        .map_err(|_| format!("{text:?} is not a stage (ingest, preprocess, inference, notifier)"))
}

/// Loads the settings ([`darkroom_shared::config::load`]) with `--bucket` applied.
pub fn load_config(bucket: Option<&str>) -> Result<RuntimeConfig> {
    let mut config: RuntimeConfig = darkroom_shared::config::load()?;
    if let Some(bucket) = bucket {
        config.bucket = bucket.to_owned();
    }
    Ok(config)
}

/// Runs one command line.
pub async fn run(cli: Cli) -> Result<()> {
    let config = load_config(cli.bucket.as_deref())?;
    let mut clients = client::Clients::new(config);
    match cli.command {
        Command::Upload(args) => upload::run(&mut clients, &args).await,
        Command::Watch { prefix, json } => watch::run(&mut clients, &prefix, json).await,
        Command::Status { job, json } => status::run(&mut clients, job, json).await,
        Command::Get { job, out } => get::run(&mut clients, job, &out).await,
        Command::Url {
            job,
            expires_in,
            metadata,
        } => presign::run_url(&mut clients, job, expires_in, metadata).await,
        Command::UploadUrl(args) => presign::run_upload_url(&mut clients, &args).await,
        Command::ReplayDlq {
            stage,
            job,
            dry_run,
        } => replay::run(&mut clients, stage, job, dry_run).await,
    }
}

/// The `darkroom` program: parses the arguments, runs the command on a Tokio runtime, prints
/// any error to stderr and returns its exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("darkroom: cannot start the async runtime: {error}");
            return ExitCode::from(error::EXIT_ERROR);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("darkroom: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn stages_and_jobs_are_checked_by_the_parser() {
        let cli = Cli::try_parse_from([
            "darkroom",
            "replay-dlq",
            "--stage",
            "preprocess",
            "--job",
            "57e04871-ece8-5e29-b8ec-ddd0b120d0fb",
        ])
        .unwrap();
        match cli.command {
            Command::ReplayDlq { stage, job, .. } => {
                assert_eq!(stage, Some(Stage::Preprocess));
                assert!(job.is_some());
            }
            other => panic!("parsed as {other:?}"),
        }
        assert!(Cli::try_parse_from(["darkroom", "replay-dlq", "--stage", "gpu"]).is_err());
        assert!(Cli::try_parse_from(["darkroom", "status", "not-a-job"]).is_err());
        let cli = Cli::try_parse_from([
            "darkroom", "--bucket", "b", "upload", "x.jpg", "--preset", "p",
        ])
        .unwrap();
        assert_eq!(cli.bucket.as_deref(), Some("b"));
    }
}
