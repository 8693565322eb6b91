//! The shared consumer loop against a real nats-server: acknowledgement by error class, dead
//! letters, `failed` events, in-progress acks, crash recovery and graceful shutdown.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use bytes::Bytes;
use darkroom_events::subjects::{self, headers};
use darkroom_events::{CloudEvent, FailureReason, JobFailed, JobId, Stage};
use darkroom_shared::consumer::{ConsumerSettings, run};
use darkroom_shared::publish::Publisher;
use darkroom_shared::topology::Topology;
use darkroom_shared::{Delivery, Handler, HandlerError, JobContext};
use darkroom_tests::NatsServer;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

/// Acts on the payload: `ok`, `permanent`, `transient`, `slow:<ms>`, `crash`, `hang` (never
/// returns), `hang-once` (never returns on the first delivery, then succeeds), `stall-once`
/// (on the first delivery reports itself stalled, as the worker's watchdog does, and never
/// returns; then succeeds); anything else is parsed as JSON and fails permanently when it is
/// not.
#[derive(Default)]
struct Scripted {
    calls: AtomicU32,
    stalled: AtomicBool,
}

impl Handler for Scripted {
    const STAGE: Stage = Stage::Preprocess;

    async fn handle(&self, delivery: &Delivery) -> Result<(), HandlerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let text = std::str::from_utf8(&delivery.payload).unwrap_or("");
        let job = self.job_of(delivery);
        match text {
            "ok" => Ok(()),
            "permanent" => Err(HandlerError::permanent(
                FailureReason::UnsupportedFormat,
                "not an image",
            )
            .with_job(job.unwrap())),
            "transient" => Err(HandlerError::transient(
                FailureReason::Internal,
                "S3 unavailable",
            )),
            "crash" => panic!("simulated worker crash"),
            "hang" => std::future::pending().await,
            "hang-once" if delivery.attempt == 1 => std::future::pending().await,
            "hang-once" => Ok(()),
            "stall-once" if delivery.attempt == 1 => {
                self.stalled.store(true, Ordering::SeqCst);
                std::future::pending().await
            }
            "stall-once" => Ok(()),
            slow if slow.starts_with("slow:") => {
                let ms = slow[5..].parse().unwrap();
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(())
            }
            other => serde_json::from_str::<serde_json::Value>(other)
                .map(|_| ())
                .map_err(|e| HandlerError::permanent(FailureReason::InvalidEvent, e.to_string())),
        }
    }

    fn job_of(&self, delivery: &Delivery) -> Option<JobContext> {
        Some(JobContext {
            job_id: job_for(&delivery.payload),
            source: None,
        })
    }

    fn stalled(&self) -> Option<String> {
        self.stalled
            .load(Ordering::SeqCst)
            .then(|| "no progress (test)".to_owned())
    }
}

fn job_for(payload: &[u8]) -> JobId {
    JobId::for_object("test", &String::from_utf8_lossy(payload), "etag")
}

struct Bench {
    _nats: NatsServer,
    js: jetstream::Context,
    settings: ConsumerSettings,
}

impl Bench {
    async fn start(ack_wait: Duration, max_deliver: i64) -> Self {
        let nats = NatsServer::start().await.unwrap();
        let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
        let topology = Topology {
            ack_wait,
            max_deliver,
            ..Topology::default()
        };
        topology.ensure(&js).await.unwrap();
        let mut settings = ConsumerSettings::new(
            &topology,
            subjects::UPLOADS_STREAM,
            subjects::consumers::PREPROCESS,
        );
        settings.fetch_expires = Duration::from_millis(500);
        settings.retry_backoff = vec![Duration::from_millis(50)];
        Bench {
            _nats: nats,
            js,
            settings,
        }
    }

    fn spawn(
        &self,
        handler: Arc<Scripted>,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let publisher = Publisher::new(self.js.clone(), "/darkroom/test");
        let settings = self.settings.clone();
        tokio::spawn(async move { run(handler, publisher, settings, shutdown).await.unwrap() })
    }

    async fn publish(&self, payload: &'static str) {
        self.js
            .publish(
                subjects::uploads_subject("test"),
                Bytes::from_static(payload.as_bytes()),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// Messages on `subject_filter` in `stream` (waits `settle` first).
    async fn messages(
        &self,
        stream: &str,
        subject_filter: &str,
        settle: Duration,
    ) -> Vec<jetstream::Message> {
        tokio::time::sleep(settle).await;
        let stream = self.js.get_stream(stream).await.unwrap();
        let consumer = stream
            .create_consumer(consumer::pull::Config {
                filter_subject: subject_filter.to_owned(),
                ack_policy: consumer::AckPolicy::None,
                ..Default::default()
            })
            .await
            .unwrap();
        let mut batch = consumer.fetch().max_messages(100).messages().await.unwrap();
        let mut out = Vec::new();
        while let Some(message) = batch.next().await {
            out.push(message.unwrap());
        }
        out
    }

    async fn dead_letters(&self, settle: Duration) -> Vec<jetstream::Message> {
        self.messages(subjects::DLQ_STREAM, subjects::DLQ_SUBJECTS, settle)
            .await
    }

    async fn uploads_pending(&self) -> u64 {
        let mut consumer: jetstream::consumer::PullConsumer = self
            .js
            .get_consumer_from_stream(subjects::consumers::PREPROCESS, subjects::UPLOADS_STREAM)
            .await
            .unwrap();
        let info = consumer.info().await.unwrap();
        info.num_pending + info.num_ack_pending as u64
    }
}

fn header<'a>(message: &'a jetstream::Message, name: &str) -> &'a str {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(name))
        .map(|v| v.as_str())
        .unwrap_or("")
}

#[tokio::test]
async fn permanent_errors_are_dead_lettered_once_with_a_failed_event_and_others_keep_flowing() {
    let bench = Bench::start(Duration::from_secs(5), 3).await;
    let handler = Arc::new(Scripted::default());
    let shutdown = CancellationToken::new();
    let task = bench.spawn(handler.clone(), shutdown.clone());
    bench.publish("{bad json").await;
    bench.publish("permanent").await;
    bench.publish("ok").await;

    let letters = bench.dead_letters(Duration::from_millis(1500)).await;
    assert_eq!(letters.len(), 2);
    assert_eq!(header(&letters[0], headers::DLQ_REASON), "invalid_event");
    assert_eq!(letters[0].payload.as_ref(), b"{bad json");
    assert_eq!(
        header(&letters[1], headers::DLQ_REASON),
        "unsupported_format"
    );
    assert_eq!(
        header(&letters[1], headers::DLQ_ORIGINAL_STREAM),
        subjects::UPLOADS_STREAM
    );
    assert_eq!(letters[1].subject.as_str(), "darkroom.dlq.preprocess");

    let job = job_for(b"permanent");
    let failed = bench
        .messages(
            subjects::EVENTS_STREAM,
            &subjects::job_events_filter(job),
            Duration::ZERO,
        )
        .await;
    assert_eq!(failed.len(), 1);
    let event = CloudEvent::<JobFailed>::from_json(&failed[0].payload).unwrap();
    assert_eq!(event.data.reason, FailureReason::UnsupportedFormat);
    assert_eq!(event.data.stage, Stage::Preprocess);
    assert_eq!(event.subject.as_deref(), Some(job.to_string().as_str()));

    // Each was handled once: no retries for what cannot succeed; nothing left pending.
    assert_eq!(handler.calls.load(Ordering::SeqCst), 3);
    assert_eq!(bench.uploads_pending().await, 0);
    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn transient_errors_are_retried_then_dead_lettered_after_max_deliver() {
    let bench = Bench::start(Duration::from_secs(5), 3).await;
    let handler = Arc::new(Scripted::default());
    let shutdown = CancellationToken::new();
    let task = bench.spawn(handler.clone(), shutdown.clone());
    bench.publish("transient").await;

    let letters = bench.dead_letters(Duration::from_millis(2000)).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(
        header(&letters[0], headers::DLQ_REASON),
        "max_deliveries_exceeded"
    );
    assert_eq!(header(&letters[0], headers::DLQ_DELIVERIES), "3");
    assert!(header(&letters[0], headers::DLQ_MESSAGE).contains("S3 unavailable"));
    assert_eq!(handler.calls.load(Ordering::SeqCst), 3);
    assert_eq!(bench.uploads_pending().await, 0);
    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn a_handler_that_never_returns_is_given_up_after_the_handling_timeout() {
    // In-progress acks alone would keep these messages for good.
    let mut bench = Bench::start(Duration::from_secs(1), 3).await;
    bench.settings.handling_timeout = Some(Duration::from_millis(1500));
    let handler = Arc::new(Scripted::default());
    let shutdown = CancellationToken::new();
    let task = bench.spawn(handler.clone(), shutdown.clone());
    bench.publish("hang-once").await;
    bench.publish("hang").await;

    let letters = darkroom_tests::wait_for(
        Duration::from_secs(30),
        || bench.dead_letters(Duration::from_millis(200)),
        |letters| !letters.is_empty(),
    )
    .await;
    // hang-once: given up once, then handled; hang: given up on each of its 3 deliveries.
    assert_eq!(handler.calls.load(Ordering::SeqCst), 2 + 3);
    // The message is terminated right after its dead letter is stored.
    darkroom_tests::wait_for(
        Duration::from_secs(10),
        || bench.uploads_pending(),
        |pending| *pending == 0,
    )
    .await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].payload.as_ref(), b"hang");
    assert_eq!(
        header(&letters[0], headers::DLQ_REASON),
        "max_deliveries_exceeded"
    );
    assert!(header(&letters[0], headers::DLQ_MESSAGE).contains("took longer than 1.5s"));
    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn in_progress_acks_keep_a_long_job_from_being_redelivered() {
    let bench = Bench::start(Duration::from_secs(1), 3).await;
    let handler = Arc::new(Scripted::default());
    let shutdown = CancellationToken::new();
    // Two workers: a redelivery would land on the idle one and be counted.
    let first = bench.spawn(handler.clone(), shutdown.clone());
    let second = bench.spawn(handler.clone(), shutdown.clone());
    bench.publish("slow:3500").await;
    tokio::time::sleep(Duration::from_millis(4500)).await;
    assert_eq!(handler.calls.load(Ordering::SeqCst), 1);
    assert_eq!(bench.uploads_pending().await, 0);
    assert!(bench.dead_letters(Duration::ZERO).await.is_empty());
    shutdown.cancel();
    first.await.unwrap();
    second.await.unwrap();
}

#[tokio::test]
async fn a_worker_that_dies_mid_job_has_its_message_redelivered() {
    let bench = Bench::start(Duration::from_secs(1), 5).await;
    let crashing = Arc::new(Scripted::default());
    let shutdown = CancellationToken::new();
    // A panic kills the loop's task without an ack or a nak, as SIGKILL would.
    let dead = bench.spawn(crashing.clone(), shutdown.clone());
    bench.publish("crash").await;
    assert!(dead.await.is_err());
    assert_eq!(crashing.calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        bench.uploads_pending().await,
        1,
        "the message must not be lost"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn messages_abandoned_by_crashing_workers_are_dead_lettered_by_the_next_worker() {
    let bench = Bench::start(Duration::from_secs(1), 2).await;
    bench.publish("crash").await;
    // Two workers die on the message in turn (2 attempts allowed), with nobody else connected.
    for _ in 0..2 {
        let handler = Arc::new(Scripted::default());
        let dead = bench.spawn(handler.clone(), CancellationToken::new());
        assert!(dead.await.is_err());
    }
    // No consumer is connected when the last attempt's AckWait runs out: a server advisory
    // sent then would reach nobody. The next worker to connect must still dead-letter it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let shutdown = CancellationToken::new();
    let healthy = bench.spawn(Arc::new(Scripted::default()), shutdown.clone());
    let mut letters = Vec::new();
    for _ in 0..20 {
        letters = bench.dead_letters(Duration::from_millis(250)).await;
        if !letters.is_empty() {
            break;
        }
    }
    assert_eq!(
        letters.len(),
        1,
        "one dead letter for the abandoned message"
    );
    assert_eq!(
        header(&letters[0], headers::DLQ_REASON),
        "max_deliveries_exceeded"
    );
    assert_eq!(letters[0].payload.as_ref(), b"crash");
    let failed = bench
        .messages(
            subjects::EVENTS_STREAM,
            &subjects::job_events_filter(job_for(b"crash")),
            Duration::ZERO,
        )
        .await;
    assert_eq!(failed.len(), 1);
    shutdown.cancel();
    healthy.await.unwrap();
}

#[tokio::test]
async fn a_stalled_handler_hands_its_message_back_and_stops_its_loop() {
    // A long AckWait: the message can only move on this fast if it is handed back.
    let bench = Bench::start(Duration::from_secs(30), 3).await;
    let stalling = Arc::new(Scripted::default());
    let publisher = Publisher::new(bench.js.clone(), "/darkroom/test");
    let mut settings = bench.settings.clone();
    settings.ack_wait = Duration::from_secs(30);
    let first = tokio::spawn(run(
        stalling.clone(),
        publisher,
        settings,
        CancellationToken::new(),
    ));
    bench.publish("stall-once").await;
    // It stops renewing the message and returns (its process would exit) within a heartbeat.
    let ended = tokio::time::timeout(Duration::from_secs(20), first)
        .await
        .expect("a stalled loop must stop")
        .unwrap();
    assert!(
        matches!(ended, Err(darkroom_shared::RuntimeError::Stalled(_))),
        "{ended:?}"
    );
    // The message was handed back at once, not after AckWait: a healthy consumer takes it.
    let shutdown = CancellationToken::new();
    let healthy = Arc::new(Scripted::default());
    let task = bench.spawn(healthy.clone(), shutdown.clone());
    for _ in 0..40 {
        if bench.uploads_pending().await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(bench.uploads_pending().await, 0);
    assert_eq!(healthy.calls.load(Ordering::SeqCst), 1);
    assert!(bench.dead_letters(Duration::ZERO).await.is_empty());
    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn shutdown_lets_the_message_in_hand_finish() {
    let bench = Bench::start(Duration::from_secs(5), 3).await;
    let handler = Arc::new(Scripted::default());
    let shutdown = CancellationToken::new();
    let task = bench.spawn(handler.clone(), shutdown.clone());
    bench.publish("slow:800").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    shutdown.cancel();
    task.await.unwrap();
    assert_eq!(handler.calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        bench.uploads_pending().await,
        0,
        "finished and acked before exiting"
    );
}
