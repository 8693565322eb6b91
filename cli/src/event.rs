//! Lifecycle CloudEvents of any kind, read from the bytes a stream or subject delivered.

use darkroom_events::{
    CloudEvent, EventData, FailureReason, JobCompleted, JobFailed, JobId, JobProgress, JobQueued,
    JobStarted, LifecycleKind,
};
use serde::Deserialize;

/// One lifecycle event, typed.
#[derive(Debug, Clone, PartialEq)]
pub enum Lifecycle {
    /// `queued`.
    Queued(CloudEvent<JobQueued>),
    /// `started`.
    Started(CloudEvent<JobStarted>),
    /// `progress`.
    Progress(CloudEvent<JobProgress>),
    /// `completed`.
    Completed(Box<CloudEvent<JobCompleted>>),
    /// `failed`.
    Failed(CloudEvent<JobFailed>),
}

impl Lifecycle {
    /// Reads a lifecycle CloudEvent, checking `specversion` and `type`.
    ///
    /// # Errors
    /// Not JSON, not CloudEvents 1.0, or not one of the five lifecycle types.
    pub fn parse(bytes: &[u8]) -> Result<Self, darkroom_events::EventError> {
        #[derive(Deserialize)]
        struct Head {
            #[serde(rename = "type")]
            event_type: String,
        }
        let head: Head = serde_json::from_slice(bytes)?;
        Ok(match head.event_type.as_str() {
            JobQueued::TYPE => Lifecycle::Queued(CloudEvent::from_json(bytes)?),
            JobStarted::TYPE => Lifecycle::Started(CloudEvent::from_json(bytes)?),
            JobProgress::TYPE => Lifecycle::Progress(CloudEvent::from_json(bytes)?),
            JobCompleted::TYPE => Lifecycle::Completed(Box::new(CloudEvent::from_json(bytes)?)),
            JobFailed::TYPE => Lifecycle::Failed(CloudEvent::from_json(bytes)?),
            other => {
                return Err(darkroom_events::EventError::WrongType {
                    expected: "studio.darkroom.job.<queued|started|progress|completed|failed>.v1",
                    found: other.to_owned(),
                });
            }
        })
    }

    /// Its kind.
    pub fn kind(&self) -> LifecycleKind {
        match self {
            Lifecycle::Queued(_) => LifecycleKind::Queued,
            Lifecycle::Started(_) => LifecycleKind::Started,
            Lifecycle::Progress(_) => LifecycleKind::Progress,
            Lifecycle::Completed(_) => LifecycleKind::Completed,
            Lifecycle::Failed(_) => LifecycleKind::Failed,
        }
    }

    /// The job it is about.
    pub fn job(&self) -> JobId {
        match self {
            Lifecycle::Queued(e) => e.data.job_id,
            Lifecycle::Started(e) => e.data.job_id,
            Lifecycle::Progress(e) => e.data.job_id,
            Lifecycle::Completed(e) => e.data.job_id,
            Lifecycle::Failed(e) => e.data.job_id,
        }
    }

    /// When it was produced.
    pub fn time(&self) -> chrono::DateTime<chrono::Utc> {
        match self {
            Lifecycle::Queued(e) => e.time,
            Lifecycle::Started(e) => e.time,
            Lifecycle::Progress(e) => e.time,
            Lifecycle::Completed(e) => e.time,
            Lifecycle::Failed(e) => e.time,
        }
    }

    /// What it says, in a few words (`preset profile-warm`, `step 7/30`, …), without the kind.
    pub fn summary(&self) -> String {
        match self {
            Lifecycle::Queued(e) => format!("preset {}, {}", e.data.preset, e.data.source),
            Lifecycle::Started(e) => {
                format!("worker {}, attempt {}", e.data.worker, e.data.attempt)
            }
            Lifecycle::Progress(e) => format!("step {}/{}", e.data.step, e.data.total_steps),
            Lifecycle::Completed(e) => format!(
                "{} → {} (preset {}, seed {}, worker {}, {:.1} s)",
                e.data.source,
                e.data.result,
                e.data.preset,
                e.data.seed,
                e.data.worker,
                e.data.total_ms as f64 / 1000.0
            ),
            Lifecycle::Failed(e) => {
                let source = e
                    .data
                    .source
                    .as_ref()
                    .map(|s| format!("{s} "))
                    .unwrap_or_default();
                format!(
                    "{source}at {}: {}: {}",
                    e.data.stage,
                    reason_code(e.data.reason),
                    e.data.message
                )
            }
        }
    }
}

/// The snake-case code of a failure reason (`no_face_found`), as in events and headers.
pub fn reason_code(reason: FailureReason) -> String {
    serde_json::to_value(reason)
        .ok()
        .and_then(|value| value.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{reason:?}"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use darkroom_events::{ObjectRef, Stage};

    #[test]
    fn reads_each_kind_and_refuses_others() {
        let job = JobId::for_object("photos", "inbox/a/x.jpg", "e");
        let failed = CloudEvent::new(
            "id",
            "/darkroom/preprocess",
            JobFailed {
                job_id: job,
                stage: Stage::Preprocess,
                reason: FailureReason::NoFaceFound,
                message: "no face".into(),
                attempts: 1,
                source: Some(ObjectRef::new("photos", "inbox/a/x.jpg")),
            },
        );
        let parsed = Lifecycle::parse(&failed.to_json()).unwrap();
        assert_eq!(parsed.kind(), LifecycleKind::Failed);
        assert_eq!(parsed.job(), job);
        assert_eq!(
            parsed.summary(),
            "s3://photos/inbox/a/x.jpg at preprocess: no_face_found: no face"
        );
        let progress = CloudEvent::new(
            "id",
            "/darkroom/inference",
            JobProgress {
                job_id: job,
                step: 7,
                total_steps: 30,
            },
        );
        let parsed = Lifecycle::parse(&progress.to_json()).unwrap();
        assert_eq!(parsed.summary(), "step 7/30");
        let mut wrong = serde_json::to_value(&progress).unwrap();
        wrong["type"] = "studio.darkroom.job.inference.v1".into();
        assert!(Lifecycle::parse(wrong.to_string().as_bytes()).is_err());
        assert!(Lifecycle::parse(b"not json").is_err());
    }
}
