//! Storage bounds against a real nats-server: a stream at its size bound behaves as
//! `StorageBounds` documents — the streams of work and outcomes refuse what comes next with
//! `StoreFull` and keep everything they hold, the notifier's replay history drops its oldest,
//! and a job's progress events are trimmed oldest-first while its other events stay.
#![allow(clippy::unwrap_used)]

use async_nats::jetstream;
use bytes::Bytes;
use darkroom_events::subjects;
use darkroom_events::{JobId, JobProgress, JobStarted};
use darkroom_shared::RuntimeError;
use darkroom_shared::publish::Publisher;
use darkroom_shared::topology::{EVENTS_PER_SUBJECT, StorageBounds, Topology};
use darkroom_tests::NatsServer;

const KIB: i64 = 1024;

async fn start(bounds: StorageBounds) -> (NatsServer, jetstream::Context) {
    let nats = NatsServer::start().await.unwrap();
    let js = nats.jetstream().await.unwrap();
    Topology {
        bounds,
        ..Topology::default()
    }
    .ensure(&js)
    .await
    .unwrap();
    (nats, js)
}

async fn stream_state(js: &jetstream::Context, name: &str) -> jetstream::stream::State {
    js.get_stream(name)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .clone()
}

#[tokio::test]
async fn a_full_uploads_stream_refuses_new_uploads_and_keeps_every_one_it_holds() {
    let (_nats, js) = start(StorageBounds {
        uploads: 8 * KIB,
        ..StorageBounds::default()
    })
    .await;
    let publisher = Publisher::new(js.clone(), "/darkroom/test");
    let payload = Bytes::from(vec![b'x'; 1000]);
    let mut accepted = 0u64;
    let refusal = loop {
        let published = publisher
            .publish_deduplicated(
                subjects::uploads_subject("photos"),
                &format!("upload-{accepted}"),
                payload.clone(),
                None,
            )
            .await;
        match published {
            Ok(_) => accepted += 1,
            Err(error) => break error,
        }
        assert!(accepted < 100, "an 8 KiB stream took 100 KB");
    };
    assert!(
        matches!(refusal, RuntimeError::StoreFull { .. }),
        "{refusal}"
    );
    assert!(refusal.to_string().contains("full"), "{refusal}");
    assert!(accepted >= 4, "{accepted}");
    // Nothing it held was dropped to make room.
    let state = stream_state(&js, subjects::UPLOADS_STREAM).await;
    assert_eq!(state.messages, accepted);
    assert_eq!(state.first_sequence, 1);
}

#[tokio::test]
async fn a_full_replay_history_drops_its_oldest_and_keeps_taking_new_fan_outs() {
    let (_nats, js) = start(StorageBounds {
        notify: 8 * KIB,
        ..StorageBounds::default()
    })
    .await;
    for index in 0..30 {
        js.publish(
            format!("darkroom.fanout.job.{index}.completed"),
            Bytes::from(vec![b'x'; 1000]),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    let state = stream_state(&js, subjects::NOTIFY_STREAM).await;
    assert!(state.bytes <= 8 * 1024, "{} bytes", state.bytes);
    assert!(state.first_sequence > 1);
    assert_eq!(state.last_sequence, 30);
}

#[tokio::test]
async fn a_jobs_progress_is_trimmed_oldest_first_and_its_other_events_stay() {
    let (_nats, js) = start(StorageBounds::default()).await;
    let publisher = Publisher::new(js.clone(), "/darkroom/inference");
    let job = JobId::for_object("photos", "inbox/a.jpg", "etag");
    let started = JobStarted {
        job_id: job,
        worker: "gpu-a".to_owned(),
        attempt: 1,
    };
    publisher.lifecycle(started, None).await.unwrap();
    let steps = EVENTS_PER_SUBJECT as u32 + 10;
    for step in 1..=steps {
        let progress = JobProgress {
            job_id: job,
            step,
            total_steps: steps,
        };
        publisher.lifecycle(progress, None).await.unwrap();
    }
    let kept = darkroom_tests::stream_messages(&js, subjects::EVENTS_STREAM).await;
    let progress: Vec<u32> = kept
        .iter()
        .filter(|m| m.subject.ends_with(".progress"))
        .map(|m| {
            darkroom_events::CloudEvent::<JobProgress>::from_json(&m.payload)
                .unwrap()
                .data
                .step
        })
        .collect();
    let expected: Vec<u32> = (11..=steps).collect();
    assert_eq!(progress, expected);
    assert_eq!(
        kept.iter()
            .filter(|m| m.subject.ends_with(".started"))
            .count(),
        1
    );
}
