//! Job records in the jobs KV bucket: one per upload, keyed by job id.

use async_nats::jetstream::kv;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use darkroom_events::{FailureReason, JobId, ObjectRef};
use serde::{Deserialize, Serialize};

use crate::{Result, RuntimeError};

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// The upload's event was accepted onto the uploads stream.
    Received,
    /// Preprocessed; waiting for a GPU.
    Queued,
    /// A GPU worker is rendering it.
    Running,
    /// The result is stored.
    Completed,
    /// Failed for good.
    Failed,
}

/// The state of one job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// The job.
    pub job_id: JobId,
    /// The upload.
    pub source: ObjectRef,
    /// Where it stands.
    pub status: JobStatus,
    /// Preset, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    /// When the record was created.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// Why it failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<FailureReason>,
    /// The worker rendering or having rendered it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// Deliveries of its inference job so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// The result image, once stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<ObjectRef>,
}

impl JobRecord {
    /// A new record for an upload whose event was just accepted.
    pub fn received(job_id: JobId, source: ObjectRef) -> Self {
        let now = Utc::now();
        JobRecord {
            job_id,
            source,
            status: JobStatus::Received,
            preset: None,
            created_at: now,
            updated_at: now,
            failure: None,
            worker: None,
            attempts: None,
            result: None,
        }
    }
}

/// The jobs KV bucket.
#[derive(Clone)]
pub struct JobStore {
    kv: kv::Store,
}

impl JobStore {
    /// Opens the bucket (it must exist: see [`crate::topology::Topology::ensure`]).
    pub async fn open(js: &async_nats::jetstream::Context) -> Result<Self> {
        let kv = js
            .get_key_value(darkroom_events::subjects::JOBS_KV)
            .await
            .map_err(|e| RuntimeError::jetstream("open jobs KV", e))?;
        Ok(JobStore { kv })
    }

    /// The record of `job` and its revision, if there is one.
    pub async fn get(&self, job: JobId) -> Result<Option<(JobRecord, u64)>> {
        crate::kv::read_json(&self.kv, &job.to_string()).await
    }

    /// Stores a new record; `false` when one already exists (someone else got there first).
    pub async fn create(&self, record: &JobRecord) -> Result<bool> {
        let key = record.job_id.to_string();
        match self.kv.create(&key, encode(record)).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(RuntimeError::jetstream(format!("create job {key}"), e)),
        }
    }

    /// Changes the job's record with compare-and-set, retrying when another writer got in
    /// between (ingest creating it, preprocess queueing it, a worker moving it on). A missing
    /// record starts as [`JobRecord::received`] from `source`. `change` edits the record and
    /// answers whether to store it (`false` leaves it as it is, e.g. a status that would move
    /// backwards); `updated_at` is set on every stored change. Returns the record as it stands.
    pub async fn transition(
        &self,
        job: JobId,
        source: &ObjectRef,
        change: impl Fn(&mut JobRecord) -> bool,
    ) -> Result<JobRecord> {
        for _ in 0..8 {
            match self.get(job).await? {
                None => {
                    let mut record = JobRecord::received(job, source.clone());
                    if !change(&mut record) {
                        return Ok(record);
                    }
                    if self.create(&record).await? {
                        return Ok(record);
                    }
                }
                Some((mut record, revision)) => {
                    if !change(&mut record) {
                        return Ok(record);
                    }
                    record.updated_at = Utc::now();
                    if self.update(&record, revision).await? {
                        return Ok(record);
                    }
                }
            }
        }
        Err(RuntimeError::jetstream(
            format!("update job {job}"),
            "the record kept changing under us",
        ))
    }

    /// Replaces the record if it is still at `revision` (compare-and-set); `false` if it moved on.
    pub async fn update(&self, record: &JobRecord, revision: u64) -> Result<bool> {
        let key = record.job_id.to_string();
        match self.kv.update(&key, encode(record), revision).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(false),
            Err(e) => Err(RuntimeError::jetstream(format!("update job {key}"), e)),
        }
    }
}

fn encode(record: &JobRecord) -> Bytes {
    serde_json::to_vec(record)
        .expect("job records always serialise")
        .into()
}
