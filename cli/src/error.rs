//! The CLI's errors and the exit code each one maps to.

use std::path::PathBuf;

use darkroom_events::JobId;
use darkroom_shared::RuntimeError;

/// Exit status: the command did what was asked.
pub const EXIT_OK: u8 = 0;
/// Exit status: an error talking to NATS or S3, reading a file or the configuration.
pub const EXIT_ERROR: u8 = 1;
/// Exit status: the command line is wrong (clap's own usage errors use it too).
pub const EXIT_USAGE: u8 = 2;
/// Exit status: the job failed (`upload --wait`): its stage, reason and message are printed.
pub const EXIT_JOB_FAILED: u8 = 3;
/// Exit status: the job did not finish within `--timeout`.
pub const EXIT_TIMEOUT: u8 = 4;
/// Exit status: the job is unknown, or has no result (`get`).
pub const EXIT_NO_RESULT: u8 = 5;

/// Everything that can go wrong in a command.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Configuration, NATS or a JetStream request, as the shared runtime reports it (the
    /// message names the server or the stream, bucket and key involved).
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// A NATS request of the CLI's own failed.
    #[error("NATS at {url}: {operation}: {message}")]
    Nats {
        /// The server URL.
        url: String,
        /// What was being done.
        operation: String,
        /// What the client or server said.
        message: String,
    },
    /// An S3 request failed.
    #[error("S3 {operation} s3://{bucket}/{key} at {endpoint}: {message}")]
    S3 {
        /// `PUT`, `GET`, …
        operation: &'static str,
        /// The S3 endpoint (`AWS` when none is configured).
        endpoint: String,
        /// The bucket.
        bucket: String,
        /// The key.
        key: String,
        /// What the SDK or server said.
        message: String,
    },
    /// A local file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// An argument is not usable (beyond what the parser checks).
    #[error("{0}")]
    Usage(String),
    /// The job failed for good.
    #[error("job {job} failed at {stage}: {reason}: {message}")]
    JobFailed {
        /// The job.
        job: JobId,
        /// Where it failed (`preprocess`, `inference`, …).
        stage: String,
        /// The machine-readable reason (`no_face_found`, …).
        reason: String,
        /// The message for people.
        message: String,
    },
    /// The job did not finish in time.
    #[error("job {job} did not finish within {seconds} s (last seen: {last_seen})")]
    Timeout {
        /// The job.
        job: JobId,
        /// The timeout.
        seconds: u64,
        /// The last thing heard about it.
        last_seen: String,
    },
    /// No record and no event of the job exist.
    #[error(
        "job {job} is unknown: no record in the jobs KV bucket and no lifecycle events (events are kept 7 days, records 30)"
    )]
    UnknownJob {
        /// The job.
        job: JobId,
    },
    /// The job exists but has no result to download.
    #[error("job {job} has no result: its status is {status}")]
    NoResult {
        /// The job.
        job: JobId,
        /// Where it stands.
        status: String,
    },
}

impl CliError {
    /// The process exit status for this error (see the `EXIT_*` constants).
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => EXIT_USAGE,
            CliError::JobFailed { .. } => EXIT_JOB_FAILED,
            CliError::Timeout { .. } => EXIT_TIMEOUT,
            CliError::UnknownJob { .. } | CliError::NoResult { .. } => EXIT_NO_RESULT,
            CliError::Runtime(_) | CliError::Nats { .. } | CliError::S3 { .. } => EXIT_ERROR,
            CliError::Io { .. } => EXIT_ERROR,
        }
    }

    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CliError::Io {
            path: path.into(),
            source,
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = CliError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_outcome_has_its_own_exit_code() {
        let job = JobId::for_object("b", "k", "e");
        let codes = [
            CliError::Usage("x".into()).exit_code(),
            CliError::JobFailed {
                job,
                stage: "preprocess".into(),
                reason: "no_face_found".into(),
                message: "m".into(),
            }
            .exit_code(),
            CliError::Timeout {
                job,
                seconds: 1,
                last_seen: "queued".into(),
            }
            .exit_code(),
            CliError::NoResult {
                job,
                status: "queued".into(),
            }
            .exit_code(),
            CliError::io("x", std::io::Error::other("boom")).exit_code(),
        ];
        assert_eq!(
            codes,
            [
                EXIT_USAGE,
                EXIT_JOB_FAILED,
                EXIT_TIMEOUT,
                EXIT_NO_RESULT,
                EXIT_ERROR
            ]
        );
    }
}
