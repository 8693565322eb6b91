//! Publishing on JetStream: lifecycle events and dead letters, each acknowledged by the server
//! and de-duplicated by a deterministic `Nats-Msg-Id`.

use async_nats::HeaderMap;
use async_nats::jetstream;
use bytes::Bytes;
use darkroom_events::subjects::{self, headers};
use darkroom_events::{CloudEvent, FailureReason, LifecycleEvent, Stage};

use crate::telemetry::TraceParent;
use crate::{Result, RuntimeError};

/// Publishes on JetStream as one function (`source`, e.g. `/darkroom/preprocess`).
#[derive(Debug, Clone)]
pub struct Publisher {
    js: jetstream::Context,
    source: String,
}

/// A message that failed for good, with where it came from.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Stage that gave up on it.
    pub stage: Stage,
    /// Subject it was published on.
    pub subject: String,
    /// Stream it came from, if any.
    pub stream: Option<String>,
    /// Its sequence in that stream.
    pub sequence: Option<u64>,
    /// Deliveries made.
    pub deliveries: u32,
    /// Why it failed, machine-readable.
    pub reason: FailureReason,
    /// Why it failed, for people.
    pub message: String,
    /// The original payload, untouched.
    pub payload: Bytes,
}

impl Publisher {
    /// A publisher for the function named by `source`.
    pub fn new(js: jetstream::Context, source: impl Into<String>) -> Self {
        Publisher {
            js,
            source: source.into(),
        }
    }

    /// The JetStream context.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// Publishes `payload` on `subject` with `Nats-Msg-Id: msg_id`, waiting for the stream's ack.
    /// Returns `false` when the stream had already seen that id (a duplicate).
    pub async fn publish_deduplicated(
        &self,
        subject: String,
        msg_id: &str,
        payload: Bytes,
        traceparent: Option<TraceParent>,
    ) -> Result<bool> {
        let mut header_map = HeaderMap::new();
        header_map.insert(headers::MSG_ID, msg_id);
        if let Some(trace) = traceparent {
            header_map.insert(headers::TRACEPARENT, trace.to_string().as_str());
        }
        self.publish_with_headers(subject, header_map, payload)
            .await
    }

    /// Publishes a job's lifecycle event on `darkroom.events.<job>.<kind>`.
    ///
    /// The CloudEvent id and `Nats-Msg-Id` derive from the job and the event's label, so the same
    /// event published twice (a redelivered job) is dropped by the stream the second time.
    pub async fn lifecycle<T: LifecycleEvent>(
        &self,
        data: T,
        traceparent: Option<TraceParent>,
    ) -> Result<bool> {
        let job = data.job_id();
        let id = job.derived_id(&data.dedup_label()).to_string();
        let subject = subjects::lifecycle_subject(job, T::KIND);
        let event = CloudEvent::new(id.clone(), self.source.clone(), data)
            .with_subject(job.to_string())
            .with_traceparent(traceparent.map(|t| t.to_string()));
        self.publish_deduplicated(subject, &id, event.to_json().into(), traceparent)
            .await
    }

    /// Publishes a dead letter on `darkroom.dlq.<stage>`, the original payload as body and the
    /// reason in headers.
    pub async fn dead_letter(&self, letter: &DeadLetter) -> Result<bool> {
        let reason = serde_json::to_value(letter.reason)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let msg_id = match (&letter.stream, letter.sequence) {
            (Some(stream), Some(seq)) => format!("dlq.{stream}.{seq}"),
            _ => format!("dlq.{}", uuid::Uuid::new_v4()),
        };
        let mut header_map = HeaderMap::new();
        header_map.insert(headers::MSG_ID, msg_id.as_str());
        header_map.insert(headers::DLQ_ORIGINAL_SUBJECT, letter.subject.as_str());
        if let Some(stream) = &letter.stream {
            header_map.insert(headers::DLQ_ORIGINAL_STREAM, stream.as_str());
        }
        if let Some(seq) = letter.sequence {
            header_map.insert(headers::DLQ_ORIGINAL_SEQUENCE, seq.to_string().as_str());
        }
        header_map.insert(headers::DLQ_REASON, reason.as_str());
        // Header values are single-line.
        let message: String = letter
            .message
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(1024)
            .collect();
        header_map.insert(headers::DLQ_MESSAGE, message.as_str());
        header_map.insert(
            headers::DLQ_DELIVERIES,
            letter.deliveries.to_string().as_str(),
        );
        metrics::counter!(crate::telemetry::metric::DEAD_LETTERS, "stage" => letter.stage.as_str(), "reason" => reason.clone())
            .increment(1);
        self.publish_with_headers(
            subjects::dlq_subject(letter.stage),
            header_map,
            letter.payload.clone(),
        )
        .await
    }

    async fn publish_with_headers(
        &self,
        subject: String,
        header_map: HeaderMap,
        payload: Bytes,
    ) -> Result<bool> {
        let ack = self
            .js
            .publish_with_headers(subject.clone(), header_map, payload)
            .await
            .map_err(|e| RuntimeError::jetstream(format!("publish to {subject}"), e))?
            .await
            .map_err(|e| RuntimeError::jetstream(format!("ack of publish to {subject}"), e))?;
        Ok(!ack.duplicate)
    }
}
