//! `darkroom get JOB [--out DIR]`: downloads a finished job's `result.png` and `job.json`.

use std::path::Path;

use darkroom_events::JobId;

use crate::client::Clients;
use crate::error::{CliError, Result};
use crate::lookup::{self, JobState};

/// Runs `darkroom get`.
pub async fn run(clients: &mut Clients, job: JobId, out: &Path) -> Result<()> {
    let state = JobState::load(clients, job).await?;
    if !state.is_known() {
        return Err(CliError::UnknownJob { job });
    }
    let Some(location) = state.result() else {
        let mut status = state.status();
        if let Some(CliError::JobFailed {
            stage,
            reason,
            message,
            ..
        }) = state.failure()
        {
            status = format!("{status} (at {stage}: {reason}: {message})");
        }
        return Err(CliError::NoResult { job, status });
    };
    let files = lookup::download(clients, job, &location, out).await?;
    eprintln!("metadata  {}", files.metadata.display());
    println!("{}", files.image.display());
    Ok(())
}
