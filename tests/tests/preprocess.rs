//! Preprocess against real servers: S3 upload events on the uploads stream of a real
//! nats-server, objects in a real SeaweedFS, the handler on the shared consumer loop and under
//! the shared Lambda adapter (in-process, and through `lambda_runtime` in a child process).
#![allow(clippy::unwrap_used)]

use std::io::Cursor;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use darkroom_events::s3::encode_key;
use darkroom_events::subjects::{self, headers};
use darkroom_events::{CloudEvent, InferenceJob, JobFailed, JobId, JobQueued, ObjectRef};
use darkroom_preprocess::config::PreprocessConfig;
use darkroom_preprocess::handler::{PreprocessHandler, SOURCE};
use darkroom_shared::RuntimeConfig;
use darkroom_shared::consumer::{self, ConsumerSettings};
use darkroom_shared::fetch::{self, FetchError};
use darkroom_shared::jobs::{JobStatus, JobStore};
use darkroom_shared::publish::Publisher;
use darkroom_shared::topology::Topology;
use darkroom_tests::lambda_api::RuntimeApi;
use darkroom_tests::{NatsServer, S3Server};
use image::{ExtendedColorType, ImageEncoder, Rgb, RgbImage};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const BUCKET: &str = "photos";
const WAIT: Duration = Duration::from_secs(30);

/// A 4:3 photo-like JPEG (bucket 1152×896) tagged with a Display P3 profile.
fn photo_jpeg() -> Vec<u8> {
    let image = RgbImage::from_fn(1200, 900, |x, y| {
        let v = if (x / 60 + y / 60) % 2 == 0 { 220 } else { 30 };
        Rgb([v, (x % 256) as u8, (y % 256) as u8])
    });
    let mut out = Cursor::new(Vec::new());
    let mut encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90);
    encoder
        .set_icc_profile(moxcms::ColorProfile::new_display_p3().encode().unwrap())
        .unwrap();
    encoder
        .write_image(image.as_raw(), 1200, 900, ExtendedColorType::Rgb8)
        .unwrap();
    out.into_inner()
}

const SVG: &[u8] = br#"<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><script>alert(1)</script></svg>"#;

/// A TCP relay in front of SeaweedFS's S3 port that counts the bytes the server sends and can
/// refuse connections, to watch (and break) what the handler downloads.
struct S3Relay {
    addr: SocketAddr,
    from_server: Arc<AtomicU64>,
    down: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl S3Relay {
    async fn start(target: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let from_server = Arc::new(AtomicU64::new(0));
        let down = Arc::new(AtomicBool::new(false));
        let (count, refuse) = (from_server.clone(), down.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if refuse.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let count = count.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    else {
                        return;
                    };
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let upstream = tokio::io::copy(&mut client_read, &mut server_write);
                    let downstream = async {
                        let mut buffer = vec![0u8; 16 * 1024];
                        loop {
                            let n = match server_read.read(&mut buffer).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            count.fetch_add(n as u64, Ordering::SeqCst);
                            if client_write.write_all(&buffer[..n]).await.is_err() {
                                break;
                            }
                        }
                    };
                    tokio::select! {
                        _ = upstream => {}
                        _ = downstream => {}
                    }
                });
            }
        });
        S3Relay {
            addr,
            from_server,
            down,
            task,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for S3Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A running preprocess consumer.
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

struct Stack {
    nats: NatsServer,
    s3: S3Server,
    s3_client: aws_sdk_s3::Client,
    js: jetstream::Context,
    topology: Topology,
}

impl Stack {
    async fn start(webhook: Option<&str>) -> Self {
        // Room for a transient outage to outlast a few deliveries.
        let topology = Topology {
            max_deliver: 20,
            ..Topology::default()
        };
        Self::start_with(webhook, topology).await
    }

    async fn start_with(webhook: Option<&str>, topology: Topology) -> Self {
        let nats = NatsServer::start().await.unwrap();
        let s3 = S3Server::start(webhook).await.unwrap();
        let s3_client = s3.client().await;
        darkroom_shared::s3::ensure_bucket(&s3_client, BUCKET)
            .await
            .unwrap();
        let js = nats.jetstream().await.unwrap();
        topology.ensure(&js).await.unwrap();
        Stack {
            nats,
            s3,
            s3_client,
            js,
            topology,
        }
    }

    fn runtime(&self, s3_endpoint: String) -> RuntimeConfig {
        RuntimeConfig {
            nats_url: self.nats.url(),
            s3_endpoint: Some(s3_endpoint),
            s3_access_key_id: Some(self.s3.access_key().to_owned()),
            s3_secret_access_key: Some(self.s3.secret_key().to_owned()),
            bucket: BUCKET.to_owned(),
            ..RuntimeConfig::default()
        }
    }

    fn config(&self) -> PreprocessConfig {
        PreprocessConfig {
            runtime: self.runtime(self.s3.endpoint()),
            ..PreprocessConfig::default()
        }
    }

    async fn handler(&self, config: PreprocessConfig) -> PreprocessHandler {
        let s3 = darkroom_shared::s3::client(&config.runtime).await;
        let presets = config.presets().unwrap();
        PreprocessHandler::new(
            s3,
            Publisher::new(self.js.clone(), SOURCE),
            JobStore::open(&self.js).await.unwrap(),
            presets,
            config,
        )
    }

    /// The handler on the shared consumer loop, retrying quickly.
    async fn spawn(&self, config: PreprocessConfig) -> Running {
        let handler = Arc::new(self.handler(config).await);
        let publisher = handler.publisher().clone();
        let mut settings = ConsumerSettings::new(
            &self.topology,
            subjects::UPLOADS_STREAM,
            subjects::consumers::PREPROCESS,
        );
        settings.fetch_expires = Duration::from_millis(500);
        settings.retry_backoff = vec![Duration::from_millis(300)];
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                consumer::run(handler, publisher, settings, shutdown)
                    .await
                    .unwrap();
            }
        });
        Running { shutdown, task }
    }

    async fn put(&self, key: &str, body: Vec<u8>) -> ObjectRef {
        darkroom_tests::put_object(&self.s3_client, BUCKET, key, body).await
    }

    /// Publishes the object's S3 record on the uploads stream, as a new message every time
    /// (no `Nats-Msg-Id`), the way a re-sent S3 notification arrives.
    async fn announce(&self, object: &ObjectRef) {
        darkroom_tests::announce_upload(&self.js, object).await;
    }

    /// Every message in `stream`, oldest first, without consuming any.
    async fn messages(&self, stream: &str) -> Vec<jetstream::message::StreamMessage> {
        darkroom_tests::stream_messages(&self.js, stream).await
    }

    async fn inference_jobs(&self) -> Vec<(CloudEvent<InferenceJob>, String)> {
        self.messages(subjects::JOBS_STREAM)
            .await
            .into_iter()
            .map(|m| {
                let msg_id = m
                    .headers
                    .get(headers::MSG_ID)
                    .map(|v| v.as_str().to_owned())
                    .unwrap_or_default();
                (CloudEvent::from_json(&m.payload).unwrap(), msg_id)
            })
            .collect()
    }

    async fn lifecycle(&self, job: JobId, kind: &str) -> Vec<Bytes> {
        let subject = format!("darkroom.events.{job}.{kind}");
        self.messages(subjects::EVENTS_STREAM)
            .await
            .into_iter()
            .filter(|m| m.subject.as_str() == subject)
            .map(|m| m.payload)
            .collect()
    }

    async fn failed(&self, job: JobId) -> JobFailed {
        let events = wait_for(|| self.lifecycle(job, "failed"), |e| !e.is_empty()).await;
        assert_eq!(events.len(), 1);
        CloudEvent::<JobFailed>::from_json(&events[0]).unwrap().data
    }

    async fn status(&self, job: JobId) -> Option<JobStatus> {
        let store = JobStore::open(&self.js).await.unwrap();
        store
            .get(job)
            .await
            .unwrap()
            .map(|(record, _)| record.status)
    }

    async fn keys_under(&self, prefix: &str) -> Vec<String> {
        let listed = self
            .s3_client
            .list_objects_v2()
            .bucket(BUCKET)
            .prefix(prefix)
            .send()
            .await
            .unwrap();
        listed
            .contents()
            .iter()
            .filter_map(|o| o.key().map(str::to_owned))
            .collect()
    }

    async fn get(&self, key: &str) -> Vec<u8> {
        let object = self
            .s3_client
            .get_object()
            .bucket(BUCKET)
            .key(key)
            .send()
            .await
            .unwrap();
        object.body.collect().await.unwrap().to_vec()
    }

    async fn consumer_info(&self) -> jetstream::consumer::Info {
        let stream = self.js.get_stream(subjects::UPLOADS_STREAM).await.unwrap();
        let mut consumer: jetstream::consumer::PullConsumer = stream
            .get_consumer(subjects::consumers::PREPROCESS)
            .await
            .unwrap();
        consumer.info().await.unwrap().clone()
    }
}

/// Polls `probe` until `done` holds (or panics after [`WAIT`]).
async fn wait_for<T, F, Fut>(probe: F, done: impl Fn(&T) -> bool) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    darkroom_tests::wait_for(WAIT, probe, done).await
}

/// Checks what a queued job left behind: the job, `queued`, the files, the record.
async fn assert_queued(stack: &Stack, object: &ObjectRef) -> InferenceJob {
    let job_id = object.job_id().unwrap();
    let jobs = wait_for(|| stack.inference_jobs(), |jobs| !jobs.is_empty()).await;
    assert_eq!(jobs.len(), 1);
    let (event, msg_id) = &jobs[0];
    let job = event.data.clone();
    assert_eq!(job.job_id, job_id);
    assert_eq!(msg_id, &job_id.to_string());
    assert_eq!(event.source, SOURCE);
    assert_eq!(job.source.key, object.key);
    assert_eq!(job.preset, "desk-setup");
    assert_eq!((job.width, job.height), (1152, 896));

    let queued = wait_for(|| stack.lifecycle(job_id, "queued"), |q| !q.is_empty()).await;
    assert_eq!(queued.len(), 1);
    let queued = CloudEvent::<JobQueued>::from_json(&queued[0]).unwrap().data;
    assert_eq!(queued.preset, "desk-setup");

    let input = stack.get(&job.init_image_key).await;
    assert_eq!(
        darkroom_test_support::png_chunks(&input),
        ["IHDR", "IDAT", "IEND"],
        "metadata-free"
    );
    let decoded = image::load_from_memory(&input).unwrap();
    assert_eq!((decoded.width(), decoded.height()), (1152, 896));
    assert_eq!(job.control_images.len(), 1);
    let canny = stack.get(&job.control_images[0].key).await;
    assert_eq!(
        darkroom_test_support::png_chunks(&canny),
        ["IHDR", "IDAT", "IEND"]
    );

    let status = wait_for(|| stack.status(job_id), |s| *s == Some(JobStatus::Queued)).await;
    assert_eq!(status, Some(JobStatus::Queued));
    job
}

#[tokio::test]
async fn an_upload_through_ingest_becomes_one_queued_job() {
    // SeaweedFS posts its webhook to ingest, which relays S3 records to the uploads stream.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let ingest_addr = listener.local_addr().unwrap();
    drop(listener);
    let stack = Stack::start(Some(&format!("http://{ingest_addr}/v1/events/seaweedfs"))).await;
    let ingest_shutdown = CancellationToken::new();
    let ingest = tokio::spawn(darkroom_ingest::serve(
        darkroom_ingest::IngestConfig {
            runtime: stack.config().runtime,
            ingest_listen: ingest_addr,
            ingest_reconcile_interval_secs: 0,
            ..darkroom_ingest::IngestConfig::default()
        },
        tokio::net::TcpListener::bind(ingest_addr).await.unwrap(),
        ingest_shutdown.clone(),
    ));
    let preprocess = stack.spawn(stack.config()).await;

    let object = stack
        .put("inbox/desk-setup/desk photo.jpg", photo_jpeg())
        .await;
    let job = assert_queued(&stack, &object).await;
    assert_eq!(job.source.etag, object.etag);

    preprocess.stop().await;
    ingest_shutdown.cancel();
    let _ = ingest.await;
}

#[tokio::test]
async fn a_redelivered_upload_makes_one_job_and_a_half_done_one_completes() {
    let stack = Stack::start(None).await;
    let preprocess = stack.spawn(stack.config()).await;
    let object = stack.put("inbox/desk-setup/twice.jpg", photo_jpeg()).await;
    let job_id = object.job_id().unwrap();

    stack.announce(&object).await;
    let job = assert_queued(&stack, &object).await;
    // The same event again, after the job is queued: nothing new.
    stack.announce(&object).await;
    wait_for(
        || stack.consumer_info(),
        |info| info.delivered.consumer_sequence == 2 && info.num_ack_pending == 0,
    )
    .await;
    assert_eq!(stack.inference_jobs().await.len(), 1);
    assert_eq!(stack.lifecycle(job_id, "queued").await.len(), 1);

    // A worker that died after publishing but before recording the job, and before the
    // control map was stored: the next delivery finishes the work without a second job.
    let store = JobStore::open(&stack.js).await.unwrap();
    let (mut record, revision) = store.get(job_id).await.unwrap().unwrap();
    record.status = JobStatus::Received;
    assert!(store.update(&record, revision).await.unwrap());
    stack
        .s3_client
        .delete_object()
        .bucket(BUCKET)
        .key(&job.control_images[0].key)
        .send()
        .await
        .unwrap();
    stack.announce(&object).await;
    wait_for(|| stack.status(job_id), |s| *s == Some(JobStatus::Queued)).await;
    assert_eq!(
        darkroom_test_support::png_chunks(&stack.get(&job.control_images[0].key).await),
        ["IHDR", "IDAT", "IEND"]
    );
    assert_eq!(
        stack.inference_jobs().await.len(),
        1,
        "the stream dropped the repeat"
    );
    assert_eq!(stack.lifecycle(job_id, "queued").await.len(), 1);
    preprocess.stop().await;
}

#[tokio::test]
async fn past_the_duplicate_window_the_job_record_stops_a_second_job() {
    let topology = Topology {
        duplicate_window: Duration::from_secs(1),
        ..Topology::default()
    };
    let stack = Stack::start_with(None, topology).await;
    let preprocess = stack.spawn(stack.config()).await;
    let object = stack.put("inbox/desk-setup/late.jpg", photo_jpeg()).await;
    stack.announce(&object).await;
    let job = assert_queued(&stack, &object).await;
    let written = |stack: &Stack| {
        let key = job.init_image_key.clone();
        let s3 = stack.s3_client.clone();
        async move {
            let head = s3
                .head_object()
                .bucket(BUCKET)
                .key(key)
                .send()
                .await
                .unwrap();
            head.last_modified().copied()
        }
    };
    let first_write = written(&stack).await;

    // JetStream would no longer drop a repeated job: only the record can.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stack.announce(&object).await;
    wait_for(
        || stack.consumer_info(),
        |info| info.delivered.consumer_sequence == 2 && info.num_ack_pending == 0,
    )
    .await;
    assert_eq!(stack.inference_jobs().await.len(), 1);
    assert_eq!(
        stack
            .lifecycle(object.job_id().unwrap(), "queued")
            .await
            .len(),
        1
    );
    assert_eq!(written(&stack).await, first_write, "nothing was redone");
    preprocess.stop().await;
}

#[tokio::test]
async fn an_svg_named_jpg_fails_once_with_unsupported_format() {
    let stack = Stack::start(None).await;
    let preprocess = stack.spawn(stack.config()).await;
    let object = stack.put("inbox/desk-setup/evil.jpg", SVG.to_vec()).await;
    let job_id = object.job_id().unwrap();
    stack.announce(&object).await;

    let failed = stack.failed(job_id).await;
    assert_eq!(
        serde_json::to_value(failed.reason).unwrap(),
        "unsupported_format"
    );
    assert_eq!(failed.stage, darkroom_events::Stage::Preprocess);
    assert_eq!(failed.attempts, 1);
    assert_eq!(
        failed.source.as_ref().map(|s| s.key.as_str()),
        Some(object.key.as_str())
    );

    // Terminated, not redelivered: one delivery, nothing pending, one dead letter.
    let info = wait_for(|| stack.consumer_info(), |i| i.num_ack_pending == 0).await;
    assert_eq!(info.delivered.consumer_sequence, 1);
    assert_eq!(info.num_redelivered, 0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(stack.consumer_info().await.delivered.consumer_sequence, 1);
    let dead = stack.messages(subjects::DLQ_STREAM).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0].headers.get(headers::DLQ_REASON).map(|v| v.as_str()),
        Some("unsupported_format")
    );

    assert!(stack.keys_under("work/").await.is_empty());
    assert!(stack.inference_jobs().await.is_empty());
    assert_eq!(stack.status(job_id).await, Some(JobStatus::Failed));
    preprocess.stop().await;
}

#[tokio::test]
async fn an_over_limit_object_is_refused_without_downloading_it() {
    let stack = Stack::start(None).await;
    let relay = S3Relay::start(stack.s3.s3_port()).await;
    let config = PreprocessConfig {
        runtime: stack.runtime(relay.endpoint()),
        preprocess_max_bytes: 256 * 1024,
        ..PreprocessConfig::default()
    };
    let preprocess = stack.spawn(config.clone()).await;
    let huge = 8 << 20;
    let object = stack
        .put("inbox/desk-setup/huge.jpg", vec![0xFF; huge])
        .await;
    stack.announce(&object).await;

    let failed = stack.failed(object.job_id().unwrap()).await;
    assert_eq!(
        serde_json::to_value(failed.reason).unwrap(),
        "limit_exceeded"
    );
    assert!(
        failed.message.contains("262144-byte limit"),
        "{}",
        failed.message
    );
    let served = relay.from_server.load(Ordering::SeqCst);
    // Measured: a few hundred bytes (the HEAD's response headers).
    assert!(
        served < 4 * 1024,
        "S3 sent {served} bytes of an {huge}-byte object"
    );
    preprocess.stop().await;

    // The GET itself stops at the cap when the HEAD said less (the object changed between).
    let s3 = darkroom_shared::s3::client(&config.runtime).await;
    let before = relay.from_server.load(Ordering::SeqCst);
    let error = fetch::get_capped(&s3, &object, None, 256 * 1024)
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            FetchError::TooLarge {
                from_head: false,
                ..
            }
        ),
        "{error:?}"
    );
    let served = relay.from_server.load(Ordering::SeqCst) - before;
    // Measured: about 100 KB of the 8 MiB, what the sockets held when the read stopped.
    assert!(served < huge as u64 / 8, "S3 sent {served} of {huge} bytes");
}

#[tokio::test]
async fn a_missing_object_fails_with_object_not_found() {
    let stack = Stack::start(None).await;
    let preprocess = stack.spawn(stack.config()).await;
    let object = ObjectRef {
        etag: Some("0123456789abcdef0123456789abcdef".to_owned()),
        size: Some(1000),
        ..ObjectRef::new(BUCKET, "inbox/desk-setup/deleted.jpg")
    };
    stack.announce(&object).await;
    let failed = stack.failed(object.job_id().unwrap()).await;
    assert_eq!(
        serde_json::to_value(failed.reason).unwrap(),
        "object_not_found"
    );
    preprocess.stop().await;
}

#[tokio::test]
async fn s3_trouble_is_retried_until_it_clears() {
    let stack = Stack::start(None).await;
    let relay = S3Relay::start(stack.s3.s3_port()).await;
    let preprocess = stack
        .spawn(PreprocessConfig {
            runtime: stack.runtime(relay.endpoint()),
            ..stack.config()
        })
        .await;
    let object = stack.put("inbox/desk-setup/later.jpg", photo_jpeg()).await;
    let job_id = object.job_id().unwrap();
    relay.down.store(true, Ordering::SeqCst);
    stack.announce(&object).await;
    // Redelivered while S3 refuses connections, and never failed.
    wait_for(|| stack.consumer_info(), |i| i.num_redelivered > 0).await;
    assert!(stack.lifecycle(job_id, "failed").await.is_empty());
    relay.down.store(false, Ordering::SeqCst);
    assert_queued(&stack, &object).await;
    assert!(stack.lifecycle(job_id, "failed").await.is_empty());
    preprocess.stop().await;
}

/// The AWS S3 put fixture of the events crate, pointed at `object`.
fn aws_s3_event(object: &ObjectRef) -> Value {
    let path = darkroom_tests::repo_root().join("events/tests/fixtures/s3_aws_put.json");
    let mut event: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let s3 = &mut event["Records"][0]["s3"];
    s3["bucket"]["name"] = json!(object.bucket);
    s3["bucket"]["arn"] = json!(format!("arn:aws:s3:::{}", object.bucket));
    s3["object"]["key"] = json!(encode_key(&object.key));
    s3["object"]["eTag"] = json!(object.etag);
    s3["object"]["size"] = json!(object.size);
    // SeaweedFS buckets here are not versioned.
    s3["object"].as_object_mut().unwrap().remove("versionId");
    event
}

#[tokio::test]
async fn the_lambda_adapter_runs_the_handler_on_s3_and_sqs_events() {
    let stack = Stack::start(None).await;
    let handler = stack.handler(stack.config()).await;
    let publisher = handler.publisher().clone();

    // S3 → Lambda: no ingest, so no job record until preprocess writes one.
    let object = stack.put("inbox/desk-setup/lambda.jpg", photo_jpeg()).await;
    assert_eq!(stack.status(object.job_id().unwrap()).await, None);
    let response =
        darkroom_shared::lambda::invoke(&handler, Some(&publisher), aws_s3_event(&object))
            .await
            .unwrap();
    assert_eq!(response, json!({"status": "ok"}));
    assert_queued(&stack, &object).await;

    // A refused upload succeeds the invocation (no Lambda retry) and reports `failed`.
    let svg = stack
        .put("inbox/desk-setup/lambda.svg.jpg", SVG.to_vec())
        .await;
    let response = darkroom_shared::lambda::invoke(&handler, Some(&publisher), aws_s3_event(&svg))
        .await
        .unwrap();
    assert_eq!(response["status"], "failed");
    assert_eq!(response["reason"], "unsupported_format");
    stack.failed(svg.job_id().unwrap()).await;

    // S3 → SQS → Lambda: the same event as a record body; the job already exists.
    let sqs = json!({"Records": [{
        "eventSource": "aws:sqs",
        "messageId": "0f1e2d3c-0000-4000-8000-000000000001",
        "body": aws_s3_event(&object).to_string(),
        "attributes": {"ApproximateReceiveCount": "1"}
    }]});
    let response = darkroom_shared::lambda::invoke(&handler, Some(&publisher), sqs)
        .await
        .unwrap();
    assert_eq!(response, json!({"batchItemFailures": []}));
    assert_eq!(stack.inference_jobs().await.len(), 1);
}

const LAMBDA_CHILD_ENV: &str = "DARKROOM_TEST_LAMBDA_CHILD";

#[tokio::test]
async fn lambda_runtime_serves_the_handler() {
    let stack = Stack::start(None).await;
    let object = stack
        .put("inbox/desk-setup/runtime.jpg", photo_jpeg())
        .await;
    let api = Arc::new(RuntimeApi::default());
    *api.event.lock().unwrap() = Some(aws_s3_event(&object));
    let (addr, server) = RuntimeApi::serve(api.clone(), "darkroom-preprocess").await;

    // This test binary again, running only `lambda_child`, which serves the handler with
    // `darkroom-preprocess lambda`'s code under the Lambda environment set here.
    let config = stack.config();
    let mut child = RuntimeApi::child_command(addr, "darkroom-preprocess", 1024, LAMBDA_CHILD_ENV)
        .env("DARKROOM_NATS_URL", &config.runtime.nats_url)
        .env("DARKROOM_S3_ENDPOINT", stack.s3.endpoint())
        .env("DARKROOM_S3_ACCESS_KEY_ID", stack.s3.access_key())
        .env("DARKROOM_S3_SECRET_ACCESS_KEY", stack.s3.secret_key())
        .env("DARKROOM_BUCKET", BUCKET)
        .spawn()
        .unwrap();
    api.assert_answered_ok(WAIT).await;
    assert_queued(&stack, &object).await;
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
    let config: PreprocessConfig = darkroom_shared::config::load().unwrap();
    darkroom_preprocess::service::lambda(config).await.unwrap();
}
