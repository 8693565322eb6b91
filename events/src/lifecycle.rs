//! Job lifecycle events: what subscribers hear about a job.
//!
//! Each is published as a [`CloudEvent`](crate::CloudEvent) on
//! `darkroom.events.<job>.<kind>` (see [`crate::subjects::lifecycle_subject`]), with a
//! deterministic id so a redelivered job never yields a second, different `completed`.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::cloudevent::EventData;
use crate::job::{JobId, ObjectRef};

/// The stage of the pipeline an event or failure comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// S3 event adapter and reconciler.
    Ingest,
    /// Fetch, validate, frame, resize, control maps.
    Preprocess,
    /// GPU rendering.
    Inference,
    /// Fan-out to subjects and webhooks.
    Notifier,
}

impl Stage {
    /// The stage's name as used in subjects and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Ingest => "ingest",
            Stage::Preprocess => "preprocess",
            Stage::Inference => "inference",
            Stage::Notifier => "notifier",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Machine-readable reason of a failure; clients switch on it, people read `message`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FailureReason {
    /// The message was not a valid event (bad JSON, wrong shape, wrong type).
    InvalidEvent,
    /// The uploaded object no longer exists.
    ObjectNotFound,
    /// The upload is not an image format Darkroom accepts (sniffed, not by extension).
    UnsupportedFormat,
    /// The image or file exceeds a size or pixel limit.
    LimitExceeded,
    /// The image could not be decoded.
    DecodeFailed,
    /// The preset named by the upload does not exist.
    UnknownPreset,
    /// The preset needs a face and none was found.
    NoFaceFound,
    /// The preset needs exactly one face and several were found.
    MultipleFaces,
    /// A model file is missing or invalid.
    ModelError,
    /// A stage ran past its deadline.
    Timeout,
    /// Transient errors persisted through every allowed delivery.
    MaxDeliveriesExceeded,
    /// The job was cancelled.
    Cancelled,
    /// A webhook endpoint's address is refused by the notifier's network policy (a scheme other
    /// than http(s), or an address in a blocked range such as loopback or the metadata service).
    TargetRefused,
    /// A bug or an unexpected condition; the message says more.
    Internal,
}

impl FailureReason {
    /// Whether the upload itself is the cause (its bytes, its size, its object or its event):
    /// the same upload fails the same way however often it is tried again.
    pub fn lies_in_the_upload(self) -> bool {
        matches!(
            self,
            FailureReason::InvalidEvent
                | FailureReason::ObjectNotFound
                | FailureReason::UnsupportedFormat
                | FailureReason::LimitExceeded
                | FailureReason::DecodeFailed
                | FailureReason::NoFaceFound
                | FailureReason::MultipleFaces
        )
    }
}

/// Lifecycle event kinds, the last token of their subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LifecycleKind {
    /// Accepted and waiting for a GPU.
    Queued,
    /// A GPU worker picked it up.
    Started,
    /// A denoising step finished.
    Progress,
    /// The result is stored.
    Completed,
    /// The job failed for good.
    Failed,
}

impl LifecycleKind {
    /// The subject token.
    pub fn as_str(self) -> &'static str {
        match self {
            LifecycleKind::Queued => "queued",
            LifecycleKind::Started => "started",
            LifecycleKind::Progress => "progress",
            LifecycleKind::Completed => "completed",
            LifecycleKind::Failed => "failed",
        }
    }
}

/// A lifecycle event payload.
pub trait LifecycleEvent: EventData {
    /// Which kind it is.
    const KIND: LifecycleKind;

    /// The job it is about.
    fn job_id(&self) -> JobId;

    /// Label that makes the event's deterministic id unique within its job.
    fn dedup_label(&self) -> String {
        Self::KIND.as_str().to_owned()
    }
}

/// The job was accepted and is waiting for a GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct JobQueued {
    /// The job.
    pub job_id: JobId,
    /// The upload.
    pub source: ObjectRef,
    /// The preset it will be rendered with.
    pub preset: String,
}

/// A GPU worker started the job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct JobStarted {
    /// The job.
    pub job_id: JobId,
    /// Name of the worker.
    pub worker: String,
    /// Delivery attempt, from 1.
    pub attempt: u32,
}

/// Rendering progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct JobProgress {
    /// The job.
    pub job_id: JobId,
    /// Steps done.
    pub step: u32,
    /// Steps in all.
    pub total_steps: u32,
}

/// The result is stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct JobCompleted {
    /// The job.
    pub job_id: JobId,
    /// The upload.
    pub source: ObjectRef,
    /// The preset used.
    pub preset: String,
    /// The result image (`outputs/<job>/result.png`).
    pub result: ObjectRef,
    /// The render's record (`outputs/<job>/job.json`): the job, these fields and the
    /// resolved render parameters.
    pub metadata: ObjectRef,
    /// Seed of the initial noise; the same seed, model and parameters give the same picture.
    pub seed: u64,
    /// The base model.
    pub model: ModelUsed,
    /// LoRAs fused for the render, in order (empty when none).
    #[serde(default)]
    pub loras: Vec<AdapterUsed>,
    /// ControlNets that steered it (empty when none).
    #[serde(default)]
    pub controlnets: Vec<AdapterUsed>,
    /// The worker that rendered it.
    pub worker: String,
    /// Delivery attempt that completed it, from 1.
    pub attempt: u32,
    /// Time from the upload's event to completion, in milliseconds.
    pub total_ms: u64,
    /// Time the worker spent on the job, in milliseconds: from picking it up to storing the
    /// result (about the sum of `timings`).
    pub inference_ms: u64,
    /// Where the worker's time went.
    pub timings: StageTimings,
}

/// The base model a job was rendered with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ModelUsed {
    /// The model's name: its folder or file name.
    pub name: String,
    /// SHA-256 (lower-case hex) of the weights: of the file for a single-file checkpoint; for a
    /// diffusers folder, of the lines `<sha256>  <relative path>\n` of every weights file read,
    /// sorted by path (what `sha256sum` prints, sorted).
    pub sha256: String,
}

/// A LoRA or ControlNet used in a render.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AdapterUsed {
    /// The name the job gave (a LoRA file name, a ControlNet folder name).
    pub name: String,
    /// SHA-256 (lower-case hex) of its weights file.
    pub sha256: String,
    /// Its scale (LoRA weight or ControlNet conditioning scale).
    pub weight: f64,
}

/// Milliseconds per stage of the worker's part of a job.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct StageTimings {
    /// Fetching the prepared input and control images.
    pub fetch_ms: u64,
    /// Switching LoRAs and loading ControlNets not yet cached.
    pub adapters_ms: u64,
    /// Encoding the prompt.
    pub text_ms: u64,
    /// VAE encode, noising and control images.
    pub prepare_ms: u64,
    /// The denoising loop.
    pub denoise_ms: u64,
    /// VAE decode.
    pub decode_ms: u64,
    /// Tone grading and PNG encoding.
    pub finish_ms: u64,
    /// Storing the result and its record.
    pub store_ms: u64,
}

impl StageTimings {
    /// The sum of the stages.
    pub fn total_ms(&self) -> u64 {
        self.fetch_ms
            + self.adapters_ms
            + self.text_ms
            + self.prepare_ms
            + self.denoise_ms
            + self.decode_ms
            + self.finish_ms
            + self.store_ms
    }
}

/// The job failed for good; it will not be retried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct JobFailed {
    /// The job.
    pub job_id: JobId,
    /// Where it failed.
    pub stage: Stage,
    /// Why, machine-readable.
    pub reason: FailureReason,
    /// Why, for people.
    pub message: String,
    /// Deliveries made before giving up.
    pub attempts: u32,
    /// The upload, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<ObjectRef>,
}

macro_rules! lifecycle_event {
    ($ty:ty, $type_name:literal, $schema:literal) => {
        impl EventData for $ty {
            const TYPE: &'static str = $type_name;
            const SCHEMA_NAME: &'static str = $schema;
        }
    };
}

lifecycle_event!(JobQueued, "studio.darkroom.job.queued.v1", "job-queued");
lifecycle_event!(JobStarted, "studio.darkroom.job.started.v1", "job-started");
lifecycle_event!(
    JobProgress,
    "studio.darkroom.job.progress.v1",
    "job-progress"
);
lifecycle_event!(
    JobCompleted,
    "studio.darkroom.job.completed.v1",
    "job-completed"
);
lifecycle_event!(JobFailed, "studio.darkroom.job.failed.v1", "job-failed");

impl LifecycleEvent for JobQueued {
    const KIND: LifecycleKind = LifecycleKind::Queued;
    fn job_id(&self) -> JobId {
        self.job_id
    }
}

impl LifecycleEvent for JobStarted {
    const KIND: LifecycleKind = LifecycleKind::Started;
    fn job_id(&self) -> JobId {
        self.job_id
    }
    fn dedup_label(&self) -> String {
        format!("started.{}", self.attempt)
    }
}

impl LifecycleEvent for JobProgress {
    const KIND: LifecycleKind = LifecycleKind::Progress;
    fn job_id(&self) -> JobId {
        self.job_id
    }
    fn dedup_label(&self) -> String {
        format!("progress.{}", self.step)
    }
}

impl LifecycleEvent for JobCompleted {
    const KIND: LifecycleKind = LifecycleKind::Completed;
    fn job_id(&self) -> JobId {
        self.job_id
    }
}

impl LifecycleEvent for JobFailed {
    const KIND: LifecycleKind = LifecycleKind::Failed;
    fn job_id(&self) -> JobId {
        self.job_id
    }
}
