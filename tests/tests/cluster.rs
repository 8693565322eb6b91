//! Darkroom on a real 3-node NATS cluster: R3 streams and buckets, a batch of uploads through
//! preprocess, a zero-cost inference stand-in and the notifier, and the node leading the jobs
//! stream killed mid-run and brought back. Every upload completes exactly once: one `completed`
//! event per job in the events stream, one notification per job in the notify stream.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::Cursor;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use darkroom_events::subjects::{self, consumers};
use darkroom_events::{
    CloudEvent, FailureReason, InferenceJob, JobCompleted, JobId, JobStarted, ModelUsed, ObjectRef,
    Stage, StageTimings, lifecycle::LifecycleKind,
};
use darkroom_notifier::config::NotifierConfig;
use darkroom_preprocess::config::PreprocessConfig;
use darkroom_shared::RuntimeConfig;
use darkroom_shared::consumer::{self, ConsumerSettings};
use darkroom_shared::handler::{Delivery, Handler, HandlerError};
use darkroom_shared::jobs::{JobStatus, JobStore};
use darkroom_shared::publish::Publisher;
use darkroom_tests::{NatsCluster, S3Server};
use image::{ExtendedColorType, ImageEncoder, Rgb, RgbImage};
use tokio_util::sync::CancellationToken;

const BUCKET: &str = "photos";
const UPLOADS: usize = 30;
/// Completed jobs before the jobs stream's leader is killed.
const KILL_AFTER: usize = 8;
/// How long the killed node stays down.
const DOWN_FOR: Duration = Duration::from_secs(4);
const WAIT: Duration = Duration::from_secs(45);
/// A small fixed-size preset, so preprocessing (a debug build, on CI's two cores) is quick.
const PRESET: &str = "cluster-small";
const PRESET_TOML: &str = r#"
name = "cluster-small"
description = "Cluster test: a small fixed size, layout kept by edges."
prompt = "a test photo, {subject}"
negative_prompt = "blurry"
steps = 4
guidance = 5.0
scheduler = "dpmpp-2m-karras"
strength = 0.55
resolution = { width = 256, height = 256 }

[[controlnets]]
kind = "canny"
model = "controlnet-canny-sdxl-1.0"
scale = 0.6
start = 0.0
end = 1.0
"#;

/// TEST-ONLY STAND-IN for the GPU worker (as in benches/control_plane.rs): the worker's
/// control-plane work around a render (record `running`, `started`, `completed`, record
/// `completed`; the shared loop acks), rendering nothing.
struct InferenceStandIn {
    publisher: Publisher,
    jobs: JobStore,
}

fn transient(error: impl std::fmt::Display) -> HandlerError {
    HandlerError::transient(FailureReason::Internal, error.to_string())
}

impl InferenceStandIn {
    async fn mark(&self, job: &InferenceJob, status: JobStatus) -> Result<(), HandlerError> {
        self.jobs
            .transition(job.job_id, &job.source, |record| {
                record.status = status;
                record.updated_at = chrono::Utc::now();
                true
            })
            .await
            .map_err(transient)?;
        Ok(())
    }
}

impl Handler for InferenceStandIn {
    const STAGE: Stage = Stage::Inference;

    async fn handle(&self, delivery: &Delivery) -> Result<(), HandlerError> {
        let job = CloudEvent::<InferenceJob>::from_json(&delivery.payload)
            .map_err(|e| HandlerError::permanent(FailureReason::InvalidEvent, e.to_string()))?
            .data;
        self.mark(&job, JobStatus::Running).await?;
        let worker = "cluster-test-stand-in".to_owned();
        self.publisher
            .lifecycle(
                JobStarted {
                    job_id: job.job_id,
                    worker: worker.clone(),
                    attempt: delivery.attempt,
                },
                delivery.traceparent,
            )
            .await
            .map_err(transient)?;
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
                name: "stand-in (no model: cluster test)".to_owned(),
                sha256: String::new(),
            },
            loras: Vec::new(),
            controlnets: Vec::new(),
            worker,
            attempt: delivery.attempt,
            total_ms: 0,
            inference_ms: 0,
            timings: StageTimings::default(),
        };
        self.publisher
            .lifecycle(completed, delivery.traceparent)
            .await
            .map_err(transient)?;
        self.mark(&job, JobStatus::Completed).await
    }
}

fn photo_jpeg(index: usize) -> Vec<u8> {
    let image = RgbImage::from_fn(320, 240, |x, y| {
        let v = if (x / 20 + y / 20) % 2 == 0 { 220 } else { 30 };
        Rgb([v, ((x as usize + index * 7) % 256) as u8, (y % 256) as u8])
    });
    let mut out = Cursor::new(Vec::new());
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 85)
        .write_image(image.as_raw(), 320, 240, ExtendedColorType::Rgb8)
        .unwrap();
    out.into_inner()
}

/// How many messages of `stream` each subject holds.
async fn subject_counts(js: &jetstream::Context, stream: &str) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for message in darkroom_tests::stream_messages(js, stream).await {
        *counts.entry(message.subject.to_string()).or_default() += 1;
    }
    counts
}

/// Publishes the object's upload notification until JetStream acknowledges it (during a
/// leader election a publish may fail; a retried one may be stored twice, as a re-sent S3
/// notification would be, and must still make one job).
async fn announce_retrying(js: &jetstream::Context, object: &ObjectRef) {
    let notification = darkroom_events::S3Notification {
        records: vec![darkroom_events::S3EventRecord::object_created(
            "aws:s3", object, None,
        )],
    };
    let payload = serde_json::to_vec(&notification).unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let published = match js
            .publish(
                subjects::uploads_subject(&object.bucket),
                payload.clone().into(),
            )
            .await
        {
            Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(error) => Err(error.to_string()),
        };
        match published {
            Ok(()) => return,
            Err(error) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "announcing {object}: {error}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// The name of the server leading `stream` (after an election, once there is one).
async fn leader_of(js: &jetstream::Context, stream: &str) -> String {
    darkroom_tests::wait_for(
        WAIT,
        || async {
            let Ok(mut stream) = js.get_stream(stream).await else {
                return None;
            };
            let info = stream.info().await.ok()?;
            info.cluster.as_ref()?.leader.clone()
        },
        Option::is_some,
    )
    .await
    .unwrap_or_default()
}

#[tokio::test]
async fn killing_the_jobs_leader_loses_and_doubles_nothing() {
    let started = std::time::Instant::now();
    let mut cluster = NatsCluster::start(3).await.unwrap();
    eprintln!("{:?} cluster up", started.elapsed());
    let s3 = S3Server::start(None).await.unwrap();
    let s3_client = s3.client().await;
    darkroom_shared::s3::ensure_bucket(&s3_client, BUCKET)
        .await
        .unwrap();

    let runtime = RuntimeConfig {
        nats_url: cluster.urls(),
        s3_endpoint: Some(s3.endpoint()),
        s3_access_key_id: Some(s3.access_key().to_owned()),
        s3_secret_access_key: Some(s3.secret_key().to_owned()),
        bucket: BUCKET.to_owned(),
        jetstream_replicas: 3,
        // A message whose ack was lost in the failover comes back soon.
        ack_wait_secs: 5.0,
        max_deliver: 20,
        ..RuntimeConfig::default()
    };
    let topology = runtime.topology();
    // Through the comma-separated URL list, as every function connects.
    let nats = darkroom_shared::nats::connect(&runtime, "cluster-test")
        .await
        .unwrap();
    let js = jetstream::new(nats);
    // The JetStream meta leader is elected a moment after the servers are up.
    darkroom_tests::wait_for(
        WAIT,
        || async { topology.ensure(&js).await.is_ok() },
        |done| *done,
    )
    .await;
    eprintln!("{:?} topology", started.elapsed());
    let jobs_stream = js.get_stream(subjects::JOBS_STREAM).await.unwrap();
    assert_eq!(jobs_stream.cached_info().config.num_replicas, 3);

    let presets = tempfile::tempdir().unwrap();
    std::fs::write(presets.path().join(format!("{PRESET}.toml")), PRESET_TOML).unwrap();
    let shutdown = CancellationToken::new();
    let preprocess = tokio::spawn(darkroom_preprocess::service::serve(
        PreprocessConfig {
            runtime: runtime.clone(),
            preprocess_preset_dir: Some(presets.path().to_path_buf()),
            ..PreprocessConfig::default()
        },
        shutdown.clone(),
    ));
    let notifier = tokio::spawn(darkroom_notifier::service::serve(
        NotifierConfig {
            runtime: runtime.clone(),
            ..NotifierConfig::default()
        },
        shutdown.clone(),
    ));
    let stand_in_js = jetstream::new(
        darkroom_shared::nats::connect(&runtime, "cluster-test-stand-in")
            .await
            .unwrap(),
    );
    let stand_in = Arc::new(InferenceStandIn {
        publisher: Publisher::new(stand_in_js.clone(), "/darkroom/tests/cluster-stand-in"),
        jobs: JobStore::open(&stand_in_js).await.unwrap(),
    });
    let mut settings =
        ConsumerSettings::new(&topology, subjects::JOBS_STREAM, consumers::INFERENCE);
    settings.fetch_expires = Duration::from_millis(500);
    settings.retry_backoff = vec![Duration::from_millis(300)];
    let inference = tokio::spawn(consumer::run(
        stand_in.clone(),
        stand_in.publisher.clone(),
        settings,
        shutdown.clone(),
    ));

    // The batch: every photo stored; the first half announced now, the second half while the
    // jobs stream's leader is down.
    let mut objects = Vec::new();
    for index in 0..UPLOADS {
        let object = darkroom_tests::put_object(
            &s3_client,
            BUCKET,
            &format!("inbox/{PRESET}/cluster-{index:02}.jpg"),
            photo_jpeg(index),
        )
        .await;
        objects.push(object);
    }
    let jobs: Vec<JobId> = objects.iter().map(|o| o.job_id().unwrap()).collect();
    let (first_half, second_half) = objects.split_at(UPLOADS / 2);
    for object in first_half {
        darkroom_tests::announce_upload(&js, object).await;
    }
    eprintln!("{:?} first half announced", started.elapsed());
    let completed_subject =
        |job: &JobId| subjects::lifecycle_subject(*job, LifecycleKind::Completed);

    // Mid-run: kill the server leading the jobs stream, bring it back a few seconds later.
    darkroom_tests::wait_for(
        WAIT,
        || subject_counts(&js, subjects::EVENTS_STREAM),
        |counts| {
            jobs.iter()
                .filter(|job| counts.contains_key(&completed_subject(job)))
                .count()
                >= KILL_AFTER
        },
    )
    .await;
    eprintln!("{:?} {KILL_AFTER} completed", started.elapsed());
    let leader = leader_of(&js, subjects::JOBS_STREAM).await;
    assert!(cluster.names().contains(&leader), "leader {leader:?}");
    cluster.kill(&leader).unwrap();
    let down_since = tokio::time::Instant::now();
    for object in second_half {
        announce_retrying(&js, object).await;
    }
    eprintln!("{:?} second half announced", started.elapsed());
    let new_leader = leader_of(&js, subjects::JOBS_STREAM).await;
    tokio::time::sleep_until(down_since + DOWN_FOR).await;
    assert_ne!(new_leader, leader, "no new leader was elected");
    cluster.restart(&leader).await.unwrap();
    eprintln!(
        "{:?} restarted {leader}, new leader {new_leader}",
        started.elapsed()
    );

    // Every job completed, and exactly once: one `completed` event and one notification each.
    let notification = |job: &JobId| {
        format!(
            "darkroom.fanout.job.{job}.{}",
            LifecycleKind::Completed.as_str()
        )
    };
    let notify = darkroom_tests::wait_for(
        WAIT,
        || subject_counts(&js, subjects::NOTIFY_STREAM),
        |counts| {
            jobs.iter()
                .all(|job| counts.contains_key(&notification(job)))
        },
    )
    .await;
    eprintln!("{:?} all notified", started.elapsed());
    let events = subject_counts(&js, subjects::EVENTS_STREAM).await;
    for job in &jobs {
        assert_eq!(
            events.get(&completed_subject(job)),
            Some(&1),
            "{job} completed"
        );
        assert_eq!(notify.get(&notification(job)), Some(&1), "{job} notified");
    }
    let dead_letters = subject_counts(&js, subjects::DLQ_STREAM).await;
    assert!(dead_letters.is_empty(), "dead letters: {dead_letters:?}");
    let queued = js
        .get_stream(subjects::JOBS_STREAM)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages;
    assert_eq!(queued, 0, "jobs left in the work queue");

    shutdown.cancel();
    preprocess.await.unwrap().unwrap();
    notifier.await.unwrap().unwrap();
    inference.await.unwrap().unwrap();
    eprintln!("{:?} stopped", started.elapsed());
}
