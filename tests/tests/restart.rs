//! The bus and the object store restarted under a running Darkroom (one nats-server, one
//! SeaweedFS, as the local stack runs them): a batch of uploads through preprocess, a zero-cost
//! inference stand-in and the notifier while nats-server is killed (SIGKILL, a crash) and
//! started again on the same store, then while SeaweedFS is killed and started again. The
//! functions keep running throughout and reconnect by themselves. Every upload completes
//! exactly once: one `completed` event and one notification per job, no dead letter, nothing
//! left in the work queue.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use async_nats::jetstream;
use darkroom_events::lifecycle::LifecycleKind;
use darkroom_events::subjects;
use darkroom_events::{JobId, ObjectRef};
use darkroom_shared::RuntimeConfig;
use darkroom_tests::stand_in::{self, StandInPipeline};
use darkroom_tests::{NatsServer, S3Server};

const BUCKET: &str = "photos";
/// Uploads announced before the NATS crash, between the two restarts, and while S3 is down.
const BATCH: usize = 8;
/// How long each server stays down.
const DOWN_FOR: Duration = Duration::from_secs(3);
const WAIT: Duration = Duration::from_secs(60);
/// A small fixed-size preset, so preprocessing (a debug build, on CI's two cores) is quick.
const PRESET: &str = "restart-small";
const PRESET_TOML: &str = r#"
name = "restart-small"
description = "Restart test: a small fixed size."
prompt = "a test photo, {subject}"
negative_prompt = "blurry"
steps = 4
guidance = 5.0
scheduler = "euler"
strength = 0.55
resolution = { width = 256, height = 256 }
"#;

fn completed_subject(job: &JobId) -> String {
    subjects::lifecycle_subject(*job, LifecycleKind::Completed)
}

/// How many of `jobs` have a `completed` event (0 while the stream cannot be read).
async fn completed_count(js: &jetstream::Context, jobs: &[JobId]) -> usize {
    if js.get_stream(subjects::EVENTS_STREAM).await.is_err() {
        return 0;
    }
    let counts = darkroom_tests::subject_counts(js, subjects::EVENTS_STREAM).await;
    jobs.iter()
        .filter(|job| counts.contains_key(&completed_subject(job)))
        .count()
}

#[tokio::test]
async fn restarting_nats_and_s3_mid_run_loses_and_doubles_nothing() {
    let started = std::time::Instant::now();
    let mut nats_server = NatsServer::start().await.unwrap();
    let mut s3 = S3Server::start(None).await.unwrap();
    let s3_client = s3.client().await;
    darkroom_shared::s3::ensure_bucket(&s3_client, BUCKET)
        .await
        .unwrap();

    let runtime = RuntimeConfig {
        nats_url: nats_server.url(),
        s3_endpoint: Some(s3.endpoint()),
        s3_access_key_id: Some(s3.access_key().to_owned()),
        s3_secret_access_key: Some(s3.secret_key().to_owned()),
        bucket: BUCKET.to_owned(),
        // A message whose ack was lost in the crash comes back soon.
        ack_wait_secs: 4.0,
        max_deliver: 30,
        ..RuntimeConfig::default()
    };
    let topology = runtime.topology();
    let js = jetstream::new(
        darkroom_shared::nats::connect(&runtime, "restart-test")
            .await
            .unwrap(),
    );
    topology.ensure(&js).await.unwrap();

    let pipeline =
        StandInPipeline::start(&runtime, PRESET, PRESET_TOML, "restart-test-stand-in").await;

    // Every photo stored up front; three batches announced around the two restarts.
    let mut objects: Vec<ObjectRef> = Vec::new();
    for index in 0..3 * BATCH {
        let object = darkroom_tests::put_object(
            &s3_client,
            BUCKET,
            &format!("inbox/{PRESET}/restart-{index:02}.jpg"),
            darkroom_tests::checkerboard_jpeg(index),
        )
        .await;
        objects.push(object);
    }
    let jobs: Vec<JobId> = objects.iter().map(|o| o.job_id().unwrap()).collect();
    let batches: Vec<&[ObjectRef]> = objects.chunks(BATCH).collect();

    // 1. nats-server crashes mid-batch and comes back on the same store.
    for object in batches[0] {
        darkroom_tests::announce_upload(&js, object).await;
    }
    darkroom_tests::wait_for(WAIT, || completed_count(&js, &jobs), |done| *done >= 2).await;
    nats_server.kill();
    eprintln!("{:?} nats-server killed", started.elapsed());
    tokio::time::sleep(DOWN_FOR).await;
    nats_server.restart().await.unwrap();
    eprintln!("{:?} nats-server back", started.elapsed());
    for object in batches[1] {
        darkroom_tests::announce_upload_retrying(&js, object, WAIT).await;
    }

    // 2. SeaweedFS crashes while the last batch is being preprocessed, and comes back.
    for object in batches[2] {
        darkroom_tests::announce_upload_retrying(&js, object, WAIT).await;
    }
    s3.kill();
    eprintln!("{:?} SeaweedFS killed", started.elapsed());
    tokio::time::sleep(DOWN_FOR).await;
    s3.restart().await.unwrap();
    eprintln!("{:?} SeaweedFS back", started.elapsed());

    // Every job completed and notified, and exactly once.
    stand_in::assert_completed_exactly_once(&js, &jobs, WAIT).await;
    eprintln!("{:?} all notified", started.elapsed());
    pipeline.stop().await;
    eprintln!("{:?} stopped", started.elapsed());
}
