//! NATS subjects, JetStream streams and consumers, the jobs KV bucket and header names.
//!
//! The table in `events/README.md` documents the same names for clients in other languages.

use crate::job::JobId;
use crate::lifecycle::{LifecycleKind, Stage};

/// Stream of S3 event notifications (limits retention).
pub const UPLOADS_STREAM: &str = "DARKROOM_UPLOADS";
/// Subjects of [`UPLOADS_STREAM`].
pub const UPLOADS_SUBJECTS: &str = "darkroom.uploads.>";

/// Subject S3 notifications for `bucket` are published on.
///
/// Bucket names may contain dots, which NATS reads as token separators; they become `_`, a
/// character bucket names cannot contain, so the mapping stays one-to-one.
pub fn uploads_subject(bucket: &str) -> String {
    format!("darkroom.uploads.{}", bucket.replace('.', "_"))
}

/// Work-queue stream of inference jobs.
pub const JOBS_STREAM: &str = "DARKROOM_JOBS";
/// Subjects of [`JOBS_STREAM`].
pub const JOBS_SUBJECTS: &str = "darkroom.jobs.>";
/// Subject of [`crate::InferenceJob`]s.
pub const INFERENCE_JOBS_SUBJECT: &str = "darkroom.jobs.inference";

/// Stream of lifecycle events (limits retention, kept for days).
pub const EVENTS_STREAM: &str = "DARKROOM_EVENTS";
/// Subjects of [`EVENTS_STREAM`].
pub const EVENTS_SUBJECTS: &str = "darkroom.events.>";

/// Subject of a job's lifecycle event: `darkroom.events.<job>.<kind>`.
pub fn lifecycle_subject(job: JobId, kind: LifecycleKind) -> String {
    format!("darkroom.events.{job}.{}", kind.as_str())
}

/// Wildcard for every event of one job: `darkroom.events.<job>.*`.
pub fn job_events_filter(job: JobId) -> String {
    format!("darkroom.events.{job}.*")
}

/// Stream of dead letters: messages that failed for good, with the reason in headers.
pub const DLQ_STREAM: &str = "DARKROOM_DLQ";
/// Subjects of [`DLQ_STREAM`].
pub const DLQ_SUBJECTS: &str = "darkroom.dlq.>";

/// Dead-letter subject of a stage: `darkroom.dlq.<stage>`.
pub fn dlq_subject(stage: Stage) -> String {
    format!("darkroom.dlq.{}", stage.as_str())
}

/// Core-NATS subject that asks workers to cancel a job: `darkroom.control.cancel.<job>`.
pub fn cancel_subject(job: JobId) -> String {
    format!("darkroom.control.cancel.{job}")
}

/// KV bucket of job records, keyed by job id.
pub const JOBS_KV: &str = "darkroom_jobs";

/// Durable consumer names.
pub mod consumers {
    /// Preprocess, on the uploads stream.
    pub const PREPROCESS: &str = "preprocess";
    /// Inference, on the jobs stream.
    pub const INFERENCE: &str = "inference";
    /// Notifier, on the events stream.
    pub const NOTIFIER: &str = "notifier";
}

/// Header names Darkroom sets on NATS messages.
pub mod headers {
    /// JetStream de-duplication id.
    pub const MSG_ID: &str = "Nats-Msg-Id";
    /// W3C trace context.
    pub const TRACEPARENT: &str = "traceparent";
    /// Dead letters: subject the message was first published on.
    pub const DLQ_ORIGINAL_SUBJECT: &str = "Darkroom-Original-Subject";
    /// Dead letters: stream the message came from.
    pub const DLQ_ORIGINAL_STREAM: &str = "Darkroom-Original-Stream";
    /// Dead letters: its sequence in that stream.
    pub const DLQ_ORIGINAL_SEQUENCE: &str = "Darkroom-Original-Sequence";
    /// Dead letters: machine-readable reason ([`crate::FailureReason`] in snake case).
    pub const DLQ_REASON: &str = "Darkroom-Failure-Reason";
    /// Dead letters: the error message.
    pub const DLQ_MESSAGE: &str = "Darkroom-Failure-Message";
    /// Dead letters: deliveries made.
    pub const DLQ_DELIVERIES: &str = "Darkroom-Deliveries";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dotted_bucket_names_stay_one_token() {
        assert_eq!(uploads_subject("my.photos"), "darkroom.uploads.my_photos");
        assert_eq!(uploads_subject("photos"), "darkroom.uploads.photos");
    }

    #[test]
    fn lifecycle_subjects_match_the_filter() {
        let job = JobId::for_object("b", "k", "e");
        let subject = lifecycle_subject(job, LifecycleKind::Completed);
        assert_eq!(subject, format!("darkroom.events.{job}.completed"));
        assert!(subject.starts_with(job_events_filter(job).trim_end_matches('*')));
    }
}
