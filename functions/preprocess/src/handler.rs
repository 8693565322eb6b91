//! The preprocess function: an S3 upload event in, a prepared job on the jobs stream out.
//!
//! One [`PreprocessHandler`] serves both transports: the shared JetStream loop on the uploads
//! stream (`darkroom-preprocess serve`) and the shared Lambda adapter for S3 → Lambda or
//! S3 → SQS → Lambda (`darkroom-preprocess lambda`). For each `ObjectCreated` record of an
//! object under the inbox prefix it runs, top to bottom:
//!
//! 1. **identify**: the job id from bucket, key and ETag (a HEAD supplies a missing ETag);
//!    a job whose record says `queued` or further along is done: nothing is redone;
//! 2. **fetch** ([`darkroom_shared::fetch`]): HEAD, refuse over the byte limit, streamed GET with a cap;
//! 3. **resolve** the preset ([`crate::job`]): metadata, then key, then the default;
//! 4. **prepare** ([`crate::prepare`]) on a blocking thread, and encode the PNGs;
//! 5. **store** `work/<job>/input.png` and `work/<job>/control-<kind>.png`;
//! 6. **publish** the [`InferenceJob`](darkroom_events::InferenceJob) on
//!    `darkroom.jobs.inference` with `Nats-Msg-Id` = the job id, after `queued` (so a
//!    worker's `started` never precedes it);
//! 7. **record** the job as `queued` in the jobs KV bucket.
//!
//! Every step is idempotent, so a delivery that died half-way completes on redelivery: the
//! PUTs overwrite identical bytes, JetStream drops the repeated job and `queued` event by
//! their ids (inside its duplicate window, longer than the loop's redelivery delays), and
//! the record is written last, so `queued` in the KV bucket means both were published.
//!
//! Errors: a refused upload, an unknown preset or a missing object is permanent: the
//! record is marked `failed` and the loop terminates the message, dead-letters it and
//! publishes `failed` with the reason. S3 or NATS trouble is transient and retried.
//! Records skipped without a job: `s3:TestEvent`, anything but `ObjectCreated:*`, keys
//! outside the inbox prefix (Darkroom's own `work/` and `outputs/` writes) and folders.

use std::sync::Arc;
use std::time::Instant;

use tracing::Instrument;

use aws_sdk_s3::primitives::ByteStream;
use darkroom_events::s3::{S3Message, parse_s3_message};
use darkroom_events::subjects::INFERENCE_JOBS_SUBJECT;
use darkroom_events::{
    CloudEvent, FailureReason, JobFailed, JobId, JobQueued, ObjectRef, S3EventRecord, Stage,
};
use darkroom_shared::jobs::{JobRecord, JobStatus, JobStore};
use darkroom_shared::preset::{ControlKind, Preset, PresetLibrary};
use darkroom_shared::publish::Publisher;
use darkroom_shared::telemetry::TraceParent;
use darkroom_shared::workers::{AssetNeeds, WorkerInventory, WorkerRegistry};
use darkroom_shared::{Delivery, Handler, HandlerError, JobContext, RuntimeError};

use crate::config::PreprocessConfig;
use crate::job::{self, JobError, JobOutput};
use darkroom_shared::fetch::{self, FetchError};
use darkroom_shared::receipt::{self, Decision, Receipt};

/// The CloudEvents `source` of everything preprocess publishes.
pub const SOURCE: &str = "/darkroom/preprocess";

/// What became of one S3 record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Prepared, stored and published.
    Queued(JobId),
    /// Its record says `queued` or further along: nothing was redone.
    AlreadyQueued(JobId),
    /// It has no record but a receipt: it was handled once, and its records have expired
    /// since (see `darkroom_shared::receipt`). Nothing was redone.
    HandledEarlier(JobId),
    /// Not an upload this function handles (see the module docs).
    Skipped,
}

/// The preprocess handler: S3 client, bus, job records, presets and settings.
#[derive(Clone)]
pub struct PreprocessHandler {
    s3: aws_sdk_s3::Client,
    publisher: Publisher,
    jobs: JobStore,
    presets: Arc<PresetLibrary>,
    config: Arc<PreprocessConfig>,
    workers: Arc<WorkerCheck>,
}

/// The running workers' inventories, read at most every [`INVENTORY_TTL`].
#[derive(Default)]
struct WorkerCheck {
    registry: tokio::sync::OnceCell<WorkerRegistry>,
    cached: tokio::sync::Mutex<Option<(Instant, Vec<WorkerInventory>)>>,
}

/// How long preprocess trusts the workers' inventories it read.
const INVENTORY_TTL: std::time::Duration = std::time::Duration::from_secs(5);

impl PreprocessHandler {
    /// A handler over these clients. `publisher` should publish as [`SOURCE`].
    pub fn new(
        s3: aws_sdk_s3::Client,
        publisher: Publisher,
        jobs: JobStore,
        presets: PresetLibrary,
        config: PreprocessConfig,
    ) -> Self {
        PreprocessHandler {
            s3,
            publisher,
            jobs,
            presets: Arc::new(presets),
            config: Arc::new(config),
            workers: Arc::default(),
        }
    }

    /// The publisher, for the transports that report failures with it.
    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    /// Handles one S3 record (see the module docs for the steps).
    ///
    /// # Errors
    /// A [`HandlerError`] tied to the record's job when the job is known.
    pub async fn handle_record(
        &self,
        record: &S3EventRecord,
        traceparent: Option<TraceParent>,
    ) -> Result<Outcome, HandlerError> {
        if !record.is_object_created() {
            return Ok(Outcome::Skipped);
        }
        let mut object = record.object_ref().map_err(|e| {
            HandlerError::permanent(FailureReason::InvalidEvent, format!("S3 record: {e}"))
        })?;
        if !self.in_inbox(&object.key) {
            tracing::debug!(%object, "outside the inbox; skipped");
            return Ok(Outcome::Skipped);
        }
        // With the ETag in the event, a finished job costs one KV read and no S3 request.
        let mut info = None;
        if object.etag.is_none() {
            let head = fetch::head(&self.s3, &object).await.map_err(fetch_error)?;
            object.etag.clone_from(&head.etag);
            info = Some(head);
        }
        let Some(job_id) = object.job_id() else {
            return Err(HandlerError::permanent(
                FailureReason::InvalidEvent,
                format!("{object} has no ETag"),
            ));
        };
        let context = JobContext {
            job_id,
            source: Some(object.clone()),
        };
        match self.jobs.get(job_id).await.map_err(runtime_error)? {
            Some((record, _))
                if matches!(
                    record.status,
                    JobStatus::Queued | JobStatus::Running | JobStatus::Completed
                ) =>
            {
                tracing::info!(job = %job_id, status = ?record.status, "already queued; nothing to do");
                return Ok(Outcome::AlreadyQueued(job_id));
            }
            Some(_) => {}
            None => {
                if receipt::exists(&self.s3, &object.bucket, job_id)
                    .await
                    .map_err(fetch_error)?
                {
                    tracing::info!(job = %job_id, "handled earlier (receipt, no record); nothing to do");
                    return Ok(Outcome::HandledEarlier(job_id));
                }
                // The record before any receipt: a receipt without a record then always means
                // an expired record, never an unfinished first attempt.
                self.jobs
                    .create(&JobRecord::received(job_id, object.clone()))
                    .await
                    .map_err(runtime_error)?;
            }
        }
        let span = tracing::info_span!("job", job = %job_id, object = %object);
        match self
            .run(job_id, object, info, traceparent)
            .instrument(span)
            .await
        {
            Ok(()) => Ok(Outcome::Queued(job_id)),
            Err(error) => {
                let error = error.with_job(context.clone());
                if error.is_permanent() {
                    self.mark(&context, JobStatus::Failed, None, Some(error.reason))
                        .await
                        .unwrap_or_else(
                            |e| tracing::warn!(error = %e, "cannot mark the job failed"),
                        );
                    // Refused for good: never again, however long the upload stays.
                    if let Some(source) = &context.source {
                        self.write_receipt(job_id, source, Decision::Refused)
                            .await
                            .unwrap_or_else(
                                |e| tracing::warn!(error = %e, "cannot write the receipt"),
                            );
                    }
                }
                Err(error)
            }
        }
    }

    /// Refuses a preset that names a LoRA, ControlNet or LUT no running worker has. With no
    /// worker running, or the inventories unreadable, nothing can be known: the job is queued
    /// and the worker that picks it up decides.
    async fn check_workers(&self, preset: &Preset) -> Result<(), HandlerError> {
        let needs = AssetNeeds {
            loras: preset.loras.iter().map(|l| l.name.as_str()).collect(),
            controlnets: preset
                .controlnets
                .iter()
                .map(|c| c.model.as_str())
                .collect(),
            luts: preset
                .tone
                .iter()
                .filter_map(|t| t.lut.as_deref())
                .collect(),
            depth_model: preset.control_kinds().contains(&ControlKind::Depth),
            pose_model: preset.control_kinds().contains(&ControlKind::Pose),
        };
        if needs == AssetNeeds::default() {
            return Ok(());
        }
        let inventories = match self.live_workers().await {
            Ok(inventories) => inventories,
            Err(error) => {
                tracing::warn!(%error, "cannot read the workers' inventories; not checking");
                return Ok(());
            }
        };
        match darkroom_shared::workers::unservable(&inventories, &needs) {
            None => Ok(()),
            Some(why) => Err(HandlerError::permanent(
                FailureReason::ModelError,
                format!("preset {}: {why}", preset.name),
            )),
        }
    }

    async fn live_workers(&self) -> Result<Vec<WorkerInventory>, RuntimeError> {
        let mut cached = self.workers.cached.lock().await;
        if let Some((at, inventories)) = &*cached
            && at.elapsed() < INVENTORY_TTL
        {
            return Ok(inventories.clone());
        }
        let registry = self
            .workers
            .registry
            .get_or_try_init(|| WorkerRegistry::open(self.publisher.jetstream()))
            .await?;
        let inventories = registry.live().await?;
        *cached = Some((Instant::now(), inventories.clone()));
        Ok(inventories)
    }

    fn in_inbox(&self, key: &str) -> bool {
        key.starts_with(&self.config.preprocess_inbox_prefix) && !key.ends_with('/')
    }

    async fn run(
        &self,
        job_id: JobId,
        mut object: ObjectRef,
        info: Option<fetch::ObjectInfo>,
        traceparent: Option<TraceParent>,
    ) -> Result<(), HandlerError> {
        let started = Instant::now();
        let max_bytes = self.config.preprocess_max_bytes;
        let info = match info {
            Some(info) => info,
            None => fetch::head(&self.s3, &object).await.map_err(fetch_error)?,
        };
        if let (Some(announced), Some(found)) = (&object.etag, &info.etag)
            && announced != found
        {
            return Err(fetch_error(FetchError::Replaced {
                object: object.to_string(),
                announced: announced.clone(),
                found: found.clone(),
            }));
        }
        if let Some(size) = info.size
            && size > max_bytes as u64
        {
            return Err(fetch_error(FetchError::TooLarge {
                object: object.to_string(),
                len: size,
                max_bytes: max_bytes as u64,
                from_head: true,
            }));
        }
        object.size = object.size.or(info.size);
        object.version_id = object.version_id.or_else(|| info.version_id.clone());

        let preset_name = job::preset_name(
            &object.key,
            &self.config.preprocess_inbox_prefix,
            info.metadata(job::PRESET_METADATA),
            self.config.preprocess_default_preset.as_deref(),
        )
        .ok_or(JobError::NoPreset)
        .map_err(job_error)?;
        let preset = self
            .presets
            .get(preset_name)
            .map_err(|e| job_error(e.into()))?
            .clone();
        let options = job::prepare_options(&preset, &self.config);
        self.check_workers(&preset).await?;
        let subject = job::subject(
            info.metadata(job::SUBJECT_METADATA),
            &self.config.preprocess_default_subject,
        );

        let bytes = fetch::get_capped(&self.s3, &object, info.raw_etag.as_deref(), max_bytes)
            .await
            .map_err(fetch_error)?;
        let fetched = started.elapsed();

        let source = object.clone();
        let output = tokio::task::spawn_blocking(move || {
            let prepared = crate::prepare(&bytes, &options)?;
            job::job_output(job_id, source, &preset, &subject, &prepared)
        })
        .await
        .map_err(|e| {
            // A panic on some input would panic again on every delivery.
            HandlerError::permanent(
                FailureReason::Internal,
                format!("the pipeline failed unexpectedly: {e}"),
            )
        })?
        .map_err(job_error)?;
        let prepared = started.elapsed();

        self.store(&object.bucket, &output).await?;
        self.write_receipt(job_id, &object, Decision::Queued)
            .await
            .map_err(runtime_error)?;
        self.publish(&output, traceparent).await?;
        self.mark(
            &JobContext {
                job_id,
                source: Some(object),
            },
            JobStatus::Queued,
            Some(&output.job.preset),
            None,
        )
        .await
        .map_err(runtime_error)?;
        tracing::info!(
            job = %job_id,
            preset = %output.job.preset,
            width = output.job.width,
            height = output.job.height,
            fetch_ms = fetched.as_millis() as u64,
            prepare_ms = (prepared - fetched).as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            "queued"
        );
        Ok(())
    }

    async fn store(&self, bucket: &str, output: &JobOutput) -> Result<(), HandlerError> {
        for artefact in &output.artefacts {
            self.s3
                .put_object()
                .bucket(bucket)
                .key(&artefact.key)
                .content_type("image/png")
                .body(ByteStream::from(artefact.png.clone()))
                .send()
                .await
                .map_err(|e| {
                    HandlerError::transient(
                        FailureReason::Internal,
                        format!(
                            "S3 PUT s3://{bucket}/{}: {}",
                            artefact.key,
                            aws_sdk_s3::error::DisplayErrorContext(e)
                        ),
                    )
                })?;
        }
        Ok(())
    }

    async fn publish(
        &self,
        output: &JobOutput,
        traceparent: Option<TraceParent>,
    ) -> Result<(), HandlerError> {
        let job_id = output.job.job_id;
        let id = job_id.to_string();
        let event = CloudEvent::new(id.clone(), SOURCE, output.job.clone())
            .with_subject(id.clone())
            .with_traceparent(traceparent.map(|t| t.to_string()));
        // `queued` first: the job's `started` can follow at once, and must not come before it.
        self.publisher
            .lifecycle(
                JobQueued {
                    job_id,
                    source: output.job.source.clone(),
                    preset: output.job.preset.clone(),
                },
                traceparent,
            )
            .await
            .map_err(runtime_error)?;
        let fresh = self
            .publisher
            .publish_deduplicated(
                INFERENCE_JOBS_SUBJECT.to_owned(),
                &id,
                event.to_json().into(),
                traceparent,
            )
            .await
            .map_err(runtime_error)?;
        if !fresh {
            tracing::info!(job = %job_id, "the jobs stream already had this job");
        }
        Ok(())
    }

    /// Writes the upload's receipt (see `darkroom_shared::receipt`).
    async fn write_receipt(
        &self,
        job_id: JobId,
        source: &ObjectRef,
        decision: Decision,
    ) -> Result<(), RuntimeError> {
        let receipt = Receipt {
            job_id,
            source: source.clone(),
            decision,
            decided_at: chrono::Utc::now(),
        };
        receipt::write(&self.s3, &receipt).await
    }

    /// Moves the job's record to `status` (creating it when the event bypassed ingest, as
    /// S3 → Lambda does), never backwards: `queued` or later is not overwritten by `failed`,
    /// nor `running`/`completed` by `queued`.
    async fn mark(
        &self,
        job: &JobContext,
        status: JobStatus,
        preset: Option<&str>,
        failure: Option<FailureReason>,
    ) -> Result<(), RuntimeError> {
        let Some(source) = &job.source else {
            return Ok(());
        };
        self.jobs
            .transition(job.job_id, source, |record| {
                if !advances(record.status, status) {
                    return false;
                }
                record.status = status;
                if preset.is_some() {
                    record.preset = preset.map(str::to_owned);
                }
                record.failure = failure;
                true
            })
            .await?;
        Ok(())
    }

    /// Publishes `failed` for a record whose permanent error is not the one returned to the
    /// loop (a notification carrying several records).
    async fn report(&self, error: &HandlerError, attempt: u32) -> Result<(), HandlerError> {
        let Some(job) = &error.job else {
            tracing::warn!(reason = ?error.reason, error = %error.message, "record refused");
            return Ok(());
        };
        self.publisher
            .lifecycle(
                JobFailed {
                    job_id: job.job_id,
                    stage: Stage::Preprocess,
                    reason: error.reason,
                    message: error.message.clone(),
                    attempts: attempt,
                    source: job.source.clone(),
                },
                None,
            )
            .await
            .map_err(runtime_error)?;
        Ok(())
    }
}

/// Whether a record at `from` may move to `to`.
fn advances(from: JobStatus, to: JobStatus) -> bool {
    match to {
        JobStatus::Failed => from == JobStatus::Received,
        JobStatus::Queued => matches!(from, JobStatus::Received | JobStatus::Failed),
        _ => false,
    }
}

fn runtime_error(error: RuntimeError) -> HandlerError {
    HandlerError::transient(FailureReason::Internal, error.to_string())
}

fn job_error(error: JobError) -> HandlerError {
    HandlerError::permanent(error.reason(), error.to_string())
}

fn fetch_error(error: FetchError) -> HandlerError {
    if error.is_permanent() {
        HandlerError::permanent(error.reason(), error.to_string())
    } else {
        HandlerError::transient(error.reason(), error.to_string())
    }
}

impl Handler for PreprocessHandler {
    const STAGE: Stage = Stage::Preprocess;

    async fn handle(&self, delivery: &Delivery) -> Result<(), HandlerError> {
        let records = match parse_s3_message(&delivery.payload) {
            Ok(S3Message::Records(records)) => records,
            Ok(S3Message::TestEvent) => return Ok(()),
            Err(error) => {
                return Err(HandlerError::permanent(
                    FailureReason::InvalidEvent,
                    error.to_string(),
                ));
            }
        };
        // Every record is a job of its own: one refused upload must not stop the others. The
        // last permanent error goes back to the loop, earlier ones are reported here.
        let mut refused: Option<HandlerError> = None;
        for record in &records {
            match self.handle_record(record, delivery.traceparent).await {
                Ok(_) => {}
                Err(error) if error.is_permanent() => {
                    if let Some(earlier) = refused.replace(error) {
                        self.report(&earlier, delivery.attempt).await?;
                    }
                }
                Err(error) => return Err(error),
            }
        }
        refused.map_or(Ok(()), Err)
    }

    fn job_of(&self, delivery: &Delivery) -> Option<JobContext> {
        let Ok(S3Message::Records(records)) = parse_s3_message(&delivery.payload) else {
            return None;
        };
        records
            .iter()
            .filter(|record| record.is_object_created())
            .filter_map(|record| record.object_ref().ok())
            .find(|object| self.in_inbox(&object.key))
            .and_then(|object| {
                object.job_id().map(|job_id| JobContext {
                    job_id,
                    source: Some(object),
                })
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_only_move_forward() {
        use JobStatus::*;
        assert!(advances(Received, Queued));
        assert!(advances(Failed, Queued));
        assert!(advances(Received, Failed));
        for later in [Queued, Running, Completed] {
            assert!(!advances(later, Failed), "{later:?}");
        }
        for later in [Queued, Running, Completed] {
            assert!(!advances(later, Queued), "{later:?}");
        }
    }

    #[test]
    fn fetch_errors_keep_their_class() {
        let gone = fetch_error(FetchError::NotFound {
            object: "s3://b/k".to_owned(),
        });
        assert!(gone.is_permanent());
        assert_eq!(gone.reason, FailureReason::ObjectNotFound);
        let down = fetch_error(FetchError::Storage {
            operation: "HEAD",
            object: "s3://b/k".to_owned(),
            message: "connection refused".to_owned(),
        });
        assert!(!down.is_permanent());
    }
}
