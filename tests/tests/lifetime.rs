//! Exactly once for an upload's whole lifetime, past every window and retention: ingest (its
//! webhook from SeaweedFS and its reconciler sweeping every second), preprocess, the inference
//! stand-in and the notifier with one webhook endpoint, every max age and the duplicate window
//! shortened to seconds. Uploads complete; then their job records, events, fan-out, the
//! notifier's ledger and the duplicate window all expire while the uploads stay in the inbox,
//! the reconciler sweeps again and again and each upload's event is sent once more. Each
//! upload is still queued, completed and delivered by webhook exactly once: the receipt
//! preprocess wrote beside its outputs outlives the records.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream;
use darkroom_events::{JobId, ObjectRef};
use darkroom_ingest::IngestConfig;
use darkroom_shared::RuntimeConfig;
use darkroom_tests::stand_in::StandInPipeline;
use darkroom_tests::webhook::Receiver;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

const BUCKET: &str = "photos";
/// Every max age (and so the duplicate window), in seconds.
const RETENTION_SECS: u64 = 5;
const UPLOADS: usize = 4;
const WAIT: Duration = Duration::from_secs(90);
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const PRESET: &str = "lifetime-small";
const PRESET_TOML: &str = r#"
name = "lifetime-small"
prompt = "a test photo, {subject}"
steps = 4
guidance = 5.0
scheduler = "euler"
strength = 0.55
resolution = { width = 256, height = 256 }
"#;

/// Lifecycle events heard live (core NATS), by job and kind: the stream forgets them.
async fn hear_events(
    client: async_nats::Client,
) -> std::sync::Arc<std::sync::Mutex<BTreeMap<(String, String), usize>>> {
    let heard = std::sync::Arc::new(std::sync::Mutex::new(BTreeMap::new()));
    let mut events = client.subscribe("darkroom.events.>").await.unwrap();
    client.flush().await.unwrap();
    let tally = heard.clone();
    tokio::spawn(async move {
        while let Some(message) = events.next().await {
            let mut parts = message.subject.split('.').skip(2);
            if let (Some(job), Some(kind)) = (parts.next(), parts.next()) {
                *tally
                    .lock()
                    .unwrap()
                    .entry((job.to_owned(), kind.to_owned()))
                    .or_insert(0) += 1;
            }
        }
    });
    heard
}

fn webhooks_for(receiver: &Receiver, job: JobId) -> usize {
    receiver
        .received()
        .into_iter()
        .filter(|r| {
            serde_json::from_slice::<serde_json::Value>(&r.body)
                .is_ok_and(|body| body["subject"] == job.to_string())
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_upload_is_handled_once_for_as_long_as_it_stays_past_every_retention() {
    let (nats, s3, s3_client, ingest_port) = darkroom_tests::servers_for_ingest(BUCKET).await;
    let runtime = RuntimeConfig {
        nats_url: nats.url(),
        s3_endpoint: Some(s3.endpoint()),
        s3_access_key_id: Some(s3.access_key().to_owned()),
        s3_secret_access_key: Some(s3.secret_key().to_owned()),
        bucket: BUCKET.to_owned(),
        ack_wait_secs: 4.0,
        uploads_max_age_secs: RETENTION_SECS,
        events_max_age_secs: RETENTION_SECS,
        notify_max_age_secs: RETENTION_SECS,
        jobs_max_age_secs: RETENTION_SECS,
        ..RuntimeConfig::default()
    };
    let js = jetstream::new(nats.client().await.unwrap());
    runtime.topology().ensure(&js).await.unwrap();
    let heard = hear_events(nats.client().await.unwrap()).await;

    let receiver = Receiver::start(Vec::new()).await;
    let dir = tempfile::tempdir().unwrap();
    let endpoints = dir.path().join("endpoints.toml");
    std::fs::write(
        &endpoints,
        format!(
            "[[endpoints]]\nid = \"studio\"\nurl = \"{}\"\nsecrets = [\"{SECRET}\"]\n\
             allow_networks = [\"loopback\"]\n",
            receiver.url()
        ),
    )
    .unwrap();
    let pipeline = StandInPipeline::start_with_webhooks(
        &runtime,
        PRESET,
        PRESET_TOML,
        "lifetime-stand-in",
        Some(endpoints),
    )
    .await;
    let ingest_shutdown = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", ingest_port))
        .await
        .unwrap();
    let ingest = tokio::spawn(darkroom_ingest::serve(
        IngestConfig {
            runtime: runtime.clone(),
            ingest_reconcile_interval_secs: 1,
            ..IngestConfig::default()
        },
        listener,
        ingest_shutdown.clone(),
    ));

    let mut objects: Vec<ObjectRef> = Vec::new();
    for index in 0..UPLOADS {
        objects.push(
            darkroom_tests::put_object(
                &s3_client,
                BUCKET,
                &format!("inbox/{PRESET}/kept-{index}.jpg"),
                darkroom_tests::checkerboard_jpeg(index),
            )
            .await,
        );
    }
    let jobs: Vec<JobId> = objects.iter().map(|o| o.job_id().unwrap()).collect();
    darkroom_tests::wait_for(
        WAIT,
        || async { jobs.iter().all(|job| webhooks_for(&receiver, *job) >= 1) },
        |done| *done,
    )
    .await;

    // Past every retention and the duplicate window, with sweeps all along; then each
    // upload's event once more, and more sweeps.
    tokio::time::sleep(Duration::from_secs(3 * RETENTION_SECS)).await;
    let records = darkroom_shared::jobs::JobStore::open(&js).await.unwrap();
    for job in &jobs {
        assert!(
            records.get(*job).await.unwrap().is_none(),
            "record of {job} kept"
        );
    }
    for object in &objects {
        darkroom_tests::announce_upload(&js, object).await;
    }
    tokio::time::sleep(Duration::from_secs(2 * RETENTION_SECS)).await;

    let heard = heard.lock().unwrap().clone();
    for job in &jobs {
        for kind in ["queued", "completed"] {
            let count = heard
                .get(&(job.to_string(), kind.to_owned()))
                .copied()
                .unwrap_or(0);
            assert_eq!(count, 1, "{kind} events of {job}: {heard:#?}");
        }
        assert_eq!(webhooks_for(&receiver, *job), 1, "webhooks of {job}");
    }
    ingest_shutdown.cancel();
    ingest.await.unwrap().unwrap();
    pipeline.stop().await;
}
