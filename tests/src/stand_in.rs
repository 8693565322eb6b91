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

/// Preprocess and the notifier (their own `serve`, as their binaries run them) and the
/// stand-in on the jobs consumer, all in this process: the whole pipeline minus rendering.
pub struct StandInPipeline {
    shutdown: tokio_util::sync::CancellationToken,
    tasks: Vec<(&'static str, tokio::task::JoinHandle<Result<(), String>>)>,
    _presets: tempfile::TempDir,
}

impl StandInPipeline {
    /// Starts the three with `runtime`'s settings (the topology must exist), preprocess with
    /// the one preset `preset_toml` named `preset`, the stand-in naming itself `worker`.
    ///
    /// # Panics
    /// When a connection or the preset folder cannot be made.
    pub async fn start(
        runtime: &darkroom_shared::RuntimeConfig,
        preset: &str,
        preset_toml: &str,
        worker: &str,
    ) -> StandInPipeline {
        Self::start_with_webhooks(runtime, preset, preset_toml, worker, None).await
    }

    /// [`Self::start`], the notifier delivering webhooks to the endpoints of
    /// `endpoints_file` (the notifier's TOML) when one is given.
    ///
    /// # Panics
    /// When a connection or the preset folder cannot be made.
    pub async fn start_with_webhooks(
        runtime: &darkroom_shared::RuntimeConfig,
        preset: &str,
        preset_toml: &str,
        worker: &str,
        endpoints_file: Option<std::path::PathBuf>,
    ) -> StandInPipeline {
        use darkroom_events::subjects::{self, consumers};
        let presets = tempfile::tempdir().unwrap_or_else(|e| panic!("preset folder: {e}"));
        std::fs::write(presets.path().join(format!("{preset}.toml")), preset_toml)
            .unwrap_or_else(|e| panic!("preset file: {e}"));
        let shutdown = tokio_util::sync::CancellationToken::new();
        let preprocess = tokio::spawn({
            let config = darkroom_preprocess::config::PreprocessConfig {
                runtime: runtime.clone(),
                preprocess_preset_dir: Some(presets.path().to_path_buf()),
                ..darkroom_preprocess::config::PreprocessConfig::default()
            };
            let shutdown = shutdown.clone();
            async move {
                darkroom_preprocess::service::serve(config, shutdown)
                    .await
                    .map_err(|e| format!("{e:#}"))
            }
        });
        let notifier = tokio::spawn({
            let config = darkroom_notifier::config::NotifierConfig {
                runtime: runtime.clone(),
                notifier_endpoints_file: endpoints_file,
                notifier_backoff_base_ms: 50,
                notifier_backoff_max_ms: 200,
                ..darkroom_notifier::config::NotifierConfig::default()
            };
            let shutdown = shutdown.clone();
            async move {
                darkroom_notifier::service::serve(config, shutdown)
                    .await
                    .map_err(|e| format!("{e:#}"))
            }
        });
        let js = async_nats::jetstream::new(
            darkroom_shared::nats::connect(runtime, worker)
                .await
                .unwrap_or_else(|e| panic!("the stand-in's connection: {e}")),
        );
        let jobs = JobStore::open(&js)
            .await
            .unwrap_or_else(|e| panic!("jobs KV: {e}"));
        let stand_in = Arc::new(InferenceStandIn::new(
            Publisher::new(js, format!("/darkroom/tests/{worker}")),
            jobs,
            worker,
        ));
        let mut settings = darkroom_shared::consumer::ConsumerSettings::new(
            &runtime.topology(),
            subjects::JOBS_STREAM,
            consumers::INFERENCE,
        );
        settings.fetch_expires = std::time::Duration::from_millis(500);
        settings.retry_backoff = vec![std::time::Duration::from_millis(300)];
        let inference = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                let publisher = stand_in.publisher().clone();
                darkroom_shared::consumer::run(stand_in, publisher, settings, shutdown)
                    .await
                    .map_err(|e| e.to_string())
            }
        });
        StandInPipeline {
            shutdown,
            tasks: vec![
                ("preprocess", preprocess),
                ("notifier", notifier),
                ("inference stand-in", inference),
            ],
            _presets: presets,
        }
    }

    /// Stops the three (each finishes the message in hand).
    ///
    /// # Panics
    /// When one of them stopped with an error.
    pub async fn stop(self) {
        self.shutdown.cancel();
        for (name, task) in self.tasks {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => panic!("{name} stopped with an error: {error}"),
                Err(error) => panic!("{name} panicked: {error}"),
            }
        }
    }
}

/// Waits until every job of `jobs` has its `completed` notification, then checks that each has
/// exactly one `completed` event and one notification, that nothing was dead-lettered and that
/// the work queue is empty.
///
/// # Panics
/// When one of those does not hold within `timeout`.
pub async fn assert_completed_exactly_once(
    js: &async_nats::jetstream::Context,
    jobs: &[JobId],
    timeout: std::time::Duration,
) {
    use darkroom_events::lifecycle::LifecycleKind;
    use darkroom_events::subjects;
    let notification = |job: &JobId| {
        format!(
            "darkroom.fanout.job.{job}.{}",
            LifecycleKind::Completed.as_str()
        )
    };
    let notify = crate::wait_for(
        timeout,
        || crate::subject_counts(js, subjects::NOTIFY_STREAM),
        |counts| {
            jobs.iter()
                .all(|job| counts.contains_key(&notification(job)))
        },
    )
    .await;
    let events = crate::subject_counts(js, subjects::EVENTS_STREAM).await;
    let wrong: Vec<String> = jobs
        .iter()
        .filter_map(|job| {
            let completed = events
                .get(&subjects::lifecycle_subject(*job, LifecycleKind::Completed))
                .copied()
                .unwrap_or(0);
            let notified = notify.get(&notification(job)).copied().unwrap_or(0);
            (completed != 1 || notified != 1)
                .then(|| format!("{job}: {completed} completed events, {notified} notifications"))
        })
        .collect();
    assert!(wrong.is_empty(), "not exactly once: {wrong:#?}");
    let dead_letters = crate::subject_counts(js, subjects::DLQ_STREAM).await;
    assert!(dead_letters.is_empty(), "dead letters: {dead_letters:?}");
    let queued = js
        .get_stream(subjects::JOBS_STREAM)
        .await
        .unwrap_or_else(|e| panic!("jobs stream: {e}"))
        .info()
        .await
        .unwrap_or_else(|e| panic!("jobs stream info: {e}"))
        .state
        .messages;
    assert_eq!(queued, 0, "jobs left in the work queue");
}
