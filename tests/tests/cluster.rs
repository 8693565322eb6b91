//! Darkroom on a real 3-node NATS cluster: R3 streams and buckets, a batch of uploads through
//! preprocess, a zero-cost inference stand-in and the notifier, and the node leading the jobs
//! stream killed mid-run and brought back. Every upload completes exactly once: one `completed`
//! event per job in the events stream, one notification per job in the notify stream.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use async_nats::jetstream;
use darkroom_events::subjects;
use darkroom_events::{JobId, lifecycle::LifecycleKind};
use darkroom_shared::RuntimeConfig;
use darkroom_tests::stand_in::{self, StandInPipeline};
use darkroom_tests::{NatsCluster, S3Server};

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

    let pipeline =
        StandInPipeline::start(&runtime, PRESET, PRESET_TOML, "cluster-test-stand-in").await;

    // The batch: every photo stored; the first half announced now, the second half while the
    // jobs stream's leader is down.
    let mut objects = Vec::new();
    for index in 0..UPLOADS {
        let object = darkroom_tests::put_object(
            &s3_client,
            BUCKET,
            &format!("inbox/{PRESET}/cluster-{index:02}.jpg"),
            darkroom_tests::checkerboard_jpeg(index),
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
        || darkroom_tests::subject_counts(&js, subjects::EVENTS_STREAM),
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
        darkroom_tests::announce_upload_retrying(&js, object, WAIT).await;
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
    stand_in::assert_completed_exactly_once(&js, &jobs, WAIT).await;
    eprintln!("{:?} all notified", started.elapsed());
    pipeline.stop().await;
    eprintln!("{:?} stopped", started.elapsed());
}
