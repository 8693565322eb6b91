//! The notifier against a real nats-server and a real HTTP receiver on 127.0.0.1: fan-out
//! subjects a core-NATS subscriber hears once, Standard Webhooks signatures checked by an
//! independent verifier written here from the spec, retries with the same `webhook-id`,
//! `Retry-After`, `410 Gone`, the SSRF refusal of loopback, dead letters, redeliveries, and
//! the same handler under the Lambda adapter (in-process, and through `lambda_runtime` in a
//! child process).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::{HeaderMap, Subscriber};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use darkroom_events::subjects::{self, headers};
use darkroom_events::{
    AdapterUsed, CloudEvent, JobCompleted, JobId, JobStarted, LifecycleEvent, LifecycleKind,
    ModelUsed, ObjectRef, StageTimings,
};
use darkroom_notifier::config::NotifierConfig;
use darkroom_notifier::handler::{DeliveryOutcome, NotifierHandler};
use darkroom_notifier::ledger::{DeliveryState, webhook_id};
use darkroom_notifier::signature::{self, DEFAULT_TOLERANCE, VerifyError, WebhookSecret};
use darkroom_shared::Delivery;
use darkroom_shared::RuntimeConfig;
use darkroom_shared::jobs::{JobRecord, JobStore};
use darkroom_shared::publish::Publisher;
use darkroom_tests::NatsServer;
use darkroom_tests::lambda_api::RuntimeApi;
use darkroom_tests::webhook::{Received, Receiver, Reply, status};
use futures::StreamExt;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

const BUCKET: &str = "photos";
const WAIT: Duration = Duration::from_secs(30);
/// The endpoint's two secrets, as during a rotation: old and new.
const SECRET_OLD: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const SECRET_NEW: &str = "whsec_b6Ovv5eS7H5seJrGSStBYDivs8v2/KrFjfMaVZYsi7w=";
/// A secret the endpoint does not have.
const SECRET_WRONG: &str = "whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

// ---------------------------------------------------------------------------------------------
// An independent Standard Webhooks verifier, written from the spec without the notifier's code.

/// What a receiver does with a request: `Ok` or why not.
fn independent_verify(
    secret: &str,
    request: &Received,
    body: &[u8],
    now: i64,
) -> Result<(), &'static str> {
    let id = request.header("webhook-id").ok_or("no webhook-id")?;
    let timestamp = request
        .header("webhook-timestamp")
        .ok_or("no webhook-timestamp")?;
    let signatures = request
        .header("webhook-signature")
        .ok_or("no webhook-signature")?;
    let sent: i64 = timestamp.parse().map_err(|_| "timestamp not a number")?;
    if (now - sent).abs() > 5 * 60 {
        return Err("timestamp outside the tolerance");
    }
    let key = STANDARD
        .decode(secret.strip_prefix("whsec_").ok_or("not a whsec_ secret")?)
        .map_err(|_| "secret not base64")?;
    let mut signed = format!("{id}.{timestamp}.").into_bytes();
    signed.extend_from_slice(body);
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(&signed);
    let expected = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
    if signatures.split(' ').any(|entry| entry == expected) {
        Ok(())
    } else {
        Err("no matching signature")
    }
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

// ---------------------------------------------------------------------------------------------
// The stack: nats-server with Darkroom's topology, and the notifier.

struct Stack {
    nats: NatsServer,
    js: jetstream::Context,
    client: async_nats::Client,
    dir: tempfile::TempDir,
}

/// A running notifier (`service::serve`).
struct Running {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

/// One endpoint table for the endpoint file.
fn endpoint(id: &str, url: &str, extra: &str) -> String {
    format!(
        "[[endpoints]]\nid = \"{id}\"\nurl = \"{url}\"\nsecrets = [\"{SECRET_OLD}\", \"{SECRET_NEW}\"]\n{extra}\n"
    )
}

impl Stack {
    async fn start() -> Self {
        let nats = NatsServer::start().await.unwrap();
        let js = nats.jetstream().await.unwrap();
        darkroom_shared::topology::Topology::default()
            .ensure(&js)
            .await
            .unwrap();
        let client = nats.client().await.unwrap();
        Stack {
            nats,
            js,
            client,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// Settings with `endpoints` (TOML tables) and quick retries.
    fn config(&self, endpoints: &str) -> NotifierConfig {
        let file = self.dir.path().join("endpoints.toml");
        std::fs::write(&file, endpoints).unwrap();
        NotifierConfig {
            runtime: RuntimeConfig {
                nats_url: self.nats.url(),
                bucket: BUCKET.to_owned(),
                ..RuntimeConfig::default()
            },
            notifier_endpoints_file: Some(file),
            notifier_backoff_base_ms: 50,
            notifier_backoff_max_ms: 200,
            notifier_request_timeout_ms: 5_000,
            notifier_concurrency: 2,
            ..NotifierConfig::default()
        }
    }

    async fn spawn(&self, config: NotifierConfig) -> Running {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                darkroom_notifier::service::serve(config, shutdown)
                    .await
                    .unwrap();
            }
        });
        Running { shutdown, task }
    }

    /// Publishes a lifecycle event the way the pipeline does; returns its stored bytes.
    async fn publish<T: LifecycleEvent>(&self, event: T) -> Bytes {
        let job = event.job_id();
        let kind = T::KIND;
        Publisher::new(self.js.clone(), "/darkroom/inference")
            .lifecycle(event, None)
            .await
            .unwrap();
        let subject = subjects::lifecycle_subject(job, kind);
        let stored = self.messages(subjects::EVENTS_STREAM).await;
        stored
            .into_iter()
            .rev()
            .find(|m| m.subject.as_str() == subject)
            .unwrap()
            .payload
    }

    /// Every message in `stream`, oldest first, without consuming any.
    async fn messages(&self, stream: &str) -> Vec<jetstream::message::StreamMessage> {
        darkroom_tests::stream_messages(&self.js, stream).await
    }

    /// Waits until the notifier has acknowledged every event in the stream.
    async fn wait_settled(&self) {
        wait_for(
            || async {
                let stream = self.js.get_stream(subjects::EVENTS_STREAM).await.unwrap();
                let last = stream.get_info().await.unwrap().state.last_sequence;
                let mut consumer: jetstream::consumer::PullConsumer = stream
                    .get_consumer(subjects::consumers::NOTIFIER)
                    .await
                    .unwrap();
                let info = consumer.info().await.unwrap();
                (last, info.ack_floor.stream_sequence)
            },
            |(last, acked)| acked >= last,
        )
        .await;
    }

    async fn dead_letters(&self) -> Vec<jetstream::message::StreamMessage> {
        self.messages(subjects::DLQ_STREAM).await
    }

    async fn subscribe(&self, subject: String) -> Subscriber {
        darkroom_tests::subscribe_registered(&self.client, subject).await
    }
}

/// Every message a subscriber has received, waiting `quiet` after the last one.
async fn drain(subscriber: &mut Subscriber, quiet: Duration) -> Vec<async_nats::Message> {
    let mut got = Vec::new();
    while let Ok(Some(message)) = tokio::time::timeout(quiet, subscriber.next()).await {
        got.push(message);
    }
    got
}

/// What a subscriber hears: the first message within [`WAIT`] (none is a failure), then any
/// more until half a second passes without one.
async fn heard(subscriber: &mut Subscriber) -> Vec<async_nats::Message> {
    let first = tokio::time::timeout(WAIT, subscriber.next())
        .await
        .expect("a message within the wait")
        .unwrap();
    let mut got = vec![first];
    got.extend(drain(subscriber, Duration::from_millis(500)).await);
    got
}

/// Polls `probe` until `done` holds (or panics after [`WAIT`]).
async fn wait_for<T, F, Fut>(probe: F, done: impl Fn(&T) -> bool) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    darkroom_tests::wait_for(WAIT, probe, done).await
}

fn upload(name: &str) -> ObjectRef {
    ObjectRef {
        etag: Some(format!("{:032x}", name.len() * 7919)),
        size: Some(1234),
        ..ObjectRef::new(BUCKET, format!("inbox/profile-warm/{name}"))
    }
}

fn completed(source: &ObjectRef) -> JobCompleted {
    let job_id = source.job_id().unwrap();
    JobCompleted {
        job_id,
        source: source.clone(),
        preset: "profile-warm".to_owned(),
        result: ObjectRef::new(BUCKET, format!("outputs/{job_id}/result.png")),
        metadata: ObjectRef::new(BUCKET, format!("outputs/{job_id}/job.json")),
        seed: 4_242_424_242,
        model: ModelUsed {
            name: "sdxl-base-1.0".to_owned(),
            sha256: "31e35c80fc4829d14f90153f4c74cd59c90b779f6afe05a74cd6120b893f7e5b".to_owned(),
        },
        loras: Vec::new(),
        controlnets: vec![AdapterUsed {
            name: "controlnet-canny-sdxl-1.0".to_owned(),
            sha256: "a8b4ec8d2d4ab4c1eaa1d6d4dc3f50a8a9bbbe4f6a5d4c8c86b2e2fb0a1e1b7c".to_owned(),
            weight: 0.6,
        }],
        worker: "gpu-0".to_owned(),
        attempt: 1,
        total_ms: 14_250,
        inference_ms: 9_870,
        timings: StageTimings {
            fetch_ms: 40,
            adapters_ms: 0,
            text_ms: 30,
            prepare_ms: 120,
            denoise_ms: 9_200,
            decode_ms: 300,
            finish_ms: 130,
            store_ms: 50,
        },
    }
}

fn event_id(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn header(message: &jetstream::message::StreamMessage, name: &str) -> String {
    message
        .headers
        .get(name)
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_failing_receiver_gets_the_event_on_the_third_attempt_with_one_webhook_id() {
    let stack = Stack::start().await;
    let receiver = Receiver::start(vec![status(500), status(500), status(200)]).await;
    let config = stack.config(&endpoint(
        "studio-app",
        &receiver.url(),
        "allow_networks = [\"loopback\"]",
    ));
    let source = upload("three.jpg");
    let job = source.job_id().unwrap();
    let mut per_job = stack
        .subscribe(subjects::notify_job_subject(job, LifecycleKind::Completed))
        .await;
    let mut per_prefix = stack
        .subscribe(subjects::notify_prefix_filter(
            BUCKET,
            "inbox/profile-warm/",
        ))
        .await;
    let notifier = stack.spawn(config).await;

    let body = stack.publish(completed(&source)).await;
    let requests = receiver.wait_for_requests(3).await;
    stack.wait_settled().await;
    let id = webhook_id(&event_id(&body), "studio-app");
    assert_eq!(receiver.received().len(), 3, "no request after the 200");
    for request in &requests {
        assert_eq!(request.header("webhook-id"), Some(id.as_str()));
        assert_eq!(request.header("content-type"), Some("application/json"));
        assert_eq!(request.body, body, "the CloudEvent, byte for byte");
        // Signed with both secrets: a receiver holding either one accepts it.
        assert_eq!(
            request
                .header("webhook-signature")
                .unwrap()
                .split(' ')
                .count(),
            2
        );
        for secret in [SECRET_OLD, SECRET_NEW] {
            independent_verify(secret, request, &request.body, now()).unwrap();
        }
    }
    assert!(requests.windows(2).all(|w| w[0].at <= w[1].at));

    // What a receiver must refuse: a tampered body, a stale timestamp, the wrong secret.
    let last = &requests[2];
    let mut tampered = last.body.to_vec();
    tampered.extend_from_slice(b" ");
    assert_eq!(
        independent_verify(SECRET_OLD, last, &tampered, now()),
        Err("no matching signature")
    );
    assert_eq!(
        independent_verify(SECRET_OLD, last, &last.body, now() + 6 * 60),
        Err("timestamp outside the tolerance")
    );
    assert_eq!(
        independent_verify(SECRET_WRONG, last, &last.body, now()),
        Err("no matching signature")
    );
    // The notifier's reference verifier agrees on all four.
    let secrets = [WebhookSecret::parse(SECRET_NEW).unwrap()];
    let reference = |body: &[u8], secrets: &[WebhookSecret], at: i64| {
        signature::verify(
            secrets,
            last.header("webhook-id").unwrap(),
            last.header("webhook-timestamp").unwrap(),
            last.header("webhook-signature").unwrap(),
            body,
            at,
            DEFAULT_TOLERANCE,
        )
    };
    assert_eq!(reference(&last.body, &secrets, now()), Ok(()));
    assert_eq!(
        reference(&tampered, &secrets, now()),
        Err(VerifyError::NoMatch)
    );
    assert!(matches!(
        reference(&last.body, &secrets, now() + 6 * 60),
        Err(VerifyError::TooOld { .. })
    ));
    let wrong = [WebhookSecret::parse(SECRET_WRONG).unwrap()];
    assert_eq!(
        reference(&last.body, &wrong, now()),
        Err(VerifyError::NoMatch)
    );

    // Settled in the ledger; nothing dead-lettered; each subject heard the event once.
    let handler = darkroom_notifier::service::connect(&stack.config(""))
        .await
        .unwrap();
    let record = handler.ledger().delivery(&id).await.unwrap().unwrap();
    assert_eq!(record.state, DeliveryState::Delivered { status: 200 });
    assert!(stack.dead_letters().await.is_empty());
    let messages = heard(&mut per_job).await;
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].payload, body);
    let messages = heard(&mut per_prefix).await;
    assert_eq!(messages.len(), 1);
    assert_eq!(
        messages[0].subject.as_str(),
        "darkroom.notify.bucket.photos.inbox.profile-warm.completed"
    );
    let msg_id = messages[0]
        .headers
        .as_ref()
        .and_then(|h| h.get(headers::MSG_ID))
        .unwrap()
        .as_str()
        .to_owned();
    assert_eq!(msg_id, format!("{}:bucket", event_id(&body)));
    notifier.stop().await;
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let stack = Stack::start().await;
    let receiver = Receiver::start(vec![
        Reply {
            status: 503,
            retry_after: Some("2"),
        },
        status(204),
    ])
    .await;
    let config = stack.config(&endpoint(
        "slow-down",
        &receiver.url(),
        "allow_networks = [\"loopback\"]",
    ));
    let notifier = stack.spawn(config).await;
    stack.publish(completed(&upload("later.jpg"))).await;
    let requests = receiver.wait_for_requests(2).await;
    // The backoff alone is at most 200 ms here; the receiver asked for 2 s.
    let gap = requests[1].at - requests[0].at;
    assert!(gap >= Duration::from_secs(2), "retried after {gap:?}");
    assert_eq!(
        requests[0].header("webhook-id"),
        requests[1].header("webhook-id")
    );
    stack.wait_settled().await;
    assert!(stack.dead_letters().await.is_empty());
    notifier.stop().await;
}

#[tokio::test]
async fn a_410_disables_the_endpoint_for_good() {
    let stack = Stack::start().await;
    let receiver = Receiver::start(vec![status(410)]).await;
    let config = stack.config(&endpoint(
        "gone",
        &receiver.url(),
        "allow_networks = [\"loopback\"]",
    ));
    let notifier = stack.spawn(config.clone()).await;
    let first = stack.publish(completed(&upload("first.jpg"))).await;
    receiver.wait_for_requests(1).await;
    stack.wait_settled().await;

    // Disabled in KV, outliving this process: a fresh notifier sends the next event nowhere.
    notifier.stop().await;
    let kv = stack
        .js
        .get_key_value(subjects::WEBHOOK_ENDPOINTS_KV)
        .await
        .unwrap();
    let disabled: Value = serde_json::from_slice(&kv.get("gone").await.unwrap().unwrap()).unwrap();
    assert_eq!(disabled["url"], receiver.url());
    assert_eq!(
        disabled["webhook_id"],
        webhook_id(&event_id(&first), "gone")
    );
    let source = upload("second.jpg");
    let mut per_job = stack
        .subscribe(subjects::notify_job_subject(
            source.job_id().unwrap(),
            LifecycleKind::Completed,
        ))
        .await;
    let notifier = stack.spawn(config).await;
    stack.publish(completed(&source)).await;
    stack.wait_settled().await;
    assert_eq!(heard(&mut per_job).await.len(), 1);
    assert_eq!(receiver.received().len(), 1, "nothing after the 410");
    assert!(stack.dead_letters().await.is_empty());
    notifier.stop().await;
}

#[tokio::test]
async fn a_loopback_target_is_refused_without_the_allowance_and_the_subjects_still_hear() {
    let stack = Stack::start().await;
    let receiver = Receiver::start(vec![]).await;
    // No allow_networks, no global allowance.
    let config = stack.config(&endpoint("local", &receiver.url(), ""));
    let source = upload("refused.jpg");
    let mut per_job = stack
        .subscribe(subjects::notify_job_subject(
            source.job_id().unwrap(),
            LifecycleKind::Completed,
        ))
        .await;
    let notifier = stack.spawn(config).await;
    let body = stack.publish(completed(&source)).await;

    let letters = wait_for(|| stack.dead_letters(), |l| !l.is_empty()).await;
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter.subject.as_str(), "darkroom.dlq.notifier");
    assert_eq!(header(letter, headers::DLQ_REASON), "target_refused");
    assert!(header(letter, headers::DLQ_MESSAGE).contains("127.0.0.1"));
    assert_eq!(
        header(letter, headers::DLQ_ORIGINAL_SUBJECT),
        subjects::lifecycle_subject(source.job_id().unwrap(), LifecycleKind::Completed)
    );
    assert_eq!(letter.payload, body);
    stack.wait_settled().await;
    assert!(
        receiver.received().is_empty(),
        "no request reached 127.0.0.1"
    );
    let messages = heard(&mut per_job).await;
    assert_eq!(messages.len(), 1);
    // The job itself did not fail: no `failed` event.
    let failed = subjects::lifecycle_subject(source.job_id().unwrap(), LifecycleKind::Failed);
    assert!(
        stack
            .messages(subjects::EVENTS_STREAM)
            .await
            .iter()
            .all(|m| m.subject.as_str() != failed)
    );
    notifier.stop().await;
}

#[tokio::test]
async fn after_the_last_attempt_the_delivery_is_dead_lettered_and_the_event_acknowledged() {
    let stack = Stack::start().await;
    let receiver = Receiver::start(vec![status(500); 10]).await;
    let mut config = stack.config(&endpoint(
        "down",
        &receiver.url(),
        "allow_networks = [\"loopback\"]",
    ));
    config.notifier_max_attempts = 3;
    let notifier = stack.spawn(config).await;
    let source = upload("down.jpg");
    let body = stack.publish(completed(&source)).await;
    let letters = wait_for(|| stack.dead_letters(), |l| !l.is_empty()).await;
    stack.wait_settled().await;
    assert_eq!(receiver.received().len(), 3);
    assert_eq!(letters.len(), 1);
    assert_eq!(
        header(&letters[0], headers::DLQ_REASON),
        "max_deliveries_exceeded"
    );
    assert_eq!(header(&letters[0], headers::DLQ_DELIVERIES), "3");
    let message = header(&letters[0], headers::DLQ_MESSAGE);
    assert!(
        message.contains(&webhook_id(&event_id(&body), "down")),
        "{message}"
    );
    assert!(message.contains("500"), "{message}");
    let failed = subjects::lifecycle_subject(source.job_id().unwrap(), LifecycleKind::Failed);
    assert!(
        stack
            .messages(subjects::EVENTS_STREAM)
            .await
            .iter()
            .all(|m| m.subject.as_str() != failed)
    );
    notifier.stop().await;
}

#[tokio::test]
async fn a_receiver_that_stops_answering_is_cut_off_and_gets_every_event_once_it_answers_again() {
    const EVENTS: usize = 12;
    const FAILURES: u32 = 3;
    const CONCURRENCY: usize = 2;
    let stack = Stack::start().await;
    let dead = Receiver::start(vec![]).await;
    dead.hang(true);
    let alive = Receiver::start(vec![]).await;
    let loopback = "allow_networks = [\"loopback\"]";
    let mut config = stack.config(&format!(
        "{}{}",
        endpoint("dead", &dead.url(), loopback),
        endpoint("alive", &alive.url(), loopback)
    ));
    config.notifier_request_timeout_ms = 500;
    config.notifier_concurrency = CONCURRENCY;
    config.notifier_breaker_failures = FAILURES;
    config.notifier_breaker_cooldown_ms = 3_000;
    let notifier = stack.spawn(config).await;
    for i in 0..EVENTS {
        stack
            .publish(completed(&upload(&format!("burst-{i}.jpg"))))
            .await;
    }

    // Every event reaches the receiver that answers, while the silent one was only tried
    // until its breaker opened (and by the attempts already under way then): without the
    // breaker every event's first attempt would have waited out the timeout on it.
    alive.wait_for_requests(EVENTS).await;
    let tried = dead.received().len();
    assert!(
        tried <= FAILURES as usize + CONCURRENCY,
        "{tried} requests to a receiver that does not answer"
    );

    // It answers again: after the cool-down one trial request closes the breaker, and every
    // waiting delivery goes out once; nothing is dead-lettered.
    dead.hang(false);
    let answered = wait_for(
        || async { dead.received().split_off(tried) },
        |requests| distinct_webhook_ids(requests) >= EVENTS,
    )
    .await;
    stack.wait_settled().await;
    assert_eq!(distinct_webhook_ids(&dead.received()[tried..]), EVENTS);
    assert_eq!(
        dead.received().len() - tried,
        answered.len(),
        "no request after all were delivered"
    );
    assert_eq!(
        alive.received().len(),
        EVENTS,
        "each event once to the other"
    );
    assert!(stack.dead_letters().await.is_empty());
    notifier.stop().await;
}

fn distinct_webhook_ids(requests: &[Received]) -> usize {
    let ids: std::collections::HashSet<_> = requests
        .iter()
        .map(|r| r.header("webhook-id").unwrap().to_owned())
        .collect();
    ids.len()
}

#[tokio::test]
async fn a_redelivered_event_makes_no_second_webhook_and_no_second_notification() {
    let stack = Stack::start().await;
    let receiver = Receiver::start(vec![]).await;
    let config = stack.config(&endpoint(
        "once",
        &receiver.url(),
        "allow_networks = [\"loopback\"]",
    ));
    let source = upload("twice.jpg");
    let job = source.job_id().unwrap();
    let mut per_job = stack
        .subscribe(subjects::notify_job_subject(job, LifecycleKind::Completed))
        .await;
    let mut per_bucket = stack
        .subscribe(subjects::notify_prefix_filter(BUCKET, ""))
        .await;
    let body = stack.publish(completed(&source)).await;

    // The same message handled twice, as when an ack is lost and JetStream redelivers it.
    let handler: NotifierHandler = darkroom_notifier::service::connect(&config).await.unwrap();
    let delivery = Delivery {
        subject: subjects::lifecycle_subject(job, LifecycleKind::Completed),
        payload: body.clone(),
        attempt: 1,
        max_attempts: 8,
        traceparent: None,
    };
    let first = handler.notify(&delivery).await.unwrap();
    assert!(first.fanned_out);
    assert_eq!(
        first.deliveries,
        [("once".to_owned(), DeliveryOutcome::Delivered)]
    );
    let again = Delivery {
        attempt: 2,
        ..delivery
    };
    let second = handler.notify(&again).await.unwrap();
    assert!(!second.fanned_out);
    assert_eq!(
        second.deliveries,
        [("once".to_owned(), DeliveryOutcome::AlreadySettled)]
    );

    // The same event stored a second time, as when it is re-sent after the duplicate window,
    // goes through the running consumer: still nothing new.
    let mut resend = HeaderMap::new();
    resend.insert(headers::MSG_ID, "a-later-copy");
    stack
        .js
        .publish_with_headers(
            subjects::lifecycle_subject(job, LifecycleKind::Completed),
            resend,
            body.clone(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let notifier = stack.spawn(config).await;
    stack.wait_settled().await;
    assert_eq!(receiver.received().len(), 1);
    assert_eq!(heard(&mut per_job).await.len(), 1);
    assert_eq!(heard(&mut per_bucket).await.len(), 1);
    let stored = stack.messages(subjects::NOTIFY_STREAM).await;
    assert_eq!(stored.len(), 2, "one per subject");
    notifier.stop().await;
}

#[tokio::test]
async fn the_notify_stream_republishes_each_message_id_once() {
    // What closes the last gap: a notifier that dies after publishing and before recording it
    // publishes again on redelivery, with the same Nats-Msg-Id; the stream drops the copy
    // before republishing, so a core subscriber hears one message.
    let stack = Stack::start().await;
    // Unique names, so that nothing else on the server can have used them.
    let token = uuid::Uuid::new_v4().simple().to_string();
    let mut live = stack
        .subscribe(format!("darkroom.notify.job.{token}.completed"))
        .await;
    for _ in 0..3 {
        let mut map = HeaderMap::new();
        map.insert(headers::MSG_ID, format!("{token}:job").as_str());
        let ack = stack
            .js
            .publish_with_headers(
                format!("darkroom.fanout.job.{token}.completed"),
                map,
                "x".into(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(ack.stream, subjects::NOTIFY_STREAM);
    }
    let messages = heard(&mut live).await;
    assert_eq!(messages.len(), 1);
    let headers = messages[0].headers.as_ref().unwrap();
    assert_eq!(
        headers.get("Nats-Stream").unwrap().as_str(),
        subjects::NOTIFY_STREAM
    );
}

#[tokio::test]
async fn started_events_find_their_upload_through_the_job_record() {
    let stack = Stack::start().await;
    let receiver = Receiver::start(vec![]).await;
    let config = stack.config(&endpoint(
        "warm-starts",
        &receiver.url(),
        "kinds = [\"started\"]\nbucket = \"photos\"\nprefix = \"inbox/profile-warm/\"\n\
         allow_networks = [\"loopback\"]",
    ));
    let source = upload("started.jpg");
    let job = source.job_id().unwrap();
    JobStore::open(&stack.js)
        .await
        .unwrap()
        .create(&JobRecord::received(job, source.clone()))
        .await
        .unwrap();
    let mut per_prefix = stack
        .subscribe(subjects::notify_prefix_filter(BUCKET, "inbox/"))
        .await;
    let notifier = stack.spawn(config).await;
    let body = stack
        .publish(JobStarted {
            job_id: job,
            worker: "gpu-0".to_owned(),
            attempt: 1,
        })
        .await;
    let requests = receiver.wait_for_requests(1).await;
    assert_eq!(requests[0].body, body);
    let messages = heard(&mut per_prefix).await;
    assert_eq!(messages.len(), 1);
    assert_eq!(
        messages[0].subject.as_str(),
        "darkroom.notify.bucket.photos.inbox.profile-warm.started"
    );
    // A started event of a job with no record reaches the job subject only, and no filtered
    // endpoint.
    let unknown = JobId::for_object(BUCKET, "inbox/profile-warm/unknown.jpg", "e");
    let mut unknown_job = stack
        .subscribe(subjects::notify_job_subject(
            unknown,
            LifecycleKind::Started,
        ))
        .await;
    stack
        .publish(JobStarted {
            job_id: unknown,
            worker: "gpu-0".to_owned(),
            attempt: 1,
        })
        .await;
    stack.wait_settled().await;
    assert_eq!(heard(&mut unknown_job).await.len(), 1);
    assert!(
        drain(&mut per_prefix, Duration::from_millis(100))
            .await
            .is_empty()
    );
    assert_eq!(receiver.received().len(), 1);
    notifier.stop().await;
}

#[tokio::test]
async fn the_lambda_adapter_runs_the_handler_on_direct_and_sqs_events() {
    let stack = Stack::start().await;
    let receiver = Receiver::start(vec![status(500)]).await;
    let config = stack.config(&endpoint(
        "lambda",
        &receiver.url(),
        "allow_networks = [\"loopback\"]",
    ));
    let handler = darkroom_notifier::service::connect(&config).await.unwrap();
    let publisher = handler.publisher().clone();
    let invoke = |payload: Value| {
        let handler = &handler;
        let publisher = &publisher;
        async move { darkroom_shared::lambda::invoke(handler, Some(publisher), payload).await }
    };

    // Direct: the CloudEvent is the payload. The receiver's 500 fails the invocation, so
    // Lambda's own retry applies; the retry delivers.
    let source = upload("lambda.jpg");
    let event = CloudEvent::new("lambda-event-1", "/darkroom/inference", completed(&source))
        .with_subject(source.job_id().unwrap().to_string());
    let payload: Value = serde_json::from_slice(&event.to_json()).unwrap();
    assert!(invoke(payload.clone()).await.is_err());
    assert_eq!(invoke(payload).await.unwrap(), json!({"status": "ok"}));
    let requests = receiver.received();
    assert_eq!(requests.len(), 2);
    assert_eq!(
        requests[0].header("webhook-id"),
        Some(webhook_id("lambda-event-1", "lambda").as_str())
    );
    assert_eq!(
        requests[0].header("webhook-id"),
        requests[1].header("webhook-id")
    );
    independent_verify(SECRET_NEW, &requests[1], &requests[1].body, now()).unwrap();

    // SQS: each record's body is one event; a bad one is reported, not retried.
    let other = upload("sqs.jpg");
    let event = CloudEvent::new("sqs-event-1", "/darkroom/inference", completed(&other));
    let sqs = json!({"Records": [
        {"eventSource": "aws:sqs", "messageId": "m1",
         "body": String::from_utf8(event.to_json()).unwrap(),
         "attributes": {"ApproximateReceiveCount": "1"}},
        {"eventSource": "aws:sqs", "messageId": "m2", "body": "{\"not\": \"an event\"}"}
    ]});
    assert_eq!(invoke(sqs).await.unwrap(), json!({"batchItemFailures": []}));
    assert_eq!(receiver.received().len(), 3);
    let letters = stack.dead_letters().await;
    assert_eq!(letters.len(), 1);
    assert_eq!(header(&letters[0], headers::DLQ_REASON), "invalid_event");
}

const LAMBDA_CHILD_ENV: &str = "DARKROOM_TEST_LAMBDA_CHILD";

#[tokio::test]
async fn lambda_runtime_serves_the_handler() {
    let stack = Stack::start().await;
    let receiver = Receiver::start(vec![]).await;
    let config = stack.config(&endpoint("runtime", &receiver.url(), ""));
    let source = upload("runtime.jpg");
    let event = CloudEvent::new("runtime-event-1", "/darkroom/inference", completed(&source));
    let api = Arc::new(RuntimeApi::default());
    *api.event.lock().unwrap() = Some(serde_json::from_slice(&event.to_json()).unwrap());
    let (addr, server) = RuntimeApi::serve(api.clone(), "darkroom-notifier").await;
    let mut per_job = stack
        .subscribe(subjects::notify_job_subject(
            source.job_id().unwrap(),
            LifecycleKind::Completed,
        ))
        .await;

    // This test binary again, running only `lambda_child`, which serves the handler with
    // `darkroom-notifier lambda`'s code under the Lambda environment set here; the loopback
    // allowance comes from the environment, as an operator would give it.
    let mut child = RuntimeApi::child_command(addr, "darkroom-notifier", 256, LAMBDA_CHILD_ENV)
        .env("DARKROOM_NATS_URL", stack.nats.url())
        .env(
            "DARKROOM_NOTIFIER_ENDPOINTS_FILE",
            config.notifier_endpoints_file.as_ref().unwrap(),
        )
        .env("DARKROOM_NOTIFIER_ALLOW_NETWORKS", "[loopback]")
        .spawn()
        .unwrap();
    api.assert_answered_ok(WAIT).await;
    let requests = receiver.wait_for_requests(1).await;
    independent_verify(SECRET_OLD, &requests[0], &requests[0].body, now()).unwrap();
    assert_eq!(heard(&mut per_job).await.len(), 1);
    child.kill().await.unwrap();
    server.abort();
}

/// Entry point of the child process of [`lambda_runtime_serves_the_handler`]; does nothing
/// unless that test started it.
#[tokio::test]
#[ignore = "run by lambda_runtime_serves_the_handler in a child process"]
async fn lambda_child() {
    if std::env::var_os(LAMBDA_CHILD_ENV).is_none() {
        return;
    }
    let config: NotifierConfig = darkroom_shared::config::load().unwrap();
    darkroom_notifier::service::lambda(config).await.unwrap();
}
