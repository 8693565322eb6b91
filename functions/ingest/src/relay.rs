//! Relays announced uploads onto the uploads stream, once per object version.

use aws_sdk_s3::error::SdkError;
use aws_sdk_s3::operation::head_object::HeadObjectError;
use chrono::{SecondsFormat, Utc};
use darkroom_events::subjects;
use darkroom_events::{JobId, ObjectRef, S3EventRecord, S3Notification};
use darkroom_shared::jobs::{JobRecord, JobStore};
use darkroom_shared::publish::Publisher;
use darkroom_shared::receipt;
use darkroom_shared::telemetry::TraceParent;

use crate::{IngestError, Result};

/// What became of one announced object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relayed {
    /// Published on the uploads stream.
    Published(JobId),
    /// Already known (a job record exists, or the stream dropped it as a duplicate).
    Duplicate(JobId),
    /// Outside the inbox prefix: not Darkroom's to process.
    OutsideInbox,
    /// Gone before it could be looked at (deleted right after upload).
    Vanished,
}

/// Publishes uploads as S3 event records on `darkroom.uploads.<bucket>`.
#[derive(Clone)]
pub struct UploadRelay {
    publisher: Publisher,
    jobs: JobStore,
    s3: aws_sdk_s3::Client,
    inbox_prefix: String,
}

impl UploadRelay {
    /// A relay for objects under `inbox_prefix`.
    pub fn new(
        publisher: Publisher,
        jobs: JobStore,
        s3: aws_sdk_s3::Client,
        inbox_prefix: impl Into<String>,
    ) -> Self {
        UploadRelay {
            publisher,
            jobs,
            s3,
            inbox_prefix: inbox_prefix.into(),
        }
    }

    /// The S3 client the relay looks objects up with.
    pub fn s3(&self) -> &aws_sdk_s3::Client {
        &self.s3
    }

    /// The inbox prefix watched.
    pub fn inbox_prefix(&self) -> &str {
        &self.inbox_prefix
    }

    /// Relays one object, stamped with `event_source` (`darkroom:ingest`, `darkroom:reconciler`).
    ///
    /// The `Nats-Msg-Id` is the job id, so the stream drops repeats inside its duplicate window,
    /// and the job record drops them after it: one object version, one record downstream.
    pub async fn relay(&self, mut object: ObjectRef, event_source: &str) -> Result<Relayed> {
        if !object.key.starts_with(&self.inbox_prefix) || object.key.ends_with('/') {
            return Ok(Relayed::OutsideInbox);
        }
        if object.etag.is_none() {
            match self.head(&object).await? {
                Some(found) => object = found,
                None => return Ok(Relayed::Vanished),
            }
        }
        let Some(job) = object.job_id() else {
            return Err(IngestError::Storage(format!("{object} has no ETag")));
        };
        if self.jobs.get(job).await?.is_some() {
            return Ok(Relayed::Duplicate(job));
        }
        // No record: new, or handled so long ago that its record has expired. The receipt
        // preprocess wrote tells them apart for as long as the upload's outputs live.
        let handled = receipt::exists(&self.s3, &object.bucket, job)
            .await
            .map_err(|e| IngestError::Storage(e.to_string()))?;
        if handled {
            return Ok(Relayed::Duplicate(job));
        }
        let now = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
        let notification = S3Notification {
            records: vec![S3EventRecord::object_created(
                event_source,
                &object,
                Some(now),
            )],
        };
        let payload = serde_json::to_vec(&notification)
            .map_err(|e| IngestError::Storage(format!("encode notification: {e}")))?;
        let fresh = self
            .publisher
            .publish_deduplicated(
                subjects::uploads_subject(&object.bucket),
                &job.to_string(),
                payload.into(),
                Some(TraceParent::new_root()),
            )
            .await?;
        // The record goes in after the publish: if we die in between, the next event or the
        // reconciler publishes again and the stream or preprocess drops the repeat.
        self.jobs.create(&JobRecord::received(job, object)).await?;
        Ok(if fresh {
            Relayed::Published(job)
        } else {
            Relayed::Duplicate(job)
        })
    }

    async fn head(&self, object: &ObjectRef) -> Result<Option<ObjectRef>> {
        match self
            .s3
            .head_object()
            .bucket(&object.bucket)
            .key(&object.key)
            .send()
            .await
        {
            Ok(head) => Ok(Some(ObjectRef {
                etag: head.e_tag().map(darkroom_events::s3::normalize_etag),
                version_id: head.version_id().map(str::to_owned),
                size: head.content_length().and_then(|n| u64::try_from(n).ok()),
                ..object.clone()
            })),
            Err(SdkError::ServiceError(e)) if matches!(e.err(), HeadObjectError::NotFound(_)) => {
                Ok(None)
            }
            Err(e) => Err(IngestError::Storage(format!(
                "HEAD {object}: {}",
                aws_sdk_s3::error::DisplayErrorContext(e)
            ))),
        }
    }
}
