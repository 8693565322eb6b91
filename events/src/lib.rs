//! Darkroom's event contract.
//!
//! Everything that crosses the bus is defined here and nowhere else:
//!
//! - [`s3`]: the standard S3 event notification (`Records[]`) as AWS, MinIO and RustFS send it,
//!   which is what the uploads stream carries;
//! - [`cloudevent`]: the CloudEvents 1.0 envelope (JSON, structured mode) around Darkroom's own events;
//! - [`job`]: job identity, object references and the [`job::InferenceJob`] work item;
//! - [`lifecycle`]: `queued`, `started`, `progress`, `completed` and `failed` events;
//! - [`subjects`]: NATS subjects (the notifier's fan-out included), JetStream streams, consumers,
//!   KV buckets and header names;
//! - [`schema`]: JSON Schemas of every payload, generated from these types.
//!
//! The crate depends on nothing of Darkroom's, so any client can use it. JSON Schemas for every
//! payload live in `events/schemas/` and a test keeps them equal to these types.

pub mod cloudevent;
pub mod job;
pub mod lifecycle;
pub mod s3;
pub mod schema;
pub mod subjects;

pub use cloudevent::{CloudEvent, EventData};
pub use job::{
    ControlImage, ControlNetParams, InferenceJob, JobId, LoraParams, ObjectRef, RenderParams,
    ToneParams,
};
pub use lifecycle::{
    AdapterUsed, FailureReason, JobCompleted, JobFailed, JobProgress, JobQueued, JobStarted,
    LifecycleEvent, LifecycleKind, ModelUsed, Stage, StageTimings,
};
pub use s3::{S3EventRecord, S3Message, S3Notification};

/// Why a payload is not a valid Darkroom or S3 event.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// The bytes are not JSON, or not JSON of the expected shape.
    #[error("malformed event JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// Valid JSON, but neither an S3 notification (`Records[]`) nor an S3 test event.
    #[error("not an S3 event notification: {0}")]
    NotS3Notification(String),
    /// An object key whose URL encoding does not decode to UTF-8.
    #[error("object key {key:?} is not valid URL-encoded UTF-8")]
    InvalidKeyEncoding {
        /// The key as it arrived, still encoded.
        key: String,
    },
    /// A CloudEvent whose `specversion` is not 1.0.
    #[error("unsupported CloudEvents specversion {found:?} (expected \"1.0\")")]
    SpecVersion {
        /// The version found in the envelope.
        found: String,
    },
    /// A CloudEvent of another `type` than the one expected on this subject.
    #[error("unexpected event type {found:?} (expected {expected:?})")]
    WrongType {
        /// The type the reader expects.
        expected: &'static str,
        /// The type in the envelope.
        found: String,
    },
}

/// Result alias for this crate.
pub type Result<T, E = EventError> = std::result::Result<T, E>;
