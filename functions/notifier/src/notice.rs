//! A lifecycle event as the notifier sees it: read from its CloudEvent whatever the transport
//! (the events stream's subject, a Lambda payload or an SQS body), with the bytes kept as they
//! came, because those exact bytes are what subscribers and webhooks receive.

use bytes::Bytes;
use darkroom_events::{
    CloudEvent, EventError, JobCompleted, JobFailed, JobId, JobProgress, JobQueued, JobStarted,
    LifecycleEvent, LifecycleKind, ObjectRef,
};
use serde::Deserialize;

/// One lifecycle event.
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    /// The CloudEvent id (deterministic: the same event re-sent keeps it).
    pub id: String,
    /// Its kind.
    pub kind: LifecycleKind,
    /// The job.
    pub job: JobId,
    /// The upload, when the event carries it (`queued`, `completed`, usually `failed`).
    pub source: Option<ObjectRef>,
    /// The CloudEvent JSON, byte for byte.
    pub body: Bytes,
}

impl Notice {
    /// Reads a lifecycle CloudEvent of any of the five kinds, checking `specversion`, `type`
    /// and the payload's shape.
    ///
    /// # Errors
    /// Not JSON, not a CloudEvent 1.0, or not a lifecycle event type.
    pub fn parse(body: Bytes) -> Result<Self, EventError> {
        #[derive(Deserialize)]
        struct Head {
            #[serde(rename = "type")]
            event_type: String,
        }
        let head: Head = serde_json::from_slice(&body)?;
        match head.event_type.as_str() {
            t if t == <JobQueued as darkroom_events::EventData>::TYPE => {
                read::<JobQueued>(body, |d| Some(d.source.clone()))
            }
            t if t == <JobStarted as darkroom_events::EventData>::TYPE => {
                read::<JobStarted>(body, |_| None)
            }
            t if t == <JobProgress as darkroom_events::EventData>::TYPE => {
                read::<JobProgress>(body, |_| None)
            }
            t if t == <JobCompleted as darkroom_events::EventData>::TYPE => {
                read::<JobCompleted>(body, |d| Some(d.source.clone()))
            }
            t if t == <JobFailed as darkroom_events::EventData>::TYPE => {
                read::<JobFailed>(body, |d| d.source.clone())
            }
            other => Err(EventError::WrongType {
                expected: "studio.darkroom.job.<queued|started|progress|completed|failed>.v1",
                found: other.to_owned(),
            }),
        }
    }
}

fn read<T: LifecycleEvent>(
    body: Bytes,
    source: impl Fn(&T) -> Option<ObjectRef>,
) -> Result<Notice, EventError> {
    let event = CloudEvent::<T>::from_json(&body)?;
    Ok(Notice {
        kind: T::KIND,
        job: event.data.job_id(),
        source: source(&event.data),
        id: event.id,
        body,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use darkroom_events::{FailureReason, Stage};

    use super::*;

    fn job() -> JobId {
        JobId::for_object("photos", "inbox/a.jpg", "e")
    }

    fn object() -> ObjectRef {
        ObjectRef::new("photos", "inbox/a.jpg")
    }

    #[test]
    fn every_kind_is_read_with_its_upload_when_it_has_one() {
        let queued = CloudEvent::new(
            "q",
            "/darkroom/preprocess",
            JobQueued {
                job_id: job(),
                source: object(),
                preset: "storybook".to_owned(),
            },
        );
        let notice = Notice::parse(queued.to_json().into()).unwrap();
        assert_eq!(notice.kind, LifecycleKind::Queued);
        assert_eq!(notice.id, "q");
        assert_eq!(notice.job, job());
        assert_eq!(notice.source, Some(object()));
        assert_eq!(notice.body, Bytes::from(queued.to_json()));

        let progress = CloudEvent::new(
            "p",
            "/darkroom/inference",
            JobProgress {
                job_id: job(),
                step: 3,
                total_steps: 30,
            },
        );
        let notice = Notice::parse(progress.to_json().into()).unwrap();
        assert_eq!(notice.kind, LifecycleKind::Progress);
        assert_eq!(notice.source, None);

        let failed = CloudEvent::new(
            "f",
            "/darkroom/inference",
            JobFailed {
                job_id: job(),
                stage: Stage::Inference,
                reason: FailureReason::Timeout,
                message: "slow".to_owned(),
                attempts: 5,
                source: None,
            },
        );
        let notice = Notice::parse(failed.to_json().into()).unwrap();
        assert_eq!(notice.kind, LifecycleKind::Failed);
        assert_eq!(notice.source, None);
    }

    #[test]
    fn anything_else_is_refused() {
        for bad in [
            &b"not json"[..],
            br#"{"type": "studio.darkroom.job.inference.v1"}"#,
            br#"{"specversion": "0.3", "type": "studio.darkroom.job.queued.v1"}"#,
            br#"{"specversion": "1.0", "type": "studio.darkroom.job.completed.v1", "id": "x"}"#,
        ] {
            assert!(Notice::parse(Bytes::from_static(bad)).is_err());
        }
    }
}
