//! What a function implements: a handler over one delivered message, and errors that say
//! whether retrying could help.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use darkroom_events::{FailureReason, JobId, ObjectRef, Stage};

use crate::telemetry::TraceParent;

/// One message, however it arrived (JetStream or Lambda).
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Subject it was published on (for Lambda, the event source, e.g. `aws:s3`).
    pub subject: String,
    /// The payload bytes, untrusted.
    pub payload: Bytes,
    /// Delivery attempt, from 1.
    pub attempt: u32,
    /// Attempts allowed before the message is dead-lettered (0 when the transport does not say).
    pub max_attempts: u32,
    /// Trace context of the producer, when it sent one.
    pub traceparent: Option<TraceParent>,
}

impl Delivery {
    /// Whether a transient failure now is the last one allowed.
    pub fn is_last_attempt(&self) -> bool {
        self.max_attempts > 0 && self.attempt >= self.max_attempts
    }
}

/// The job a message belongs to, so a failure can be reported on the job's subjects.
#[derive(Debug, Clone, PartialEq)]
pub struct JobContext {
    /// The job.
    pub job_id: JobId,
    /// Its upload, when known.
    pub source: Option<ObjectRef>,
}

/// Whether an error can go away by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Retrying cannot help (bad input, unknown preset): terminate, dead-letter, report.
    Permanent,
    /// Retrying may help (a server down, a timeout): redeliver after a delay.
    Transient {
        /// Delay the handler asks for; the loop uses its backoff when `None`.
        retry_after: Option<Duration>,
    },
}

/// A handler's failure: its class, a machine-readable reason, a message, and the job if known.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{reason:?}: {message}")]
pub struct HandlerError {
    /// Retry or not.
    pub class: ErrorClass,
    /// The reason code reported in `failed` events and dead letters.
    pub reason: FailureReason,
    /// For people.
    pub message: String,
    /// The job, when the message could be tied to one.
    pub job: Option<JobContext>,
}

impl HandlerError {
    /// An error retrying cannot fix.
    pub fn permanent(reason: FailureReason, message: impl Into<String>) -> Self {
        HandlerError {
            class: ErrorClass::Permanent,
            reason,
            message: message.into(),
            job: None,
        }
    }

    /// An error that may go away; reported as `reason` if it never does.
    pub fn transient(reason: FailureReason, message: impl Into<String>) -> Self {
        HandlerError {
            class: ErrorClass::Transient { retry_after: None },
            reason,
            message: message.into(),
            job: None,
        }
    }

    /// Ties the error to a job.
    pub fn with_job(mut self, job: JobContext) -> Self {
        self.job = Some(job);
        self
    }

    /// Whether retrying could help.
    pub fn is_permanent(&self) -> bool {
        self.class == ErrorClass::Permanent
    }
}

/// A function's message handler, driven by the JetStream loop or the Lambda adapter alike.
///
/// Handlers must be idempotent: every message may arrive more than once.
pub trait Handler: Send + Sync + 'static {
    /// The stage, for dead-letter subjects, `failed` events and metrics.
    const STAGE: Stage;

    /// Handles one message. Never panics on bad input: returns a [`HandlerError`].
    fn handle(&self, delivery: &Delivery) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// The job a raw message belongs to, if it can tell without handling it; used to report a
    /// message that ran out of deliveries without returning (a crashing worker, say).
    fn job_of(&self, delivery: &Delivery) -> Option<JobContext> {
        let _ = delivery;
        None
    }

    /// Called after the loop dead-letters a message that was never settled (its handler
    /// crashed or hung on every attempt) and published its `failed` event: a handler that
    /// keeps job records marks the job failed here, so no record stays `running` for good.
    fn abandoned(
        &self,
        delivery: &Delivery,
        error: &HandlerError,
    ) -> impl Future<Output = ()> + Send {
        let _ = (delivery, error);
        async {}
    }

    /// Why this handler has stopped making progress, once it has (the inference worker's
    /// watchdog); `None` while it is healthy. The JetStream loop then stops renewing the
    /// message in hand, hands it back for another consumer and stops pulling.
    fn stalled(&self) -> Option<String> {
        None
    }
}
