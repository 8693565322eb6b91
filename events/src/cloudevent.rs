//! The CloudEvents 1.0 envelope, JSON structured mode.
//!
//! Spec: <https://github.com/cloudevents/spec/blob/v1.0.2/cloudevents/spec.md> and the JSON format
//! <https://github.com/cloudevents/spec/blob/v1.0.2/cloudevents/formats/json-format.md>.
//! `traceparent` is the distributed-tracing extension attribute (W3C Trace Context).

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{EventError, Result};

/// The only CloudEvents version Darkroom reads and writes.
pub const SPEC_VERSION: &str = "1.0";

/// A payload that travels inside a [`CloudEvent`].
pub trait EventData: Serialize + DeserializeOwned + JsonSchema {
    /// The CloudEvents `type`, reverse-DNS and versioned (`studio.darkroom.job.completed.v1`).
    const TYPE: &'static str;
    /// File stem of the payload's JSON Schema in `events/schemas/`.
    const SCHEMA_NAME: &'static str;
}

/// A CloudEvent carrying `T`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CloudEvent<T> {
    /// Always `1.0`.
    pub specversion: String,
    /// Unique per `source`; deterministic in Darkroom, so a re-sent event keeps its id.
    pub id: String,
    /// The producing function, as a URI reference (`/darkroom/inference`).
    pub source: String,
    /// The event type, see [`EventData::TYPE`].
    #[serde(rename = "type")]
    pub event_type: String,
    /// The job id the event is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// When the event was produced.
    pub time: DateTime<Utc>,
    /// Always `application/json`.
    pub datacontenttype: String,
    /// W3C `traceparent` of the job's trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The payload.
    pub data: T,
}

impl<T: EventData> CloudEvent<T> {
    /// Wraps `data`, stamped now.
    pub fn new(id: impl Into<String>, source: impl Into<String>, data: T) -> Self {
        CloudEvent {
            specversion: SPEC_VERSION.to_owned(),
            id: id.into(),
            source: source.into(),
            event_type: T::TYPE.to_owned(),
            subject: None,
            time: Utc::now(),
            datacontenttype: "application/json".to_owned(),
            traceparent: None,
            data,
        }
    }

    /// Sets the `subject` attribute.
    pub fn with_subject(mut self, subject: impl Into<String>) -> Self {
        self.subject = Some(subject.into());
        self
    }

    /// Sets the `traceparent` extension attribute.
    pub fn with_traceparent(mut self, traceparent: Option<String>) -> Self {
        self.traceparent = traceparent;
        self
    }

    /// The JSON bytes that go on the wire.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("plain structs with string keys always serialise")
    }

    /// Reads an event of type `T`, checking `specversion` and `type`.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        #[derive(Deserialize)]
        struct Head {
            specversion: String,
            #[serde(rename = "type")]
            event_type: String,
        }
        let head: Head = serde_json::from_slice(bytes)?;
        if head.specversion != SPEC_VERSION {
            return Err(EventError::SpecVersion {
                found: head.specversion,
            });
        }
        if head.event_type != T::TYPE {
            return Err(EventError::WrongType {
                expected: T::TYPE,
                found: head.event_type,
            });
        }
        Ok(serde_json::from_slice(bytes)?)
    }
}
