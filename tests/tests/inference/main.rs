//! The whole pipeline against real servers: S3 upload events on a real nats-server, objects in a
//! real SeaweedFS, preprocess and the notifier on the shared consumer loop, and the inference
//! worker as a real child process (`darkroom-inference`) rendering with the tiny random-weight
//! studio of `functions/inference/reference/tiny_studio.py` on the CPU.
//!
//! Scenarios: one upload announced three times → one job, one stored picture without metadata,
//! one `completed`, one webhook; a worker SIGKILLed mid-job → the job is redelivered to the next
//! worker, which renders for longer than AckWait without being redelivered again, and completes
//! once; a poison job (its preset's LoRA file is broken) → dead-lettered with its reason while
//! the next job flows, and `darkroom replay-dlq` brings it back once the file is fixed; a preset
//! naming a file no running worker has → refused at upload time; a cancel message → `failed`
//! with reason `cancelled`; a drain request (a preStop hook) → the job in hand finishes, then the
//! worker exits.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use async_nats::jetstream;
use darkroom_events::subjects::{self, headers};
use darkroom_events::{
    CloudEvent, FailureReason, JobCompleted, JobFailed, JobId, JobProgress, JobStarted, ObjectRef,
};
use darkroom_notifier::config::NotifierConfig;
use darkroom_preprocess::config::PreprocessConfig;
use darkroom_shared::RuntimeConfig;
use darkroom_shared::jobs::{JobStatus, JobStore};
use darkroom_shared::topology::Topology;
use darkroom_tests::webhook::Receiver;
use darkroom_tests::{NatsServer, S3Server};
use image::{Rgb, RgbImage};
use tokio_util::sync::CancellationToken;

mod fleet;
mod metrics;

const BUCKET: &str = "photos";
const WAIT: Duration = Duration::from_secs(120);
/// Short, so a dead worker's job comes back quickly and a long render outlasts it many times.
const ACK_WAIT_SECS: u64 = 2;
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// Presets for the tiny model: small fixed sizes so a CPU renders in seconds.
const PRESETS: [(&str, &str); 5] = [
    (
        "tiny-desk",
        r#"name = "tiny-desk"
prompt = "a tidy desk, {subject}"
negative_prompt = "clutter"
steps = 8
guidance = 5.0
scheduler = "euler"
strength = 0.5
resolution = { width = 256, height = 256 }

[[controlnets]]
kind = "canny"
model = "controlnet-canny-sdxl-1.0"
scale = 0.5
start = 0.0
end = 1.0

[tone]
temperature_k = 5200
tint = 0.0
strength = 1.0
"#,
    ),
    (
        "tiny-slow",
        r#"name = "tiny-slow"
prompt = "a long exposure of {subject}"
steps = 60
guidance = 5.0
scheduler = "euler-a"
resolution = { width = 512, height = 512 }
"#,
    ),
    (
        "tiny-fleet",
        r#"name = "tiny-fleet"
prompt = "a portrait of {subject}"
steps = 24
guidance = 5.0
scheduler = "euler-a"
resolution = { width = 384, height = 384 }
"#,
    ),
    (
        "tiny-posed",
        r#"name = "tiny-posed"
prompt = "a diorama of {subject}"
steps = 4
guidance = 5.0
scheduler = "euler"
strength = 0.6
resolution = { width = 256, height = 256 }

[[controlnets]]
kind = "depth"
model = "controlnet-depth-sdxl-1.0"
scale = 0.7

[[controlnets]]
kind = "pose"
model = "controlnet-openpose-sdxl-1.0"
scale = 0.8
"#,
    ),
    (
        "tiny-style",
        r#"name = "tiny-style"
prompt = "a storybook page, {subject}"
steps = 4
guidance = 5.0
scheduler = "ddim"
strength = 0.6
resolution = { width = 256, height = 256 }

[[loras]]
name = "house-style.safetensors"
weight = 0.8
"#,
    ),
];

/// A photo-like JPEG without a face.
fn photo_jpeg(seed: u8) -> Vec<u8> {
    let image = RgbImage::from_fn(320, 240, |x, y| {
        let v = if (x / 40 + y / 40) % 2 == 0 { 200 } else { 40 };
        Rgb([v, (x as u8).wrapping_add(seed), (y % 256) as u8])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    image.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
    out.into_inner()
}

/// A task on the shared consumer loop (preprocess or the notifier), stopped on drop.
struct Running {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.task.abort();
    }
}

/// The worker as a child process.
struct Worker {
    child: tokio::process::Child,
    log: PathBuf,
    health_port: u16,
}

impl Worker {
    /// The status `/readyz` answers.
    async fn readyz(&self) -> u16 {
        reqwest::get(format!("http://127.0.0.1:{}/readyz", self.health_port))
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn wait_until_consuming(&mut self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !self.log().contains("consuming") {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the worker exited ({status}):\n{}", self.log());
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the worker did not start:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

struct Stack {
    nats: NatsServer,
    s3: S3Server,
    s3_client: aws_sdk_s3::Client,
    js: jetstream::Context,
    topology: Topology,
    dir: tempfile::TempDir,
    studio: PathBuf,
    receiver: Receiver,
    _services: Vec<Running>,
}

impl Stack {
    /// Servers, the topology with a short AckWait, preprocess and the notifier (one webhook
    /// endpoint for `completed` and `failed`).
    async fn start() -> Self {
        Self::start_with_webhook_replies(Vec::new()).await
    }

    /// [`Stack::start`] with the webhook receiver answering from `replies` first.
    async fn start_with_webhook_replies(replies: Vec<darkroom_tests::webhook::Reply>) -> Self {
        let studio = darkroom_test_support::tiny_studio();
        let topology = Topology {
            ack_wait: Duration::from_secs(ACK_WAIT_SECS),
            ..Topology::default()
        };
        let nats = NatsServer::start().await.unwrap();
        let s3 = S3Server::start(None).await.unwrap();
        let s3_client = s3.client().await;
        darkroom_shared::s3::ensure_bucket(&s3_client, BUCKET)
            .await
            .unwrap();
        let js = nats.jetstream().await.unwrap();
        topology.ensure(&js).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let presets = dir.path().join("presets");
        std::fs::create_dir(&presets).unwrap();
        for (name, text) in PRESETS {
            std::fs::write(presets.join(format!("{name}.toml")), text).unwrap();
        }
        let loras = dir.path().join("loras");
        std::fs::create_dir(&loras).unwrap();
        let receiver = Receiver::start(replies).await;
        let mut stack = Stack {
            nats,
            s3,
            s3_client,
            js,
            topology,
            dir,
            studio,
            receiver,
            _services: Vec::new(),
        };
        let preprocess = stack.preprocess(presets).await;
        let notifier = stack.notifier();
        stack._services = vec![preprocess, notifier];
        stack
    }

    fn runtime(&self) -> RuntimeConfig {
        RuntimeConfig {
            nats_url: self.nats.url(),
            s3_endpoint: Some(self.s3.endpoint()),
            s3_access_key_id: Some(self.s3.access_key().to_owned()),
            s3_secret_access_key: Some(self.s3.secret_key().to_owned()),
            bucket: BUCKET.to_owned(),
            ack_wait_secs: ACK_WAIT_SECS as f64,
            ..RuntimeConfig::default()
        }
    }

    async fn preprocess(&self, presets: PathBuf) -> Running {
        let config = PreprocessConfig {
            runtime: self.runtime(),
            preprocess_preset_dir: Some(presets),
            ..PreprocessConfig::default()
        };
        let (shutdown, task) =
            darkroom_tests::spawn_preprocess(&self.js, &self.topology, config).await;
        Running { shutdown, task }
    }

    fn notifier(&self) -> Running {
        let endpoints = self.dir.path().join("endpoints.toml");
        std::fs::write(
            &endpoints,
            format!(
                "[[endpoints]]\nid = \"studio\"\nurl = \"{}\"\nsecrets = [\"{SECRET}\"]\nallow_networks = [\"loopback\"]\n",
                self.receiver.url()
            ),
        )
        .unwrap();
        let config = NotifierConfig {
            runtime: self.runtime(),
            notifier_endpoints_file: Some(endpoints),
            notifier_backoff_base_ms: 50,
            notifier_backoff_max_ms: 200,
            ..NotifierConfig::default()
        };
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

    /// Starts a worker named `name` on the tiny studio, with LoRAs from the stack's own folder.
    async fn worker(&self, name: &str) -> Worker {
        self.worker_with(name, true).await
    }

    /// A worker, with the tiny studio's depth and pose models (`DARKROOM_DEPTH_MODEL`,
    /// `DARKROOM_POSE_MODEL`) or without.
    async fn worker_with(&self, name: &str, estimators: bool) -> Worker {
        let mut worker = self.spawn_worker(name, estimators, &[]);
        worker.wait_until_consuming().await;
        worker
    }

    /// Starts a worker with these extra variables (a test fault, a short watchdog) and does
    /// not wait for it.
    fn spawn_worker(&self, name: &str, estimators: bool, env: &[(&str, &str)]) -> Worker {
        let log = self.dir.path().join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let health_port = darkroom_tests::reserve_port().unwrap();
        let mut command =
            darkroom_tests::clean_command(env!("CARGO_BIN_EXE_darkroom-inference-worker"));
        command
            .env("DARKROOM_NATS_URL", self.nats.url())
            .env("DARKROOM_S3_ENDPOINT", self.s3.endpoint())
            .env("DARKROOM_S3_ACCESS_KEY_ID", self.s3.access_key())
            .env("DARKROOM_S3_SECRET_ACCESS_KEY", self.s3.secret_key())
            .env("DARKROOM_BUCKET", BUCKET)
            .env("DARKROOM_ACK_WAIT_SECS", ACK_WAIT_SECS.to_string())
            .env("DARKROOM_MODEL", self.studio.join("model"))
            .env("DARKROOM_CONTROLNET_DIR", self.studio.join("controlnets"))
            .env("DARKROOM_LORA_DIR", self.dir.path().join("loras"))
            .env("DARKROOM_DEVICE", "cpu")
            .env("DARKROOM_WORKER_NAME", name)
            .envs(estimators.then(|| ("DARKROOM_DEPTH_MODEL", self.studio.join("depth"))))
            .envs(estimators.then(|| ("DARKROOM_POSE_MODEL", self.studio.join("pose"))))
            .env("DARKROOM_PROGRESS_INTERVAL_MS", "100")
            .env("DARKROOM_HEALTH_ADDR", format!("127.0.0.1:{health_port}"))
            // A drained worker finishes its job however slow this shared machine is.
            .env("DARKROOM_SHUTDOWN_GRACE_SECS", "300")
            .env("RUST_LOG", "info,async_nats=warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(file)
            .kill_on_drop(true);
        Worker {
            child: command.spawn().unwrap(),
            log,
            health_port,
        }
    }

    /// Uploads a photo to `inbox/<preset>/<name>`.
    async fn upload(&self, preset: &str, name: &str, seed: u8) -> ObjectRef {
        let key = format!("inbox/{preset}/{name}");
        darkroom_tests::put_object(&self.s3_client, BUCKET, &key, photo_jpeg(seed)).await
    }

    /// Publishes the object's S3 record on the uploads stream, a new message every time.
    async fn announce(&self, object: &ObjectRef) {
        darkroom_tests::announce_upload(&self.js, object).await;
    }

    /// The payloads of a job's lifecycle events of one kind, oldest first.
    async fn events(&self, job: JobId, kind: &str) -> Vec<bytes::Bytes> {
        let subject = format!("darkroom.events.{job}.{kind}");
        darkroom_tests::stream_messages(&self.js, subjects::EVENTS_STREAM)
            .await
            .into_iter()
            .filter(|m| m.subject.as_str() == subject)
            .map(|m| m.payload)
            .collect()
    }

    async fn wait_for_event(&self, job: JobId, kind: &str) -> Vec<bytes::Bytes> {
        darkroom_tests::wait_for(WAIT, || self.events(job, kind), |e| !e.is_empty()).await
    }

    async fn completed(&self, job: JobId) -> JobCompleted {
        let events = self.wait_for_event(job, "completed").await;
        CloudEvent::<JobCompleted>::from_json(&events[0])
            .unwrap()
            .data
    }

    async fn failed(&self, job: JobId) -> JobFailed {
        let events = self.wait_for_event(job, "failed").await;
        CloudEvent::<JobFailed>::from_json(&events[0]).unwrap().data
    }

    async fn started(&self, job: JobId) -> Vec<JobStarted> {
        self.events(job, "started")
            .await
            .iter()
            .map(|e| CloudEvent::<JobStarted>::from_json(e).unwrap().data)
            .collect()
    }

    async fn object(&self, key: &str) -> Option<Vec<u8>> {
        let response = self
            .s3_client
            .get_object()
            .bucket(BUCKET)
            .key(key)
            .send()
            .await
            .ok()?;
        Some(response.body.collect().await.unwrap().to_vec())
    }

    /// The live workers' inventories (KV `darkroom_workers`).
    async fn live_workers(&self) -> Vec<darkroom_shared::workers::WorkerInventory> {
        darkroom_shared::workers::WorkerRegistry::open(&self.js)
            .await
            .unwrap()
            .live()
            .await
            .unwrap()
    }

    async fn status(&self, job: JobId) -> Option<JobStatus> {
        let store = JobStore::open(&self.js).await.unwrap();
        store
            .get(job)
            .await
            .unwrap()
            .map(|(record, _)| record.status)
    }

    /// `darkroom replay-dlq --job <job>`, which must succeed.
    async fn replay_dlq(&self, job: JobId) {
        let replay = tokio::process::Command::new(env!("CARGO_BIN_EXE_darkroom-cli"))
            .args(["replay-dlq", "--job", &job.to_string()])
            .env("DARKROOM_NATS_URL", self.nats.url())
            .env("DARKROOM_BUCKET", BUCKET)
            .output()
            .await
            .unwrap();
        assert!(
            replay.status.success(),
            "{}",
            String::from_utf8_lossy(&replay.stderr)
        );
    }

    /// Webhook deliveries of `kind` for `job`, as the receiver got them.
    fn webhooks(&self, job: JobId, kind: &str) -> Vec<darkroom_tests::webhook::Received> {
        self.receiver
            .received()
            .into_iter()
            .filter(|r| {
                let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
                body["subject"] == job.to_string()
                    && body["type"]
                        .as_str()
                        .unwrap()
                        .contains(&format!(".{kind}."))
            })
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_announced_three_times_becomes_one_picture_one_event_and_one_webhook() {
    let stack = Stack::start().await;
    let worker = stack.worker("gpu-a").await;
    assert_eq!(worker.readyz().await, 200, "ready once the model is loaded");
    let object = stack.upload("tiny-desk", "desk.jpg", 1).await;
    let job = object.job_id().unwrap();
    for _ in 0..3 {
        stack.announce(&object).await;
    }

    let completed = stack.completed(job).await;
    assert_eq!(completed.preset, "tiny-desk");
    assert_eq!(completed.worker, "gpu-a");
    assert_eq!(completed.attempt, 1);
    assert_eq!(completed.source.key, object.key);
    assert_eq!(completed.result.key, format!("outputs/{job}/result.png"));
    assert_eq!(completed.controlnets.len(), 1);
    assert_eq!(completed.controlnets[0].sha256.len(), 64);
    assert_eq!(completed.model.sha256.len(), 64);
    assert!(completed.timings.denoise_ms > 0);

    let png = stack.object(&completed.result.key).await.unwrap();
    assert_eq!(
        darkroom_test_support::png_chunks(&png),
        ["IHDR", "IDAT", "IEND"],
        "no metadata chunks"
    );
    let picture = image::load_from_memory(&png).unwrap().to_rgb8();
    assert_eq!(picture.dimensions(), (256, 256));
    let record: serde_json::Value =
        serde_json::from_slice(&stack.object(&completed.metadata.key).await.unwrap()).unwrap();
    assert_eq!(record["job"]["job_id"], job.to_string());
    assert_eq!(record["completed"]["seed"], completed.seed);

    // Give the duplicates every chance to show, then count.
    darkroom_tests::wait_for(
        WAIT,
        || async { stack.webhooks(job, "completed") },
        |w| !w.is_empty(),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(stack.events(job, "completed").await.len(), 1);
    assert_eq!(stack.started(job).await.len(), 1);
    let jobs = darkroom_tests::stream_messages(&stack.js, subjects::JOBS_STREAM).await;
    assert!(jobs.is_empty(), "the work queue is drained");
    assert_eq!(stack.webhooks(job, "completed").len(), 1);
    assert_eq!(stack.status(job).await, Some(JobStatus::Completed));
    let progress = stack.events(job, "progress").await;
    assert!(!progress.is_empty());
    let last = CloudEvent::<JobProgress>::from_json(progress.last().unwrap())
        .unwrap()
        .data;
    assert!(last.step <= last.total_steps && last.total_steps == 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_job_completes_once_on_the_next_worker() {
    // The webhook's first attempt fails: its retry must carry the same webhook-id.
    let stack = Stack::start_with_webhook_replies(vec![darkroom_tests::webhook::status(500)]).await;
    let mut first = stack.worker("gpu-a").await;
    let object = stack.upload("tiny-slow", "night.jpg", 2).await;
    let job = object.job_id().unwrap();
    stack.announce(&object).await;

    // Mid-job: after a few steps.
    darkroom_tests::wait_for(WAIT, || stack.events(job, "progress"), |p| p.len() >= 2).await;
    first.child.start_kill().unwrap();
    first.child.wait().await.unwrap();
    assert!(stack.events(job, "completed").await.is_empty());

    let _second = stack.worker("gpu-b").await;
    let completed = stack.completed(job).await;
    assert_eq!(completed.worker, "gpu-b");
    assert_eq!(completed.attempt, 2);
    // The second render took several AckWaits and was never redelivered meanwhile.
    assert!(
        completed.inference_ms > 2 * ACK_WAIT_SECS * 1000,
        "render took {} ms",
        completed.inference_ms
    );
    let attempts: Vec<u32> = stack.started(job).await.iter().map(|s| s.attempt).collect();
    assert_eq!(attempts, [1, 2]);

    darkroom_tests::wait_for(
        WAIT,
        || async { stack.webhooks(job, "completed") },
        |w| w.len() >= 2,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2 * ACK_WAIT_SECS)).await;
    assert_eq!(stack.events(job, "completed").await.len(), 1);
    let webhooks = stack.webhooks(job, "completed");
    assert_eq!(webhooks.len(), 2, "a failed attempt, then one delivery");
    let ids: Vec<&str> = webhooks
        .iter()
        .map(|w| w.header("webhook-id").unwrap())
        .collect();
    assert_eq!(ids[0], ids[1], "the same webhook-id on the retry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_job_is_dead_lettered_others_flow_and_replay_brings_it_back() {
    let stack = Stack::start().await;
    // The preset's LoRA is there but is not a LoRA: only the worker can tell.
    let lora = stack.dir.path().join("loras/house-style.safetensors");
    std::fs::write(&lora, b"not a safetensors file").unwrap();
    let _worker = stack.worker("gpu-a").await;

    let poison = stack.upload("tiny-style", "page.jpg", 3).await;
    let poison_job = poison.job_id().unwrap();
    stack.announce(&poison).await;
    let good = stack.upload("tiny-desk", "desk.jpg", 4).await;
    stack.announce(&good).await;

    let failed = stack.failed(poison_job).await;
    assert_eq!(failed.reason, FailureReason::ModelError);
    assert!(
        failed.message.contains("house-style.safetensors"),
        "{}",
        failed.message
    );
    assert_eq!(stack.status(poison_job).await, Some(JobStatus::Failed));
    let letters = darkroom_tests::stream_messages(&stack.js, subjects::DLQ_STREAM).await;
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter.subject.as_str(), "darkroom.dlq.inference");
    assert_eq!(
        letter.headers.get(headers::DLQ_REASON).unwrap().as_str(),
        "model_error"
    );
    // The next job was not held up.
    stack.completed(good.job_id().unwrap()).await;

    // The operator replaces the file and replays the dead letter.
    std::fs::copy(
        stack.studio.join("loras/storybook-style.safetensors"),
        &lora,
    )
    .unwrap();
    stack.replay_dlq(poison_job).await;
    let completed = stack.completed(poison_job).await;
    assert_eq!(completed.loras.len(), 1);
    assert_eq!(completed.loras[0].name, "house-style.safetensors");
    assert_eq!(stack.status(poison_job).await, Some(JobStatus::Completed));
    assert!(
        darkroom_tests::stream_messages(&stack.js, subjects::DLQ_STREAM)
            .await
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preset_naming_a_file_no_running_worker_has_fails_at_upload() {
    let stack = Stack::start().await;
    let _worker = stack.worker("gpu-a").await;
    let object = stack.upload("tiny-style", "page.jpg", 6).await;
    let job = object.job_id().unwrap();
    stack.announce(&object).await;

    let failed = stack.failed(job).await;
    assert_eq!(failed.stage, darkroom_events::Stage::Preprocess);
    assert_eq!(failed.reason, FailureReason::ModelError);
    assert!(
        failed
            .message
            .contains("gpu-a lacks LoRA \"house-style.safetensors\""),
        "{}",
        failed.message
    );
    assert!(stack.started(job).await.is_empty());
    let jobs = darkroom_tests::stream_messages(&stack.js, subjects::JOBS_STREAM).await;
    assert!(jobs.is_empty(), "nothing was queued for the GPU");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn depth_and_pose_controlnets_get_their_maps_from_a_worker_with_the_estimators() {
    let stack = Stack::start().await;
    // Only a worker without estimators: preprocess refuses the preset at upload.
    let without = stack.worker_with("gpu-plain", false).await;
    let object = stack.upload("tiny-posed", "room.jpg", 8).await;
    let refused = object.job_id().unwrap();
    stack.announce(&object).await;
    let failed = stack.failed(refused).await;
    assert_eq!(failed.stage, darkroom_events::Stage::Preprocess);
    assert_eq!(failed.reason, FailureReason::ModelError);
    assert!(
        failed.message.contains(
            "gpu-plain lacks a depth model (DARKROOM_DEPTH_MODEL), a pose model (DARKROOM_POSE_MODEL)"
        ),
        "{}",
        failed.message
    );
    drop(without);

    // A worker with both draws the maps from the prepared input and renders.
    let _worker = stack.worker("gpu-maps").await;
    let object = stack.upload("tiny-posed", "hall.jpg", 9).await;
    let job = object.job_id().unwrap();
    darkroom_tests::wait_for(
        WAIT,
        || stack.live_workers(),
        |workers| {
            workers.iter().any(|w| {
                w.worker == "gpu-maps" && w.depth_model.is_some() && w.pose_model.is_some()
            })
        },
    )
    .await;
    // Preprocess trusts the inventories it read for 5 s.
    tokio::time::sleep(Duration::from_secs(6)).await;
    stack.announce(&object).await;
    let completed = stack.completed(job).await;
    let names: Vec<&str> = completed
        .controlnets
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        names,
        ["controlnet-depth-sdxl-1.0", "controlnet-openpose-sdxl-1.0"]
    );
    // Preprocess drew neither map: the worker drew both from the prepared input.
    assert!(
        stack
            .object(&format!("work/{job}/input.png"))
            .await
            .is_some()
    );
    for kind in ["depth", "pose"] {
        let key = format!("work/{job}/control-{kind}.png");
        assert!(stack.object(&key).await.is_none(), "{key}");
    }
    let queued = darkroom_tests::stream_messages(&stack.js, subjects::JOBS_STREAM).await;
    assert!(queued.is_empty(), "the work queue is empty once done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_message_stops_the_job_between_steps() {
    let stack = Stack::start().await;
    let worker = stack.worker("gpu-a").await;
    let object = stack.upload("tiny-slow", "stars.jpg", 5).await;
    let job = object.job_id().unwrap();
    stack.announce(&object).await;
    darkroom_tests::wait_for(WAIT, || stack.events(job, "progress"), |p| !p.is_empty()).await;
    let client = stack.nats.client().await.unwrap();
    client
        .publish(subjects::cancel_subject(job), "".into())
        .await
        .unwrap();
    client.flush().await.unwrap();

    let failed = stack.failed(job).await;
    assert_eq!(failed.reason, FailureReason::Cancelled);
    assert_eq!(failed.stage, darkroom_events::Stage::Inference);
    assert!(stack.events(job, "completed").await.is_empty());
    assert_eq!(stack.status(job).await, Some(JobStatus::Failed));
    assert!(worker.log().contains("cancel requested"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_worker_finishes_the_job_in_hand_then_stops() {
    let stack = Stack::start().await;
    let mut worker = stack.worker("gpu-a").await;
    let object = stack.upload("tiny-slow", "dusk.jpg", 7).await;
    let job = object.job_id().unwrap();
    stack.announce(&object).await;
    darkroom_tests::wait_for(WAIT, || stack.events(job, "progress"), |p| !p.is_empty()).await;

    // What a Kubernetes preStop hook does: answered only once the job in hand is settled.
    let drained = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{}/drain", worker.health_port))
        .send()
        .await
        .unwrap();
    assert_eq!(drained.status().as_u16(), 200);
    assert_eq!(stack.events(job, "completed").await.len(), 1);
    let exit = tokio::time::timeout(WAIT, worker.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit}");
    assert!(stack.events(job, "failed").await.is_empty());
}
