//! TEST-AND-BENCHMARK-ONLY STAND-IN for the GPU worker: it does the worker's control-plane work
//! around a render — record `running`, publish `started`, publish `completed`, record
//! `completed`; the shared loop acks — and renders nothing. Its `completed` names result and
//! metadata objects it never writes. The cluster and restart tests and the control-plane
//! benchmark run it where the real worker's rendering would only add time.

use std::sync::Arc;

use darkroom_events::{
    CloudEvent, FailureReason, InferenceJob, JobCompleted, JobId, JobStarted, ModelUsed, ObjectRef,
    Stage, StageTimings,
};
use darkroom_shared::handler::{Delivery, Handler, HandlerError};
use darkroom_shared::jobs::{JobStatus, JobStore};
use darkroom_shared::publish::Publisher;

/// Called with each job the stand-in pulls, before it does anything (a benchmark's clock).
pub type OnPulled = Arc<dyn Fn(JobId) + Send + Sync>;

/// The stand-in: a [`Handler`] for the `inference` consumer of the jobs stream.
pub struct InferenceStandIn {
    publisher: Publisher,
    jobs: JobStore,
    worker: String,
    on_pulled: Option<OnPulled>,
}

fn transient(error: impl std::fmt::Display) -> HandlerError {
    HandlerError::transient(FailureReason::Internal, error.to_string())
}

impl InferenceStandIn {
    /// A stand-in publishing through `publisher`, recording in `jobs`, naming itself `worker`
    /// in its events.
    pub fn new(publisher: Publisher, jobs: JobStore, worker: &str) -> InferenceStandIn {
        InferenceStandIn {
            publisher,
            jobs,
            worker: worker.to_owned(),
            on_pulled: None,
        }
    }

    /// Calls `on_pulled` with every job pulled (redeliveries included).
    pub fn on_pulled(mut self, on_pulled: OnPulled) -> InferenceStandIn {
        self.on_pulled = Some(on_pulled);
        self
    }

    /// The publisher (what the shared loop dead-letters and reports failures through).
    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    /// Moves the job's record to `status`; returns when the record was created.
    async fn mark(
        &self,
        job: &InferenceJob,
        status: JobStatus,
    ) -> Result<chrono::DateTime<chrono::Utc>, HandlerError> {
        let record = self
            .jobs
            .transition(job.job_id, &job.source, |record| {
                record.status = status;
                true
            })
            .await
            .map_err(transient)?;
        Ok(record.created_at)
    }
}

impl Handler for InferenceStandIn {
    const STAGE: Stage = Stage::Inference;

    async fn handle(&self, delivery: &Delivery) -> Result<(), HandlerError> {
        let job = CloudEvent::<InferenceJob>::from_json(&delivery.payload)
            .map_err(|e| {
                HandlerError::permanent(FailureReason::InvalidEvent, format!("inference job: {e}"))
            })?
            .data;
        if let Some(on_pulled) = &self.on_pulled {
            on_pulled(job.job_id);
        }
        let started_at = chrono::Utc::now();
        let created_at = self.mark(&job, JobStatus::Running).await?;
        self.publisher
            .lifecycle(
                JobStarted {
                    job_id: job.job_id,
                    worker: self.worker.clone(),
                    attempt: delivery.attempt,
                },
                delivery.traceparent,
            )
            .await
            .map_err(transient)?;
        let millis_since = |from: chrono::DateTime<chrono::Utc>| {
            u64::try_from((chrono::Utc::now() - from).num_milliseconds()).unwrap_or(0)
        };
        let completed = JobCompleted {
            job_id: job.job_id,
            source: job.source.clone(),
            preset: job.preset.clone(),
            result: ObjectRef::new(
                &job.source.bucket,
                format!("{}result.png", job.output_prefix),
            ),
            metadata: ObjectRef::new(&job.source.bucket, format!("{}job.json", job.output_prefix)),
            seed: job.seed,
            model: ModelUsed {
                name: format!("stand-in ({}: no model)", self.worker),
                sha256: String::new(),
            },
            loras: Vec::new(),
            controlnets: Vec::new(),
            worker: self.worker.clone(),
            attempt: delivery.attempt,
            total_ms: millis_since(created_at),
            inference_ms: millis_since(started_at),
            timings: StageTimings::default(),
        };
        self.publisher
            .lifecycle(completed, delivery.traceparent)
            .await
            .map_err(transient)?;
        self.mark(&job, JobStatus::Completed).await.map(|_| ())
    }
}
