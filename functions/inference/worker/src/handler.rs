//! The inference function's handler: one [`InferenceJob`] from the jobs work queue in, one
//! stored picture and one `completed` event out.
//!
//! For each delivery, top to bottom:
//!
//! 1. **parse and check** the job (sizes, steps, keys): anything wrong is permanent;
//! 2. **done already?** A job whose record says `completed` is acknowledged and nothing is
//!    redone. A job whose `outputs/<job>/job.json` exists was stored by an earlier delivery
//!    that died before announcing it: its `completed` event is published again from that file
//!    (JetStream and the notifier drop the copy if the first one got out);
//! 3. **start**: `started` (one per attempt), the record moves to `running`, and the worker
//!    listens on `darkroom.control.cancel.<job>`;
//! 4. **fetch** `work/<job>/input.png` and the control maps the job's ControlNets read;
//! 5. **render** on the engine thread, publishing `progress` at most every
//!    `progress_interval_ms`; a cancel message stops it between steps (`failed`, reason
//!    `cancelled`);
//! 6. **store** `outputs/<job>/result.png` (no metadata) and `outputs/<job>/job.json`;
//! 7. **announce** `completed` (its id derived from the job, so a second copy is recognisably
//!    the same event) and record the job `completed`.
//!
//! While this runs, the shared consumer loop sends in-progress acks every third of AckWait: a
//! job longer than AckWait is never redelivered while its worker lives, and the job of a
//! worker that died is redelivered once AckWait passes.

use std::collections::HashMap;
use std::io::Cursor;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use darkroom_events::subjects::cancel_subject;
use darkroom_events::{
    CloudEvent, InferenceJob, JobCompleted, JobId, JobProgress, JobStarted, ObjectRef, StageTimings,
};
use darkroom_shared::fetch;
use darkroom_shared::jobs::{JobRecord, JobStatus, JobStore};
use darkroom_shared::publish::Publisher;
use darkroom_shared::telemetry::TraceParent;
use darkroom_shared::{Delivery, Handler, HandlerError, JobContext};
use futures::StreamExt;
use image::RgbImage;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::Instrument;

use crate::config::WorkerConfig;
use crate::engine::{DRAWN_CONTROL_KINDS, Engine, Progress, RenderTask, Rendered};
use crate::error::RenderError;

/// The CloudEvents `source` of everything the worker publishes.
pub const SOURCE: &str = "/darkroom/inference";

/// Largest output side the worker renders, in pixels.
pub const MAX_SIDE: u32 = 4096;
/// Most denoising steps a job may ask for.
pub const MAX_STEPS: u32 = 150;

/// What `outputs/<job>/job.json` holds: the job as it was rendered and its `completed` data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobFile {
    /// The job, with its resolved render parameters.
    pub job: InferenceJob,
    /// The `completed` event's data.
    pub completed: JobCompleted,
}

/// The inference handler: the engine, S3, the bus and job records.
pub struct InferenceHandler {
    engine: Arc<Engine>,
    s3: aws_sdk_s3::Client,
    nats: async_nats::Client,
    publisher: Publisher,
    jobs: JobStore,
    config: Arc<WorkerConfig>,
    worker: String,
}

impl InferenceHandler {
    /// A handler over these clients. `publisher` should publish as [`SOURCE`].
    pub fn new(
        engine: Arc<Engine>,
        s3: aws_sdk_s3::Client,
        publisher: Publisher,
        jobs: JobStore,
        config: WorkerConfig,
    ) -> Self {
        let nats = publisher.jetstream().client();
        InferenceHandler {
            engine,
            s3,
            nats,
            publisher,
            jobs,
            worker: config.worker_name(),
            config: Arc::new(config),
        }
    }

    /// The publisher, for the consumer loop.
    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    /// The worker's name in events and records.
    pub fn worker(&self) -> &str {
        &self.worker
    }

    async fn run(&self, job: &InferenceJob, delivery: &Delivery) -> Result<(), RenderError> {
        let traceparent = delivery.traceparent;
        let record = self.jobs.get(job.job_id).await?;
        if let Some((record, _)) = &record
            && record.status == JobStatus::Completed
        {
            tracing::info!("already completed; nothing to do");
            return Ok(());
        }
        let received_at = record.map(|(record, _)| record.created_at);
        if let Some(stored) = self.stored_result(job).await? {
            tracing::info!("result stored by an earlier delivery; announcing it");
            return self.announce(&stored, traceparent).await;
        }

        let started = Instant::now();
        self.publisher
            .lifecycle(
                JobStarted {
                    job_id: job.job_id,
                    worker: self.worker.clone(),
                    attempt: delivery.attempt,
                },
                traceparent,
            )
            .await?;
        let worker = self.worker.clone();
        let attempt = delivery.attempt;
        self.jobs
            .transition(job.job_id, &job.source, |record| {
                if record.status == JobStatus::Completed {
                    return false;
                }
                record.status = JobStatus::Running;
                record.failure = None;
                record.worker = Some(worker.clone());
                record.attempts = Some(attempt);
                true
            })
            .await?;

        let cancel = Arc::new(AtomicBool::new(false));
        let _listener = self.listen_for_cancel(job.job_id, cancel.clone()).await?;
        let _stop_on_drop = StopOnDrop(cancel.clone());

        let fetch_started = Instant::now();
        let task = self.fetch(job).await?;
        let fetch_ms = millis_since(fetch_started);

        let rendered = self.render(job, task, cancel, traceparent).await?;
        if job.render.steps > 0 {
            let step = rendered.timings.denoise_ms as f64 / 1000.0 / f64::from(job.render.steps);
            metrics::histogram!(darkroom_shared::telemetry::metric::RENDER_STEP_SECONDS)
                .record(step);
        }

        let store_started = Instant::now();
        let result_key = format!("{}result.png", job.output_prefix);
        let result_etag = self
            .put(
                &job.source.bucket,
                &result_key,
                "image/png",
                rendered.png.clone(),
            )
            .await?;
        let timings = StageTimings {
            fetch_ms,
            store_ms: millis_since(store_started),
            ..rendered.timings
        };
        let completed = JobCompleted {
            job_id: job.job_id,
            source: job.source.clone(),
            preset: job.preset.clone(),
            result: ObjectRef {
                etag: result_etag,
                size: Some(rendered.png.len() as u64),
                ..ObjectRef::new(&job.source.bucket, &result_key)
            },
            metadata: ObjectRef::new(&job.source.bucket, format!("{}job.json", job.output_prefix)),
            seed: job.seed,
            model: self.engine.model_used().await?,
            loras: rendered.loras,
            controlnets: rendered.controlnets,
            worker: self.worker.clone(),
            attempt: delivery.attempt,
            total_ms: 0,
            inference_ms: 0,
            timings,
        };
        let mut file = JobFile {
            job: job.clone(),
            completed,
        };
        // The record's own PUT is the last stage; its time is left out of the record itself.
        file.completed.inference_ms = millis_since(started);
        file.completed.total_ms = received_at
            .and_then(|at| u64::try_from((chrono::Utc::now() - at).num_milliseconds()).ok())
            .unwrap_or(file.completed.inference_ms);
        let body = serde_json::to_vec_pretty(&file)
            .map_err(|e| RenderError::InvalidJob(format!("job.json: {e}")))?;
        self.put(
            &job.source.bucket,
            &file.completed.metadata.key,
            "application/json",
            body,
        )
        .await?;
        tracing::info!(
            result = %file.completed.result,
            inference_ms = file.completed.inference_ms,
            denoise_ms = file.completed.timings.denoise_ms,
            "completed"
        );
        self.announce(&file, traceparent).await
    }

    /// Publishes `completed` and records the job as completed.
    async fn announce(
        &self,
        file: &JobFile,
        traceparent: Option<TraceParent>,
    ) -> Result<(), RenderError> {
        self.publisher
            .lifecycle(file.completed.clone(), traceparent)
            .await?;
        let result = file.completed.result.clone();
        let worker = file.completed.worker.clone();
        self.jobs
            .transition(file.job.job_id, &file.job.source, |record| {
                if record.status == JobStatus::Completed {
                    return false;
                }
                record.status = JobStatus::Completed;
                record.failure = None;
                record.preset = Some(file.job.preset.clone());
                record.result = Some(result.clone());
                record.worker = Some(worker.clone());
                true
            })
            .await?;
        Ok(())
    }

    /// `outputs/<job>/job.json` when an earlier delivery stored the result.
    async fn stored_result(&self, job: &InferenceJob) -> Result<Option<JobFile>, RenderError> {
        let object = ObjectRef::new(&job.source.bucket, format!("{}job.json", job.output_prefix));
        match fetch::get_capped(&self.s3, &object, None, 1 << 20).await {
            Ok(bytes) => match serde_json::from_slice::<JobFile>(&bytes) {
                Ok(file) if file.job.job_id == job.job_id => Ok(Some(file)),
                // Not ours or unreadable: render again and overwrite it.
                _ => Ok(None),
            },
            Err(fetch::FetchError::NotFound { .. }) => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    /// Sets `cancel` when a message arrives on the job's cancel subject, until the returned
    /// guard is dropped.
    async fn listen_for_cancel(
        &self,
        job: JobId,
        cancel: Arc<AtomicBool>,
    ) -> Result<AbortOnDrop, RenderError> {
        let subject = cancel_subject(job);
        let mut subscriber = self.nats.subscribe(subject.clone()).await.map_err(|e| {
            darkroom_shared::RuntimeError::jetstream(format!("subscribe to {subject}"), e)
        })?;
        let task = tokio::spawn(async move {
            if subscriber.next().await.is_some() {
                tracing::info!(%job, "cancel requested");
                cancel.store(true, Ordering::Relaxed);
            }
        });
        Ok(AbortOnDrop(task))
    }

    /// The prepared input and the control maps the job's ControlNets read, decoded.
    async fn fetch(&self, job: &InferenceJob) -> Result<RenderTask, RenderError> {
        let init = self.fetch_image(job, &job.init_image_key).await?;
        let mut controls = HashMap::new();
        for params in &job.render.controlnets {
            if controls.contains_key(&params.kind) {
                continue;
            }
            let image = job
                .control_images
                .iter()
                .find(|image| image.kind == params.kind);
            // Depth and pose maps are drawn by the engine from the input when the job brings
            // none.
            if image.is_none() && DRAWN_CONTROL_KINDS.contains(&params.kind.as_str()) {
                continue;
            }
            let image = image.ok_or_else(|| {
                RenderError::InvalidJob(format!(
                    "ControlNet {} reads a {} map and the job has none",
                    params.model, params.kind
                ))
            })?;
            controls.insert(
                params.kind.clone(),
                self.fetch_image(job, &image.key).await?,
            );
        }
        Ok(RenderTask {
            job: job.clone(),
            init,
            controls,
        })
    }

    async fn fetch_image(&self, job: &InferenceJob, key: &str) -> Result<RgbImage, RenderError> {
        let object = ObjectRef::new(&job.source.bucket, key);
        let bytes = fetch::get_capped(&self.s3, &object, None, self.config.max_input_bytes).await?;
        let image = decode_png(key, &bytes)?;
        if (image.width(), image.height()) != (job.width, job.height) {
            return Err(RenderError::InvalidJob(format!(
                "{key} is {}×{}, the job renders {}×{}",
                image.width(),
                image.height(),
                job.width,
                job.height
            )));
        }
        Ok(image)
    }

    /// Runs the render, publishing the latest step at most every `progress_interval`.
    async fn render(
        &self,
        job: &InferenceJob,
        task: RenderTask,
        cancel: Arc<AtomicBool>,
        traceparent: Option<TraceParent>,
    ) -> Result<Rendered, RenderError> {
        let (progress, mut steps) = watch::channel::<Progress>(None);
        let render = self.engine.render(task, cancel, progress);
        tokio::pin!(render);
        let mut ticker = tokio::time::interval(self.config.progress_interval());
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut published = None;
        loop {
            tokio::select! {
                rendered = &mut render => return rendered,
                _ = ticker.tick() => {
                    let latest = *steps.borrow_and_update();
                    if let Some((step, total_steps)) = latest && latest != published {
                        published = latest;
                        let event = JobProgress { job_id: job.job_id, step, total_steps };
                        if let Err(error) = self.publisher.lifecycle(event, traceparent).await {
                            // Progress is best effort: the job goes on.
                            tracing::warn!(%error, "cannot publish progress");
                        }
                    }
                }
            }
        }
    }

    async fn put(
        &self,
        bucket: &str,
        key: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<Option<String>, RenderError> {
        let response = self
            .s3
            .put_object()
            .bucket(bucket)
            .key(key)
            .content_type(content_type)
            .body(ByteStream::from(Bytes::from(body)))
            .send()
            .await
            .map_err(|e| RenderError::Store {
                key: key.to_owned(),
                message: aws_sdk_s3::error::DisplayErrorContext(e).to_string(),
            })?;
        Ok(response.e_tag().map(darkroom_events::s3::normalize_etag))
    }

    /// Records a job that failed for good (unless it completed meanwhile).
    async fn mark_failed(&self, job: &InferenceJob, error: &HandlerError) {
        let reason = error.reason;
        let marked = self
            .jobs
            .transition(job.job_id, &job.source, |record: &mut JobRecord| {
                if record.status == JobStatus::Completed {
                    return false;
                }
                record.status = JobStatus::Failed;
                record.failure = Some(reason);
                true
            })
            .await;
        if let Err(error) = marked {
            tracing::warn!(%error, "cannot record the job as failed");
        }
    }
}

impl Handler for InferenceHandler {
    const STAGE: darkroom_events::Stage = darkroom_events::Stage::Inference;

    async fn handle(&self, delivery: &Delivery) -> Result<(), HandlerError> {
        let job = parse_job(&delivery.payload).map_err(RenderError::into_handler_error)?;
        let context = JobContext {
            job_id: job.job_id,
            source: Some(job.source.clone()),
        };
        let span = tracing::info_span!("job", job = %job.job_id, preset = %job.preset, attempt = delivery.attempt);
        let outcome = self.run(&job, delivery).instrument(span).await;
        match outcome {
            Ok(()) => Ok(()),
            Err(error) => {
                let error = error.into_handler_error().with_job(context);
                if error.is_permanent() || delivery.is_last_attempt() {
                    self.mark_failed(&job, &error).await;
                }
                Err(error)
            }
        }
    }

    fn job_of(&self, delivery: &Delivery) -> Option<JobContext> {
        parse_job(&delivery.payload).ok().map(|job| JobContext {
            job_id: job.job_id,
            source: Some(job.source),
        })
    }

    async fn abandoned(&self, delivery: &Delivery, error: &HandlerError) {
        if let Ok(job) = parse_job(&delivery.payload) {
            self.mark_failed(&job, error).await;
        }
    }

    fn stalled(&self) -> Option<String> {
        self.engine.watchdog().tripped().then(|| {
            format!(
                "the engine made no progress for {} s (DARKROOM_WATCHDOG_SECS)",
                self.config.watchdog_secs
            )
        })
    }
}

/// Reads and checks an inference job message (untrusted).
pub fn parse_job(payload: &[u8]) -> Result<InferenceJob, RenderError> {
    let event = CloudEvent::<InferenceJob>::from_json(payload)
        .map_err(|e| RenderError::InvalidJob(e.to_string()))?;
    let job = event.data;
    check_job(&job).map_err(RenderError::InvalidJob)?;
    Ok(job)
}

/// What a job must satisfy before any work is spent on it.
fn check_job(job: &InferenceJob) -> Result<(), String> {
    let render = &job.render;
    for (side, value) in [("width", job.width), ("height", job.height)] {
        if !(64..=MAX_SIDE).contains(&value) || value % 8 != 0 {
            return Err(format!(
                "{side} {value} must be a multiple of 8 in 64–{MAX_SIDE}"
            ));
        }
    }
    if !(1..=MAX_STEPS).contains(&render.steps) {
        return Err(format!("steps {} must be in 1–{MAX_STEPS}", render.steps));
    }
    if !(render.guidance.is_finite() && (0.0..=30.0).contains(&render.guidance)) {
        return Err(format!("guidance {} must be in 0–30", render.guidance));
    }
    if let Some(strength) = render.strength
        && !(strength > 0.0 && strength <= 1.0)
    {
        return Err(format!("strength {strength} must be in (0, 1]"));
    }
    for lora in &render.loras {
        if !lora.weight.is_finite() {
            return Err(format!("LoRA {} has weight {}", lora.name, lora.weight));
        }
    }
    for net in &render.controlnets {
        let window = 0.0 <= net.start && net.start < net.end && net.end <= 1.0;
        if !net.scale.is_finite() || !window {
            return Err(format!(
                "ControlNet {}: scale {} and window {}–{} must be finite, 0 ≤ start < end ≤ 1",
                net.model, net.scale, net.start, net.end
            ));
        }
    }
    let own_folder = format!("work/{}/", job.job_id);
    let keys = std::iter::once(job.init_image_key.as_str())
        .chain(job.control_images.iter().map(|image| image.key.as_str()));
    for key in keys {
        if !key.starts_with(&own_folder) || key.contains("..") {
            return Err(format!("input {key:?} is not under {own_folder}"));
        }
    }
    if job.output_prefix != format!("outputs/{}/", job.job_id) {
        return Err(format!(
            "output prefix {:?} is not outputs/{}/",
            job.output_prefix, job.job_id
        ));
    }
    Ok(())
}

/// Decodes a prepared PNG with limits: nothing larger than the worker renders.
fn decode_png(key: &str, bytes: &[u8]) -> Result<RgbImage, RenderError> {
    let decode_error = |message: String| RenderError::Decode {
        key: key.to_owned(),
        message,
    };
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), image::ImageFormat::Png);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(256 << 20);
    reader.limits(limits);
    reader
        .decode()
        .map(|image| image.to_rgb8())
        .map_err(|e| decode_error(e.to_string()))
}

fn millis_since(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Sets the cancel flag when the handler's future is dropped (the shutdown grace ran out), so
/// the engine thread stops the abandoned render at its next step.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use darkroom_events::{ControlImage, ControlNetParams, RenderParams};

    use super::*;

    fn job() -> InferenceJob {
        let source = ObjectRef {
            etag: Some("abc".to_owned()),
            ..ObjectRef::new("photos", "inbox/desk-setup/desk.jpg")
        };
        let job_id = source.job_id().unwrap();
        InferenceJob {
            job_id,
            source,
            preset: "desk-setup".to_owned(),
            init_image_key: format!("work/{job_id}/input.png"),
            control_images: vec![ControlImage {
                kind: "canny".to_owned(),
                key: format!("work/{job_id}/control-canny.png"),
            }],
            width: 1024,
            height: 1024,
            seed: 42,
            output_prefix: format!("outputs/{job_id}/"),
            render: RenderParams {
                prompt: "a desk".to_owned(),
                negative_prompt: String::new(),
                steps: 30,
                guidance: 5.0,
                scheduler: "euler".to_owned(),
                strength: Some(0.5),
                loras: Vec::new(),
                controlnets: vec![ControlNetParams {
                    kind: "canny".to_owned(),
                    model: "canny".to_owned(),
                    scale: 0.6,
                    start: 0.0,
                    end: 1.0,
                }],
                tone: None,
            },
        }
    }

    fn payload(job: &InferenceJob) -> Vec<u8> {
        CloudEvent::new(job.job_id.to_string(), "/test", job.clone()).to_json()
    }

    #[test]
    fn a_job_preprocess_made_passes() {
        assert_eq!(parse_job(&payload(&job())).unwrap(), job());
    }

    #[test]
    fn jobs_out_of_bounds_or_reaching_outside_their_folders_are_refused() {
        type Change = fn(&mut InferenceJob);
        let cases: [(&str, Change); 9] = [
            ("width", |j| j.width = 1000 + 4),
            ("height", |j| j.height = 8192),
            ("steps", |j| j.render.steps = 0),
            ("guidance", |j| j.render.guidance = 31.0),
            ("strength", |j| j.render.strength = Some(1.5)),
            ("window", |j| j.render.controlnets[0].end = 0.0),
            ("not under", |j| j.init_image_key = "inbox/x.png".to_owned()),
            ("not under", |j| {
                j.control_images[0].key = format!("work/{}/../../secret.png", j.job_id)
            }),
            ("output prefix", |j| j.output_prefix = "inbox/".to_owned()),
        ];
        for (expected, change) in cases {
            let mut job = job();
            change(&mut job);
            let error = parse_job(&payload(&job)).unwrap_err();
            assert!(error.to_string().contains(expected), "{expected}: {error}");
            assert_eq!(error.reason(), darkroom_events::FailureReason::InvalidEvent);
        }
        assert!(parse_job(b"{not json").is_err());
    }

    #[test]
    fn prepared_images_decode_within_limits() {
        let image = RgbImage::from_pixel(64, 48, image::Rgb([1, 2, 3]));
        let png = darkroom_shared::png::encode_png(&image);
        assert_eq!(decode_png("k", &png).unwrap(), image);
        assert!(matches!(
            decode_png("k", b"\x89PNG\r\n\x1a\nbroken"),
            Err(RenderError::Decode { .. })
        ));
    }
}
