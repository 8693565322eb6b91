//! What is known about a job: its record in the jobs KV bucket and the last lifecycle event of
//! each kind on the events stream (`status`, `get`, and `upload --wait`'s fallback).

use std::path::{Path, PathBuf};

use bytes::Bytes;
use darkroom_events::{CloudEvent, JobCompleted, JobFailed, JobId, LifecycleKind};
use darkroom_shared::jobs::{JobRecord, JobStatus};

use crate::client::Clients;
use crate::error::{CliError, Result};
use crate::event::{Lifecycle, reason_code};

/// The kinds in pipeline order.
pub const KINDS: [LifecycleKind; 5] = [
    LifecycleKind::Queued,
    LifecycleKind::Started,
    LifecycleKind::Progress,
    LifecycleKind::Completed,
    LifecycleKind::Failed,
];

/// One stored lifecycle event: the bytes as stored and, when they parse, the typed event.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    /// The kind (the subject's last token).
    pub kind: LifecycleKind,
    /// The CloudEvent bytes.
    pub bytes: Bytes,
    /// The typed event; `None` when the bytes are not a valid lifecycle event.
    pub event: Option<Lifecycle>,
}

/// A job's record and latest events.
#[derive(Debug, Clone)]
pub struct JobState {
    /// The job.
    pub job: JobId,
    /// Its record and the record's revision, if it has one.
    pub record: Option<(JobRecord, u64)>,
    /// The last event of each kind that has one, in pipeline order.
    pub events: Vec<StoredEvent>,
}

/// Where a finished job's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultLocation {
    /// Their bucket.
    pub bucket: String,
    /// The result image (`outputs/<job>/result.png`).
    pub image_key: String,
    /// The render's record (`outputs/<job>/job.json`).
    pub metadata_key: String,
}

impl ResultLocation {
    /// Where the worker stores a job's files in `bucket`: `outputs/<job>/result.png` and
    /// `outputs/<job>/job.json`.
    pub fn conventional(bucket: &str, job: JobId) -> Self {
        ResultLocation {
            bucket: bucket.to_owned(),
            image_key: format!("outputs/{job}/result.png"),
            metadata_key: format!("outputs/{job}/job.json"),
        }
    }

    /// The files a `completed` event names.
    pub fn of(event: &CloudEvent<JobCompleted>) -> Self {
        ResultLocation {
            bucket: event.data.result.bucket.clone(),
            image_key: event.data.result.key.clone(),
            metadata_key: event.data.metadata.key.clone(),
        }
    }
}

impl JobState {
    /// Reads the record and the last event of each kind.
    pub async fn load(clients: &mut Clients, job: JobId) -> Result<Self> {
        let record = clients.job_record(job).await?;
        let mut events = Vec::new();
        for kind in KINDS {
            if let Some(bytes) = clients.last_event(job, kind).await? {
                let event = Lifecycle::parse(&bytes).ok();
                events.push(StoredEvent { kind, bytes, event });
            }
        }
        Ok(JobState {
            job,
            record,
            events,
        })
    }

    /// Whether anything at all is known of the job.
    pub fn is_known(&self) -> bool {
        self.record.is_some() || !self.events.is_empty()
    }

    /// The latest `completed` event, if any.
    pub fn completed(&self) -> Option<&CloudEvent<JobCompleted>> {
        self.events.iter().find_map(|stored| match &stored.event {
            Some(Lifecycle::Completed(event)) => Some(&**event),
            _ => None,
        })
    }

    /// The latest `failed` event, if any.
    pub fn failed(&self) -> Option<&CloudEvent<JobFailed>> {
        self.events.iter().find_map(|stored| match &stored.event {
            Some(Lifecycle::Failed(event)) => Some(event),
            _ => None,
        })
    }

    /// Where the job stands, in words: the record's status, or else the latest event's kind.
    pub fn status(&self) -> String {
        if let Some((record, _)) = &self.record {
            return status_word(record.status).to_owned();
        }
        self.events
            .iter()
            .filter_map(|stored| stored.event.as_ref())
            .max_by_key(|event| event.time())
            .map_or_else(
                || "unknown".to_owned(),
                |event| event.kind().as_str().to_owned(),
            )
    }

    /// Where its result is, when it has one: the `completed` event's files, or the conventional
    /// keys when only the record says `completed` (its events have expired).
    pub fn result(&self) -> Option<ResultLocation> {
        if let Some(event) = self.completed() {
            return Some(ResultLocation::of(event));
        }
        match &self.record {
            Some((record, _)) if record.status == JobStatus::Completed => Some(
                ResultLocation::conventional(&record.source.bucket, self.job),
            ),
            _ => None,
        }
    }

    /// The job's failure as an error, from its `failed` event or else its record.
    pub fn failure(&self) -> Option<CliError> {
        if let Some(event) = self.failed() {
            return Some(CliError::JobFailed {
                job: self.job,
                stage: event.data.stage.to_string(),
                reason: reason_code(event.data.reason),
                message: event.data.message.clone(),
            });
        }
        match &self.record {
            Some((record, _)) if record.status == JobStatus::Failed => Some(CliError::JobFailed {
                job: self.job,
                stage: "unknown".to_owned(),
                reason: record
                    .failure
                    .map_or_else(|| "unknown".to_owned(), reason_code),
                message: "the job record says failed; its failed event has expired".to_owned(),
            }),
            _ => None,
        }
    }
}

/// A record status in words (`queued`, `completed`, …).
pub fn status_word(status: JobStatus) -> &'static str {
    match status {
        JobStatus::Received => "received",
        JobStatus::Queued => "queued",
        JobStatus::Running => "running",
        JobStatus::Completed => "completed",
        JobStatus::Failed => "failed",
    }
}

/// The files a download wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downloaded {
    /// `<out>/<job>.png`.
    pub image: PathBuf,
    /// `<out>/<job>.json`.
    pub metadata: PathBuf,
}

/// Downloads a job's result image and record into `out` (created if missing) as `<job>.png`
/// and `<job>.json`.
pub async fn download(
    clients: &mut Clients,
    job: JobId,
    location: &ResultLocation,
    out: &Path,
) -> Result<Downloaded> {
    std::fs::create_dir_all(out).map_err(|e| CliError::io(out, e))?;
    let image = out.join(format!("{job}.png"));
    let metadata = out.join(format!("{job}.json"));
    clients
        .download(&location.bucket, &location.image_key, &image)
        .await?;
    clients
        .download(&location.bucket, &location.metadata_key, &metadata)
        .await?;
    Ok(Downloaded { image, metadata })
}
