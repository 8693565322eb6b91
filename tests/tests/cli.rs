//! The `darkroom` CLI as a child process against a real nats-server and SeaweedFS: upload
//! (ingest's relay and preprocess in this process turn it into a queued job), `upload --wait`
//! driven by the events the notifier would republish, `watch`, `status`, `get`, presigned
//! `url` and `upload-url` (used without credentials, refused once expired) and `replay-dlq` of
//! a preprocess dead letter.
#![allow(clippy::unwrap_used)]

use std::io::Cursor;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use async_nats::jetstream;
use darkroom_events::subjects::{self, headers};
use darkroom_events::{
    CloudEvent, EventData, FailureReason, JobCompleted, JobFailed, JobId, JobProgress, JobQueued,
    JobStarted, LifecycleEvent, ModelUsed, ObjectRef, S3EventRecord, S3Notification, Stage,
    StageTimings,
};
use darkroom_ingest::relay::UploadRelay;
use darkroom_preprocess::config::PreprocessConfig;
use darkroom_shared::RuntimeConfig;
use darkroom_shared::jobs::{JobRecord, JobStatus, JobStore};
use darkroom_shared::publish::Publisher;
use darkroom_shared::topology::Topology;
use darkroom_tests::{NatsServer, S3Server, wait_for};
use image::{Rgb, RgbImage};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio_util::sync::CancellationToken;

const BUCKET: &str = "photos";
const WAIT: Duration = Duration::from_secs(15);
/// A preset without face framing, so any photo is accepted.
const PRESET: &str = "desk-setup";

struct Stack {
    nats: NatsServer,
    s3: S3Server,
    s3_client: aws_sdk_s3::Client,
    js: jetstream::Context,
    topology: Topology,
}

impl Stack {
    async fn start() -> Self {
        let (nats, s3) = tokio::join!(NatsServer::start(), S3Server::start(None));
        let (nats, s3) = (nats.unwrap(), s3.unwrap());
        let s3_client = s3.client().await;
        darkroom_shared::s3::ensure_bucket(&s3_client, BUCKET)
            .await
            .unwrap();
        let js = nats.jetstream().await.unwrap();
        let topology = Topology::default();
        topology.ensure(&js).await.unwrap();
        Stack {
            nats,
            s3,
            s3_client,
            js,
            topology,
        }
    }

    fn runtime(&self) -> RuntimeConfig {
        RuntimeConfig {
            nats_url: self.nats.url(),
            s3_endpoint: Some(self.s3.endpoint()),
            s3_access_key_id: Some(self.s3.access_key().to_owned()),
            s3_secret_access_key: Some(self.s3.secret_key().to_owned()),
            bucket: BUCKET.to_owned(),
            ..RuntimeConfig::default()
        }
    }

    /// `darkroom ARGS…` configured for this stack only through `DARKROOM_*` variables, as a
    /// user would (everything `local-dev/env.sh` exported is removed first).
    fn cli(&self, args: &[&str]) -> tokio::process::Command {
        let mut command = darkroom_tests::clean_command(env!("CARGO_BIN_EXE_darkroom-cli"));
        command
            .args(args)
            .env("DARKROOM_NATS_URL", self.nats.url())
            .env("DARKROOM_S3_ENDPOINT", self.s3.endpoint())
            .env("DARKROOM_S3_ACCESS_KEY_ID", self.s3.access_key())
            .env("DARKROOM_S3_SECRET_ACCESS_KEY", self.s3.secret_key())
            .env("DARKROOM_BUCKET", BUCKET)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    }

    /// Runs the CLI to the end: (exit code, stdout, stderr).
    async fn run_cli(&self, args: &[&str]) -> (i32, String, String) {
        let output = tokio::time::timeout(WAIT, self.cli(args).output())
            .await
            .expect("the CLI did not exit in time")
            .unwrap();
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// Preprocess on the shared consumer loop, in this process.
    async fn preprocess(&self) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        let config = PreprocessConfig {
            runtime: self.runtime(),
            ..PreprocessConfig::default()
        };
        darkroom_tests::spawn_preprocess(&self.js, &self.topology, config).await
    }

    /// A job rendered from `inbox/desk-setup/<name>`, as the pipeline leaves it: its record
    /// `completed`, its `queued` and `completed` events, `result.png` (a tiny PNG) and
    /// `job.json` (`{"a":1}`) in the bucket. Returns the job, its `completed` event and the PNG.
    async fn finished_job(&self, name: &str) -> (JobId, CloudEvent<JobCompleted>, Vec<u8>) {
        let source = ObjectRef {
            etag: Some("abc".into()),
            ..ObjectRef::new(BUCKET, format!("inbox/{PRESET}/{name}"))
        };
        let job = source.job_id().unwrap();
        let mut record = JobRecord::received(job, source.clone());
        record.status = JobStatus::Completed;
        record.preset = Some(PRESET.into());
        assert!(self.jobs().await.create(&record).await.unwrap());
        self.lifecycle(JobQueued {
            job_id: job,
            source: source.clone(),
            preset: PRESET.into(),
        })
        .await;
        let done = self.lifecycle(completed(job, source)).await;
        let png = tiny_png();
        self.put(&format!("outputs/{job}/result.png"), png.clone())
            .await;
        self.put(&format!("outputs/{job}/job.json"), b"{\"a\":1}".to_vec())
            .await;
        (job, done, png)
    }

    /// What ingest does with the bucket's event for the object `key`: relays its upload.
    async fn relay(&self, key: &str) {
        let relay = UploadRelay::new(
            Publisher::new(self.js.clone(), "/darkroom/ingest"),
            self.jobs().await,
            self.s3_client.clone(),
            "inbox/",
        );
        relay
            .relay(ObjectRef::new(BUCKET, key), "darkroom:ingest")
            .await
            .unwrap();
    }

    async fn jobs(&self) -> JobStore {
        JobStore::open(&self.js).await.unwrap()
    }

    async fn status(&self, job: JobId) -> Option<JobStatus> {
        self.jobs()
            .await
            .get(job)
            .await
            .unwrap()
            .map(|(record, _)| record.status)
    }

    async fn put(&self, key: &str, body: Vec<u8>) {
        self.s3_client
            .put_object()
            .bucket(BUCKET)
            .key(key)
            .body(body.into())
            .send()
            .await
            .unwrap();
    }

    async fn head(&self, key: &str) -> aws_sdk_s3::operation::head_object::HeadObjectOutput {
        self.s3_client
            .head_object()
            .bucket(BUCKET)
            .key(key)
            .send()
            .await
            .unwrap()
    }

    async fn exists(&self, key: &str) -> bool {
        self.s3_client
            .head_object()
            .bucket(BUCKET)
            .key(key)
            .send()
            .await
            .is_ok()
    }

    /// Publishes a lifecycle event on the events stream, as a function does.
    async fn lifecycle<T: LifecycleEvent>(&self, data: T) -> CloudEvent<T> {
        let job = data.job_id();
        let id = job.derived_id(&data.dedup_label()).to_string();
        let event =
            CloudEvent::new(id.clone(), "/darkroom/test", data).with_subject(job.to_string());
        let mut header_map = async_nats::HeaderMap::new();
        header_map.insert(headers::MSG_ID, id.as_str());
        self.js
            .publish_with_headers(
                subjects::lifecycle_subject(job, T::KIND),
                header_map,
                event.to_json().into(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        event
    }

    /// Publishes an event on the notifier's stream the way the notifier fans it out: on
    /// `darkroom.fanout.job.…` and, when it names its upload, `darkroom.fanout.bucket.…`.
    async fn fan_out<T: LifecycleEvent>(&self, data: T, source: Option<&ObjectRef>) -> Vec<u8> {
        let job = data.job_id();
        let id = job.derived_id(&data.dedup_label()).to_string();
        let event =
            CloudEvent::new(id.clone(), "/darkroom/test", data).with_subject(job.to_string());
        let body = event.to_json();
        let mut targets = vec![("job", subjects::notify_job_subject(job, T::KIND))];
        if let Some(source) = source {
            targets.push((
                "bucket",
                subjects::notify_object_subject(&source.bucket, &source.key, T::KIND),
            ));
        }
        for (label, subject) in targets {
            let mut header_map = async_nats::HeaderMap::new();
            header_map.insert(headers::MSG_ID, format!("{id}:{label}").as_str());
            self.js
                .publish_with_headers(
                    subjects::notify_stored_subject(&subject).unwrap(),
                    header_map,
                    body.clone().into(),
                )
                .await
                .unwrap()
                .await
                .unwrap();
        }
        body
    }

    async fn stream_messages(&self, stream: &str) -> u64 {
        let mut stream = self.js.get_stream(stream).await.unwrap();
        stream.info().await.unwrap().state.messages
    }
}

fn photo_jpeg(seed: u8) -> Vec<u8> {
    let image = RgbImage::from_fn(640, 480, |x, y| {
        Rgb([(x % 256) as u8, (y % 256) as u8, seed.wrapping_mul(37)])
    });
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
    out.into_inner()
}

fn tiny_png() -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    RgbImage::from_pixel(4, 4, Rgb([200, 100, 50]))
        .write_to(&mut out, image::ImageFormat::Png)
        .unwrap();
    out.into_inner()
}

fn md5_hex(body: &[u8]) -> String {
    darkroom_cli::upload::single_part_etag(body)
}

fn completed(job: JobId, source: ObjectRef) -> JobCompleted {
    JobCompleted {
        job_id: job,
        result: ObjectRef::new(&source.bucket, format!("outputs/{job}/result.png")),
        metadata: ObjectRef::new(&source.bucket, format!("outputs/{job}/job.json")),
        source,
        preset: PRESET.to_owned(),
        seed: 7,
        model: ModelUsed {
            name: "tiny".into(),
            sha256: "00".into(),
        },
        loras: Vec::new(),
        controlnets: Vec::new(),
        worker: "test-gpu".into(),
        attempt: 1,
        total_ms: 1200,
        inference_ms: 1000,
        timings: StageTimings::default(),
    }
}

fn failed(job: JobId, source: Option<ObjectRef>, reason: FailureReason) -> JobFailed {
    JobFailed {
        job_id: job,
        stage: Stage::Inference,
        reason,
        message: "the test says so".into(),
        attempts: 1,
        source,
    }
}

fn write_file(dir: &Path, name: &str, body: &[u8]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap();
    path.display().to_string()
}

#[tokio::test]
async fn upload_prints_the_job_and_preprocess_queues_it() {
    let stack = Stack::start().await;
    let (shutdown, task) = stack.preprocess().await;
    let dir = tempfile::tempdir().unwrap();
    let photo = photo_jpeg(1);
    let file = write_file(dir.path(), "desk photo.jpg", &photo);

    let (code, stdout, stderr) = stack
        .run_cli(&[
            "upload",
            &file,
            "--preset",
            PRESET,
            "--subject",
            "a tidy desk",
        ])
        .await;
    assert_eq!(code, 0, "{stderr}");
    let key = format!("inbox/{PRESET}/desk photo.jpg");
    let job = JobId::for_object(BUCKET, &key, &md5_hex(&photo));
    assert_eq!(stdout.trim(), job.to_string());

    let head = stack.head(&key).await;
    assert_eq!(head.content_type(), Some("image/jpeg"));
    assert_eq!(
        head.metadata()
            .and_then(|m| m.get("subject"))
            .map(String::as_str),
        Some("a tidy desk")
    );

    // What ingest does with SeaweedFS's event for the object.
    stack.relay(&key).await;
    wait_for(
        WAIT,
        || stack.status(job),
        |s| *s == Some(JobStatus::Queued),
    )
    .await;
    shutdown.cancel();
    task.await.unwrap();
}

/// Starts `darkroom upload … --wait` for a photo and returns the child, the job it will be
/// and the object it uploads, once the object is in the bucket.
async fn start_waiting_upload(
    stack: &Stack,
    dir: &Path,
    seed: u8,
) -> (tokio::process::Child, JobId, ObjectRef) {
    let photo = photo_jpeg(seed);
    let name = format!("photo-{seed}.jpg");
    let file = write_file(dir, &name, &photo);
    let out = dir.join("out").display().to_string();
    let child = stack
        .cli(&[
            "upload",
            &file,
            "--preset",
            PRESET,
            "--wait",
            "--out",
            &out,
            "--timeout",
            "12",
        ])
        .spawn()
        .unwrap();
    let key = format!("inbox/{PRESET}/{name}");
    let etag = md5_hex(&photo);
    let job = JobId::for_object(BUCKET, &key, &etag);
    wait_for(WAIT, || stack.exists(&key), |found| *found).await;
    let source = ObjectRef {
        etag: Some(etag),
        ..ObjectRef::new(BUCKET, &key)
    };
    (child, job, source)
}

async fn finish(child: tokio::process::Child) -> (i32, String, String) {
    let output = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("the CLI did not exit in time")
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn upload_wait_follows_the_job_and_downloads_the_result() {
    let stack = Stack::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (child, job, source) = start_waiting_upload(&stack, dir.path(), 2).await;

    // What the worker stores and the notifier republishes.
    let png = tiny_png();
    stack
        .put(&format!("outputs/{job}/result.png"), png.clone())
        .await;
    stack
        .put(&format!("outputs/{job}/job.json"), b"{\"job\":1}".to_vec())
        .await;
    stack
        .fan_out(
            JobQueued {
                job_id: job,
                source: source.clone(),
                preset: PRESET.into(),
            },
            Some(&source),
        )
        .await;
    stack
        .fan_out(
            JobStarted {
                job_id: job,
                worker: "test-gpu".into(),
                attempt: 1,
            },
            None,
        )
        .await;
    for step in 1..=2 {
        stack
            .fan_out(
                JobProgress {
                    job_id: job,
                    step,
                    total_steps: 2,
                },
                None,
            )
            .await;
    }
    stack
        .fan_out(completed(job, source.clone()), Some(&source))
        .await;

    let (code, stdout, stderr) = finish(child).await;
    assert_eq!(code, 0, "{stderr}");
    let image = dir.path().join("out").join(format!("{job}.png"));
    assert_eq!(stdout.trim(), image.display().to_string());
    assert_eq!(std::fs::read(&image).unwrap(), png);
    assert_eq!(
        std::fs::read(dir.path().join("out").join(format!("{job}.json"))).unwrap(),
        b"{\"job\":1}"
    );
    // stderr is not a terminal: one plain line per event.
    for line in [
        "queued ",
        "started ",
        "progress  step 1/2",
        "progress  step 2/2",
        "completed ",
    ] {
        assert!(stderr.contains(line), "no {line:?} in:\n{stderr}");
    }
}

#[tokio::test]
async fn upload_wait_exits_3_when_the_job_fails_and_4_on_timeout() {
    let stack = Stack::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (child, job, source) = start_waiting_upload(&stack, dir.path(), 3).await;
    stack
        .fan_out(
            failed(job, Some(source.clone()), FailureReason::ModelError),
            Some(&source),
        )
        .await;
    let (code, stdout, stderr) = finish(child).await;
    assert_eq!(code, 3, "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        stderr.contains(&format!(
            "job {job} failed at inference: model_error: the test says so"
        )),
        "{stderr}"
    );
    assert!(!dir.path().join("out").exists());

    // Nothing ever happens to this one.
    let photo = write_file(dir.path(), "lonely.jpg", &photo_jpeg(4));
    let (code, _, stderr) = stack
        .run_cli(&[
            "upload",
            &photo,
            "--preset",
            PRESET,
            "--wait",
            "--timeout",
            "1",
        ])
        .await;
    assert_eq!(code, 4, "{stderr}");
    assert!(stderr.contains("did not finish within 1 s"), "{stderr}");
}

#[tokio::test]
async fn upload_wait_answers_a_finished_job_from_its_record() {
    let stack = Stack::start().await;
    let dir = tempfile::tempdir().unwrap();
    let photo = photo_jpeg(5);
    let file = write_file(dir.path(), "again.jpg", &photo);
    let key = format!("inbox/{PRESET}/again.jpg");
    let job = JobId::for_object(BUCKET, &key, &md5_hex(&photo));
    // Rendered long ago: the record says so, no event is left anywhere.
    let mut record = JobRecord::received(job, ObjectRef::new(BUCKET, &key));
    record.status = JobStatus::Completed;
    assert!(stack.jobs().await.create(&record).await.unwrap());
    let png = tiny_png();
    stack
        .put(&format!("outputs/{job}/result.png"), png.clone())
        .await;
    stack
        .put(&format!("outputs/{job}/job.json"), b"{}".to_vec())
        .await;

    let out = dir.path().join("out");
    let (code, stdout, stderr) = stack
        .run_cli(&[
            "upload",
            &file,
            "--preset",
            PRESET,
            "--wait",
            "--out",
            &out.display().to_string(),
            "--timeout",
            "10",
        ])
        .await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        stdout.trim(),
        out.join(format!("{job}.png")).display().to_string()
    );
    assert_eq!(std::fs::read(out.join(format!("{job}.png"))).unwrap(), png);
}

#[tokio::test]
async fn watch_prints_exactly_the_completions_under_its_prefix() {
    let stack = Stack::start().await;
    let mut child = stack
        .cli(&["watch", "--json", "--prefix", "inbox/profile-w"])
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let ready = tokio::time::timeout(WAIT, stderr.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        ready.starts_with("watching s3://photos/inbox/profile-w"),
        "{ready}"
    );

    let object = |key: &str| ObjectRef {
        etag: Some("e".into()),
        ..ObjectRef::new(BUCKET, key)
    };
    let warm = object("inbox/profile-warm/a.jpg");
    let warm_job = warm.job_id().unwrap();
    let warm2 = object("inbox/profile-warm/deeper/b.jpg");
    let cool = object("inbox/profile-cool/c.jpg");
    let last = object("inbox/profile-wild/z.jpg");

    let mut expected = Vec::new();
    // Not completions.
    stack
        .fan_out(
            JobQueued {
                job_id: warm_job,
                source: warm.clone(),
                preset: "profile-warm".into(),
            },
            Some(&warm),
        )
        .await;
    stack
        .fan_out(
            JobProgress {
                job_id: warm_job,
                step: 1,
                total_steps: 3,
            },
            None,
        )
        .await;
    expected.push(
        stack
            .fan_out(completed(warm_job, warm.clone()), Some(&warm))
            .await,
    );
    expected.push(
        stack
            .fan_out(
                failed(
                    warm2.job_id().unwrap(),
                    Some(warm2.clone()),
                    FailureReason::Timeout,
                ),
                Some(&warm2),
            )
            .await,
    );
    // Same folder as the prefix (inbox/), but not under it.
    stack
        .fan_out(completed(cool.job_id().unwrap(), cool.clone()), Some(&cool))
        .await;
    // Another bucket.
    let elsewhere = ObjectRef {
        etag: Some("e".into()),
        ..ObjectRef::new("other", "inbox/profile-warm/a.jpg")
    };
    stack
        .fan_out(
            completed(elsewhere.job_id().unwrap(), elsewhere.clone()),
            Some(&elsewhere),
        )
        .await;
    expected.push(
        stack
            .fan_out(completed(last.job_id().unwrap(), last.clone()), Some(&last))
            .await,
    );

    let mut stdout = child.stdout.take().unwrap();
    let mut printed = Vec::new();
    let want: usize = expected.iter().map(|e| e.len() + 1).sum();
    tokio::time::timeout(WAIT, async {
        let mut buffer = [0u8; 4096];
        while printed.len() < want {
            let n = stdout.read(&mut buffer).await.unwrap();
            assert!(n > 0, "watch exited");
            printed.extend_from_slice(&buffer[..n]);
        }
    })
    .await
    .expect("watch did not print the expected events");
    // Nothing more arrives after the last one.
    let extra = tokio::time::timeout(Duration::from_millis(300), async {
        let mut buffer = [0u8; 1];
        stdout.read(&mut buffer).await
    })
    .await;
    assert!(extra.is_err(), "watch printed more than expected");
    child.kill().await.unwrap();

    let lines: Vec<&[u8]> = printed
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(lines.len(), 3);
    for (line, event) in lines.iter().zip(&expected) {
        assert_eq!(*line, event.as_slice());
    }
    let first: CloudEvent<JobCompleted> = CloudEvent::from_json(lines[0]).unwrap();
    assert_eq!(first.event_type, JobCompleted::TYPE);
    assert_eq!(first.data.job_id, warm_job);
}

#[tokio::test]
async fn status_and_get_read_the_record_and_the_events() {
    let stack = Stack::start().await;
    let (job, done, png) = stack.finished_job("x.jpg").await;

    let (code, stdout, stderr) = stack.run_cli(&["status", &job.to_string(), "--json"]).await;
    assert_eq!(code, 0, "{stderr}");
    let status: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(status["status"], "completed");
    assert_eq!(status["record"]["preset"], PRESET);
    assert_eq!(status["events"]["completed"]["id"], done.id);
    assert_eq!(status["events"]["queued"]["data"]["preset"], PRESET);
    assert!(status["events"].get("failed").is_none());

    let (code, stdout, _) = stack.run_cli(&["status", &job.to_string()]).await;
    assert_eq!(code, 0);
    assert!(stdout.contains("status    completed"), "{stdout}");
    assert!(
        stdout.contains(&format!("completed {}", done.time.to_rfc3339())),
        "{stdout}"
    );

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("results");
    let (code, stdout, stderr) = stack
        .run_cli(&["get", &job.to_string(), "--out", &out.display().to_string()])
        .await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        stdout.trim(),
        out.join(format!("{job}.png")).display().to_string()
    );
    assert_eq!(std::fs::read(out.join(format!("{job}.png"))).unwrap(), png);
    assert_eq!(
        std::fs::read(out.join(format!("{job}.json"))).unwrap(),
        b"{\"a\":1}"
    );

    // A job still waiting has no result, and says why.
    let waiting = ObjectRef {
        etag: Some("def".into()),
        ..ObjectRef::new(BUCKET, "inbox/desk-setup/y.jpg")
    };
    let mut record = JobRecord::received(waiting.job_id().unwrap(), waiting.clone());
    record.status = JobStatus::Queued;
    assert!(stack.jobs().await.create(&record).await.unwrap());
    let (code, _, stderr) = stack
        .run_cli(&[
            "get",
            &waiting.job_id().unwrap().to_string(),
            "--out",
            &out.display().to_string(),
        ])
        .await;
    assert_eq!(code, 5, "{stderr}");
    assert!(
        stderr.contains("has no result: its status is queued"),
        "{stderr}"
    );

    // A job nobody heard of.
    let unknown = JobId::for_object(BUCKET, "nope", "0");
    let (code, _, stderr) = stack.run_cli(&["status", &unknown.to_string()]).await;
    assert_eq!(code, 5, "{stderr}");
    assert!(stderr.contains("is unknown"), "{stderr}");
}

#[tokio::test]
async fn replay_dlq_brings_a_dead_letter_back_once() {
    let stack = Stack::start().await;
    let (shutdown, task) = stack.preprocess().await;
    let photo = photo_jpeg(6);
    let key = format!("inbox/{PRESET}/late.jpg");
    let source = ObjectRef {
        etag: Some(md5_hex(&photo)),
        size: Some(photo.len() as u64),
        ..ObjectRef::new(BUCKET, &key)
    };
    let job = source.job_id().unwrap();
    // The event arrives before the object is there: object_not_found, dead-lettered.
    let notification = S3Notification {
        records: vec![S3EventRecord::object_created("aws:s3", &source, None)],
    };
    stack
        .js
        .publish(
            subjects::uploads_subject(BUCKET),
            serde_json::to_vec(&notification).unwrap().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    wait_for(
        WAIT,
        || stack.stream_messages(subjects::DLQ_STREAM),
        |n| *n == 1,
    )
    .await;
    wait_for(
        WAIT,
        || stack.status(job),
        |s| *s == Some(JobStatus::Failed),
    )
    .await;
    let uploads_before = stack.stream_messages(subjects::UPLOADS_STREAM).await;

    // A dry run changes nothing.
    let (code, stdout, stderr) = stack.run_cli(&["replay-dlq", "--dry-run"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.starts_with("would replay dlq#1 preprocess object_not_found"),
        "{stdout}"
    );
    assert!(stdout.contains(&job.to_string()), "{stdout}");
    assert_eq!(stack.stream_messages(subjects::DLQ_STREAM).await, 1);

    // Another job's letters and another stage are left alone.
    let other = JobId::for_object(BUCKET, "x", "y").to_string();
    let (code, _, stderr) = stack.run_cli(&["replay-dlq", "--job", &other]).await;
    assert_eq!(code, 0);
    assert!(stderr.contains("replayed 0"), "{stderr}");
    let (code, _, stderr) = stack.run_cli(&["replay-dlq", "--stage", "inference"]).await;
    assert_eq!(code, 0);
    assert!(stderr.contains("replayed 0"), "{stderr}");
    assert_eq!(stack.stream_messages(subjects::DLQ_STREAM).await, 1);

    stack.put(&key, photo).await;
    let (code, stdout, stderr) = stack
        .run_cli(&[
            "replay-dlq",
            "--stage",
            "preprocess",
            "--job",
            &job.to_string(),
        ])
        .await;
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.starts_with("replayed  dlq#1 preprocess object_not_found"),
        "{stdout}"
    );
    assert!(
        stdout.contains("→ darkroom.uploads.photos: DARKROOM_UPLOADS seq"),
        "{stdout}"
    );
    wait_for(
        WAIT,
        || stack.status(job),
        |s| *s == Some(JobStatus::Queued),
    )
    .await;
    assert_eq!(stack.stream_messages(subjects::DLQ_STREAM).await, 0);
    assert_eq!(
        stack.stream_messages(subjects::UPLOADS_STREAM).await,
        uploads_before + 1
    );
    let uploads = stack.js.get_stream(subjects::UPLOADS_STREAM).await.unwrap();
    let replayed = uploads
        .get_last_raw_message_by_subject(&subjects::uploads_subject(BUCKET))
        .await
        .unwrap();
    assert_eq!(
        replayed.headers.get(headers::MSG_ID).map(|v| v.as_str()),
        Some("replay.1")
    );

    // Again: nothing left to replay, nothing published.
    let (code, stdout, stderr) = stack.run_cli(&["replay-dlq"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.contains("replayed 0"), "{stderr}");
    assert_eq!(
        stack.stream_messages(subjects::UPLOADS_STREAM).await,
        uploads_before + 1
    );
    assert_eq!(stack.stream_messages(subjects::JOBS_STREAM).await, 1);
    shutdown.cancel();
    task.await.unwrap();
}

/// The URL `darkroom url` / `upload-url` print alone on stdout.
fn printed_url(stdout: &str) -> reqwest::Url {
    reqwest::Url::parse(stdout.trim()).unwrap_or_else(|e| panic!("{stdout:?}: {e}"))
}

/// Waits until `url`'s signature has expired (its `X-Amz-Date` + `X-Amz-Expires`, plus a
/// second for the clocks' rounding).
async fn until_expired(url: &reqwest::Url) {
    let query = |name: &str| {
        url.query_pairs()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.into_owned())
            .unwrap_or_else(|| panic!("{url} has no {name}"))
    };
    let signed = chrono::NaiveDateTime::parse_from_str(&query("X-Amz-Date"), "%Y%m%dT%H%M%SZ")
        .unwrap()
        .and_utc();
    let expires = signed + chrono::Duration::seconds(query("X-Amz-Expires").parse().unwrap());
    let left = (expires - chrono::Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(left + Duration::from_secs(1)).await;
}

#[tokio::test]
async fn an_upload_url_takes_one_photo_without_credentials_until_it_expires() {
    let stack = Stack::start().await;
    let (shutdown, task) = stack.preprocess().await;
    let (code, stdout, stderr) = stack
        .run_cli(&[
            "upload-url",
            "phone photo.jpg",
            "--preset",
            PRESET,
            "--expires-in",
            "4s",
        ])
        .await;
    assert_eq!(code, 0, "{stderr}");
    let url = printed_url(&stdout);
    let key = format!("inbox/{PRESET}/phone photo.jpg");
    assert!(stderr.contains(&format!("s3://{BUCKET}/{key}")), "{stderr}");
    assert!(stderr.contains("content-type: image/jpeg"), "{stderr}");

    // A plain HTTP client, no S3 credentials: the signature is the permission.
    let http = reqwest::Client::new();
    let photo = photo_jpeg(9);
    let put = |url: reqwest::Url, content_type: &'static str| {
        http.put(url)
            .header("content-type", content_type)
            .body(photo.clone())
            .send()
    };
    // The signature covers the key and the content type: neither can be changed.
    let mut other_key = url.clone();
    other_key.set_path(&format!("/{BUCKET}/inbox/{PRESET}/other.jpg"));
    assert_eq!(put(other_key, "image/jpeg").await.unwrap().status(), 403);
    assert_eq!(put(url.clone(), "text/html").await.unwrap().status(), 403);
    let response = put(url.clone(), "image/jpeg").await.unwrap();
    assert!(response.status().is_success(), "{response:?}");
    assert!(!stack.exists(&format!("inbox/{PRESET}/other.jpg")).await);
    let head = stack.head(&key).await;
    assert_eq!(head.content_type(), Some("image/jpeg"));

    // It becomes a job like any upload (what ingest does with the bucket's event).
    stack.relay(&key).await;
    let job = JobId::for_object(BUCKET, &key, &md5_hex(&photo));
    wait_for(
        WAIT,
        || stack.status(job),
        |s| *s == Some(JobStatus::Queued),
    )
    .await;

    // Expired: refused.
    until_expired(&url).await;
    let late = put(url, "image/jpeg").await.unwrap();
    assert_eq!(late.status(), 403, "{:?}", late.text().await);

    // Bad arguments are usage errors (exit 2).
    for args in [
        &[
            "upload-url",
            "x.jpg",
            "--preset",
            PRESET,
            "--expires-in",
            "8d",
        ][..],
        &["upload-url", "x.gif", "--preset", PRESET],
        &["upload-url", "a/x.jpg", "--preset", PRESET],
    ] {
        let (code, _, stderr) = stack.run_cli(args).await;
        assert_eq!(code, 2, "{args:?}: {stderr}");
    }
    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn a_result_url_serves_the_picture_until_it_expires() {
    let stack = Stack::start().await;
    let (job, _, png) = stack.finished_job("shared.jpg").await;

    let (code, stdout, stderr) = stack
        .run_cli(&["url", &job.to_string(), "--expires-in", "3s"])
        .await;
    assert_eq!(code, 0, "{stderr}");
    let url = printed_url(&stdout);
    let response = reqwest::get(url.clone()).await.unwrap();
    assert!(response.status().is_success(), "{response:?}");
    assert_eq!(response.bytes().await.unwrap().as_ref(), png.as_slice());

    let (code, stdout, stderr) = stack
        .run_cli(&["url", &job.to_string(), "--metadata"])
        .await;
    assert_eq!(code, 0, "{stderr}");
    let metadata = reqwest::get(printed_url(&stdout)).await.unwrap();
    assert_eq!(metadata.bytes().await.unwrap().as_ref(), b"{\"a\":1}");

    until_expired(&url).await;
    assert_eq!(reqwest::get(url).await.unwrap().status(), 403);

    // No such job: exit 5; a job without a result: exit 5 and its status.
    let unknown = JobId::for_object(BUCKET, "inbox/desk-setup/none.jpg", "0");
    let (code, _, stderr) = stack.run_cli(&["url", &unknown.to_string()]).await;
    assert_eq!(code, 5, "{stderr}");
}
