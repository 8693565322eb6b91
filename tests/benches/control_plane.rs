//! Control-plane benchmark: upload event → `completed` notification, with a zero-cost
//! inference stand-in, next to raw JetStream publish → pull on the same servers; then a burst
//! of uploads checked for exactly-once completion.
//!
//! ```sh
//! cargo build --release -p darkroom-ingest -p darkroom-preprocess -p darkroom-notifier --bins
//! cargo bench -p darkroom-tests --bench control_plane -- [--uploads 200] [--burst 1000]
//! ```
//!
//! What runs:
//!
//! - `nats-server` and SeaweedFS (`weed mini`) from the test harness, on free ports.
//! - The real functions as child processes, from `--bin-dir` (default: the `release` folder
//!   of the target directory this benchmark was built in): `darkroom-ingest` (SeaweedFS posts
//!   its filer events to it), `darkroom-preprocess` and `darkroom-notifier` (no webhooks:
//!   fan-out to subjects only).
//! - **In this benchmark only**, a zero-cost stand-in for the inference worker: the shared
//!   consumer loop on `DARKROOM_JOBS` / `inference` with a handler that renders nothing. Per
//!   job it marks the record `running`, publishes `started`, publishes `completed` (its result
//!   and metadata keys name objects it never writes; model "stand-in"), marks the record
//!   `completed`, and the loop acks. That is the control-plane work the real worker does
//!   around a render.
//! - An observer in this process, subscribed (core NATS) to the upload events, the `queued`
//!   and `completed` lifecycle events and the per-job `completed` notifications, stamping each
//!   with one monotonic clock.
//!
//! Phase 1 uploads `--uploads` small JPEGs one at a time (preset `desk-setup`: one canny map,
//! no face step) and, after each, times `--raw-per-upload` raw JetStream round trips (publish
//! with ack → a pull consumer's batch-of-1 request receives it → double ack) on a stream of
//! its own on the same server. Phase 2 puts `--burst` uploads as fast as `--burst-concurrency`
//! PUTs at a time go, waits for every notification, and checks that each job has exactly one
//! `completed` event in the events stream and exactly one notification; it exits non-zero if
//! any is lost or doubled.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use async_nats::jetstream::{self, consumer::PullConsumer, stream};
use darkroom_events::subjects::{self, consumers};
use darkroom_events::{JobId, ObjectRef, S3Message};
use darkroom_shared::consumer::{self, ConsumerSettings};
use darkroom_shared::jobs::JobStore;
use darkroom_shared::publish::Publisher;
use darkroom_shared::topology::Topology;
use darkroom_tests::stand_in::InferenceStandIn;
use darkroom_tests::{NatsServer, S3Server};
use futures::StreamExt;
use image::{ExtendedColorType, ImageEncoder, Rgb, RgbImage};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const BUCKET: &str = "photos";
const PRESET: &str = "desk-setup";
/// The stand-in's worker name, in `started` and `completed`.
const STAND_IN_WORKER: &str = "bench-inference-stand-in";
/// The stand-in's CloudEvent source.
const STAND_IN_SOURCE: &str = "/darkroom/bench/inference-stand-in";
const RAW_STREAM: &str = "BENCH_RAW";
const RAW_SUBJECT: &str = "bench.raw";
const WARM_UP_UPLOADS: usize = 5;
/// How long one upload of phase 1 may take to be announced as completed.
const ONE_JOB_TIMEOUT: Duration = Duration::from_secs(60);
/// After the last notification, how long to keep listening for doubles.
const SETTLE: Duration = Duration::from_secs(3);
const FUNCTIONS: [&str; 3] = [
    "darkroom-ingest",
    "darkroom-preprocess",
    "darkroom-notifier",
];

/// Command-line settings.
#[derive(Debug, Clone)]
struct Args {
    uploads: usize,
    burst: usize,
    burst_concurrency: usize,
    raw_per_upload: usize,
    width: u32,
    height: u32,
    burst_timeout: Duration,
    bin_dir: PathBuf,
}

const USAGE: &str = "control_plane [--uploads N (200)] [--burst N (1000, 0 skips)] \
[--burst-concurrency N (16)] [--raw-per-upload N (5)] [--size WxH (640x480)] \
[--burst-timeout-secs S (900)] [--bin-dir DIR (<target>/release)]";

fn parse_args() -> Result<Args> {
    let mut args = Args {
        uploads: 200,
        burst: 1000,
        burst_concurrency: 16,
        raw_per_upload: 5,
        width: 640,
        height: 480,
        burst_timeout: Duration::from_secs(900),
        bin_dir: default_bin_dir()?,
    };
    let mut given = std::env::args().skip(1);
    while let Some(flag) = given.next() {
        // `cargo bench` adds `--bench` for harness-less targets.
        if flag == "--bench" {
            continue;
        }
        let mut value = || {
            given
                .next()
                .ok_or_else(|| anyhow!("{flag} needs a value\nusage: {USAGE}"))
        };
        let number = |text: String| -> Result<usize> {
            text.parse()
                .with_context(|| format!("{flag}: not a number: {text}"))
        };
        match flag.as_str() {
            "--uploads" => args.uploads = number(value()?)?,
            "--burst" => args.burst = number(value()?)?,
            "--burst-concurrency" => args.burst_concurrency = number(value()?)?.max(1),
            "--raw-per-upload" => args.raw_per_upload = number(value()?)?,
            "--burst-timeout-secs" => {
                args.burst_timeout = Duration::from_secs(number(value()?)? as u64);
            }
            "--bin-dir" => args.bin_dir = PathBuf::from(value()?),
            "--size" => {
                let text = value()?;
                let (w, h) = text
                    .split_once('x')
                    .ok_or_else(|| anyhow!("--size wants WxH, got {text}"))?;
                args.width = w.parse().context("--size width")?;
                args.height = h.parse().context("--size height")?;
            }
            "--help" | "-h" => {
                println!("usage: {USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}\nusage: {USAGE}"),
        }
    }
    if args.uploads == 0 {
        bail!("--uploads must be at least 1");
    }
    Ok(args)
}

/// `<target>/release`: this executable lives in `<target>/release/deps/`.
fn default_bin_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate the benchmark executable")?;
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .ok_or_else(|| anyhow!("cannot derive the target folder from {}", exe.display()))
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(error) => {
            eprintln!("{error:#}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("FAILED: the burst lost or doubled completions (see above)");
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("benchmark failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------
// What the observer and the stand-in record
// ---------------------------------------------------------------------------------------

/// When each step of one job was seen, on this process's monotonic clock.
#[derive(Debug, Clone, Default)]
struct Timeline {
    put_started: Option<Instant>,
    put_returned: Option<Instant>,
    upload_event: Option<Instant>,
    queued: Option<Instant>,
    stand_in_pulled: Option<Instant>,
    completed_event: Option<Instant>,
    notified: Option<Instant>,
    /// Preprocess's own log line: S3 HEAD + GET, the pipeline, and everything.
    preprocess_fetch_ms: Option<u64>,
    preprocess_prepare_ms: Option<u64>,
    preprocess_total_ms: Option<u64>,
    completed_events_heard: u32,
    notifications_heard: u32,
    failed_events_heard: u32,
    stand_in_handled: u32,
}

/// Every job's timeline, shared by the observer tasks, the stand-in and the driver.
#[derive(Default)]
struct Timelines {
    jobs: Mutex<HashMap<JobId, Timeline>>,
    /// Bumped on every notification, so waiters can re-check.
    notified: tokio::sync::Notify,
}

impl Timelines {
    fn update(&self, job: JobId, change: impl FnOnce(&mut Timeline)) {
        let mut jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        change(jobs.entry(job).or_default());
    }

    fn get(&self, job: JobId) -> Option<Timeline> {
        let jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        jobs.get(&job).cloned()
    }

    fn notified_count(&self, jobs: &[JobId]) -> usize {
        let all = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        jobs.iter()
            .filter(|job| all.get(job).is_some_and(|t| t.notified.is_some()))
            .count()
    }

    /// Waits until every job in `jobs` has its notification, or `timeout` passes.
    async fn wait_notified(&self, jobs: &[JobId], timeout: Duration) -> Result<Instant> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let waiting = self.notified.notified();
            let done = self.notified_count(jobs);
            if done == jobs.len() {
                return Ok(Instant::now());
            }
            if tokio::time::timeout_at(deadline, waiting).await.is_err() {
                bail!(
                    "only {done} of {} jobs were announced within {timeout:?}",
                    jobs.len()
                );
            }
        }
    }
}

fn lifecycle_job(subject: &str) -> Option<JobId> {
    // darkroom.events.<job>.<kind> and darkroom.notify.job.<job>.<kind>
    let tokens: Vec<&str> = subject.split('.').collect();
    let job = match tokens.as_slice() {
        ["darkroom", "events", job, _] | ["darkroom", "notify", "job", job, _] => *job,
        _ => return None,
    };
    job.parse().ok()
}

/// Core-NATS subscriptions stamping every event of interest.
async fn observe(client: &async_nats::Client, timelines: Arc<Timelines>) -> Result<()> {
    let mut uploads = client
        .subscribe(subjects::uploads_subject(BUCKET))
        .await
        .context("subscribe to uploads")?;
    let mut events = client
        .subscribe("darkroom.events.*.*")
        .await
        .context("subscribe to lifecycle events")?;
    let mut notifications = client
        .subscribe("darkroom.notify.job.*.completed")
        .await
        .context("subscribe to notifications")?;
    darkroom_tests::round_trip(client)
        .await
        .context("register the subscriptions")?;

    let uploads_timelines = timelines.clone();
    tokio::spawn(async move {
        while let Some(message) = uploads.next().await {
            let now = Instant::now();
            let Ok(S3Message::Records(records)) =
                darkroom_events::s3::parse_s3_message(&message.payload)
            else {
                continue;
            };
            for record in records {
                if let Some(job) = record.object_ref().ok().and_then(|o| o.job_id()) {
                    uploads_timelines.update(job, |t| {
                        t.upload_event.get_or_insert(now);
                    });
                }
            }
        }
    });
    let events_timelines = timelines.clone();
    tokio::spawn(async move {
        while let Some(message) = events.next().await {
            let now = Instant::now();
            let Some(job) = lifecycle_job(&message.subject) else {
                continue;
            };
            match message.subject.rsplit('.').next() {
                Some("queued") => events_timelines.update(job, |t| {
                    t.queued.get_or_insert(now);
                }),
                Some("completed") => events_timelines.update(job, |t| {
                    t.completed_event.get_or_insert(now);
                    t.completed_events_heard += 1;
                }),
                Some("failed") => events_timelines.update(job, |t| t.failed_events_heard += 1),
                _ => {}
            }
        }
    });
    tokio::spawn(async move {
        while let Some(message) = notifications.next().await {
            let now = Instant::now();
            if let Some(job) = lifecycle_job(&message.subject) {
                timelines.update(job, |t| {
                    t.notified.get_or_insert(now);
                    t.notifications_heard += 1;
                });
                timelines.notified.notify_waiters();
            }
        }
    });
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Function processes
// ---------------------------------------------------------------------------------------

/// A function binary running as a child process; killed when dropped.
struct Function {
    name: &'static str,
    child: tokio::process::Child,
    pid: u32,
}

impl Function {
    fn memory(&self) -> Result<Memory> {
        let path = format!("/proc/{}/status", self.pid);
        let status = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
        let field = |name: &str| -> Result<u64> {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|kib| kib.parse().ok())
                .ok_or_else(|| anyhow!("no {name} in {path}"))
        };
        Ok(Memory {
            rss_kib: field("VmRSS:")?,
            hwm_kib: field("VmHWM:")?,
        })
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait().context("wait for a function")? {
            bail!("{} exited early ({status})", self.name);
        }
        Ok(())
    }
}

/// Resident and peak resident memory of a process.
#[derive(Debug, Clone, Copy)]
struct Memory {
    rss_kib: u64,
    hwm_kib: u64,
}

async fn spawn_function(
    name: &'static str,
    args: &Args,
    env: &[(&str, String)],
    log_dir: &Path,
    preprocess_timelines: Option<Arc<Timelines>>,
) -> Result<Function> {
    let program = args.bin_dir.join(name);
    let log_path = log_dir.join(format!("{name}.log"));
    let stdout = std::fs::File::create(&log_path)
        .with_context(|| format!("create {}", log_path.display()))?;
    let mut command = tokio::process::Command::new(&program);
    command
        .arg("serve")
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .env_remove("RUST_LOG")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE")
        .env("DARKROOM_LOG_FORMAT", "json")
        .env("DARKROOM_LOG_FILTER", "info,async_nats=warn");
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("start {}", program.display()))?;
    let pid = child.id().ok_or_else(|| anyhow!("{name} exited at once"))?;
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| anyhow!("no stderr pipe for {name}"))?;
    let mut log = tokio::fs::OpenOptions::new()
        .append(true)
        .open(&log_path)
        .await
        .with_context(|| format!("open {}", log_path.display()))?;
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(timelines) = &preprocess_timelines {
                record_preprocess_log(timelines, &line);
            }
            let _ = log.write_all(line.as_bytes()).await;
            let _ = log.write_all(b"\n").await;
        }
    });
    Ok(Function { name, child, pid })
}

/// Reads preprocess's `queued` log line (JSON): its fetch, prepare and total milliseconds.
fn record_preprocess_log(timelines: &Timelines, line: &str) {
    let Ok(entry) = serde_json::from_str::<serde_json::Value>(line) else {
        return;
    };
    if entry["message"] != "queued" {
        return;
    }
    let Some(job) = entry["job"].as_str().and_then(|j| j.parse::<JobId>().ok()) else {
        return;
    };
    timelines.update(job, |t| {
        t.preprocess_fetch_ms = entry["fetch_ms"].as_u64();
        t.preprocess_prepare_ms = entry["prepare_ms"].as_u64();
        t.preprocess_total_ms = entry["total_ms"].as_u64();
    });
}

/// Waits until a durable consumer has a pull request waiting (its function is consuming).
async fn wait_consuming(js: &jetstream::Context, stream: &str, name: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut consumer) = js
            .get_consumer_from_stream::<jetstream::consumer::pull::Config, _, _>(name, stream)
            .await
            && let Ok(info) = consumer.info().await
            && info.num_waiting > 0
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("consumer {stream}/{name} has no pull request after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_listening(port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            bail!("nothing listens on 127.0.0.1:{port} after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Uploads
// ---------------------------------------------------------------------------------------

/// A photo-like JPEG, different for every `index` (so every upload is its own job).
fn photo_jpeg(width: u32, height: u32, index: usize) -> Result<Vec<u8>> {
    let shift = (index % 251) as u32;
    let stamp = index.to_le_bytes();
    let image = RgbImage::from_fn(width, height, |x, y| {
        if y == 0 && (x as usize) < stamp.len() {
            let v = stamp[x as usize];
            return Rgb([v, v, v]);
        }
        let check = if ((x + shift) / 40 + y / 40).is_multiple_of(2) {
            210
        } else {
            40
        };
        Rgb([check, ((x + shift) % 256) as u8, (y % 256) as u8])
    });
    let mut out = Cursor::new(Vec::new());
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
        .write_image(image.as_raw(), width, height, ExtendedColorType::Rgb8)
        .context("encode a JPEG")?;
    Ok(out.into_inner())
}

/// PUTs one upload and stamps it; returns its job.
async fn put_upload(
    s3: &aws_sdk_s3::Client,
    timelines: &Timelines,
    key: String,
    body: Vec<u8>,
) -> Result<JobId> {
    let started = Instant::now();
    let put = s3
        .put_object()
        .bucket(BUCKET)
        .key(&key)
        .body(body.into())
        .send()
        .await
        .with_context(|| format!("PUT {key}"))?;
    let returned = Instant::now();
    let etag = put
        .e_tag()
        .ok_or_else(|| anyhow!("PUT {key} returned no ETag"))?;
    let job = JobId::for_object(BUCKET, &key, etag);
    timelines.update(job, |t| {
        t.put_started = Some(started);
        t.put_returned = Some(returned);
    });
    Ok(job)
}

// ---------------------------------------------------------------------------------------
// Raw JetStream anchor
// ---------------------------------------------------------------------------------------

/// Publish (acked) → a waiting pull consumer (batch 1) receives it → double ack, on a stream
/// of its own configured like Darkroom's (file storage, limits).
struct RawAnchor {
    js: jetstream::Context,
    received: tokio::sync::mpsc::Receiver<Instant>,
    payload: bytes::Bytes,
    consumer_task: tokio::task::JoinHandle<()>,
}

impl RawAnchor {
    async fn start(js: jetstream::Context, payload: bytes::Bytes) -> Result<Self> {
        let stream = js
            .get_or_create_stream(stream::Config {
                name: RAW_STREAM.to_owned(),
                subjects: vec![RAW_SUBJECT.to_owned()],
                storage: stream::StorageType::File,
                retention: stream::RetentionPolicy::Limits,
                ..stream::Config::default()
            })
            .await
            .context("create the raw stream")?;
        let consumer: PullConsumer = stream
            .get_or_create_consumer(
                "raw",
                jetstream::consumer::pull::Config {
                    durable_name: Some("raw".to_owned()),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ..Default::default()
                },
            )
            .await
            .context("create the raw consumer")?;
        let (sender, received) = tokio::sync::mpsc::channel(16);
        let consumer_task = tokio::spawn(async move {
            loop {
                let Ok(mut batch) = consumer
                    .batch()
                    .max_messages(1)
                    .expires(Duration::from_secs(5))
                    .messages()
                    .await
                else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                while let Some(Ok(message)) = batch.next().await {
                    let now = Instant::now();
                    let _ = message.double_ack().await;
                    if sender.send(now).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(RawAnchor {
            js,
            received,
            payload,
            consumer_task,
        })
    }

    /// One round trip: milliseconds from publish to the consumer holding the message.
    async fn round_trip(&mut self) -> Result<f64> {
        let started = Instant::now();
        self.js
            .publish(RAW_SUBJECT, self.payload.clone())
            .await
            .context("raw publish")?
            .await
            .context("raw publish ack")?;
        let received = tokio::time::timeout(Duration::from_secs(10), self.received.recv())
            .await
            .context("raw message not received in 10 s")?
            .ok_or_else(|| anyhow!("raw consumer stopped"))?;
        Ok(millis(received.saturating_duration_since(started)))
    }
}

impl Drop for RawAnchor {
    fn drop(&mut self) {
        self.consumer_task.abort();
    }
}

// ---------------------------------------------------------------------------------------
// Statistics and tables
// ---------------------------------------------------------------------------------------

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// p50, p90, p99 and max (nearest rank) of `samples`.
#[derive(Debug, Clone, Copy)]
struct Summary {
    count: usize,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

fn summarize(samples: &[f64]) -> Option<Summary> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = |p: f64| {
        let index = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        sorted[index.clamp(1, sorted.len()) - 1]
    };
    Some(Summary {
        count: sorted.len(),
        p50: rank(50.0),
        p90: rank(90.0),
        p99: rank(99.0),
        max: sorted[sorted.len() - 1],
    })
}

/// Milliseconds from `from` to `to`, negative when `to` came first (two observers of one
/// step can hear it in either order).
fn span_ms(from: Option<Instant>, to: Option<Instant>) -> Option<f64> {
    let (from, to) = (from?, to?);
    Some(match to.checked_duration_since(from) {
        Some(ahead) => millis(ahead),
        None => -millis(from.duration_since(to)),
    })
}

fn row(table: &mut String, label: &str, summary: Option<Summary>) {
    match summary {
        Some(s) => {
            let _ = writeln!(
                table,
                "| {label:<58} | {:>5} | {:>8.2} | {:>8.2} | {:>8.2} | {:>8.2} |",
                s.count, s.p50, s.p90, s.p99, s.max
            );
        }
        None => {
            let _ = writeln!(
                table,
                "| {label:<58} | {:>5} | {:>8} | {:>8} | {:>8} | {:>8} |",
                0, "-", "-", "-", "-"
            );
        }
    }
}

fn latency_table(timelines: &Timelines, jobs: &[JobId], raw: &[f64]) -> String {
    let lines: Vec<Timeline> = jobs.iter().filter_map(|j| timelines.get(*j)).collect();
    let series =
        |f: &dyn Fn(&Timeline) -> Option<f64>| -> Vec<f64> { lines.iter().filter_map(f).collect() };
    let put_duration = series(&|t| span_ms(t.put_started, t.put_returned));
    let put_to_upload = series(&|t| span_ms(t.put_started, t.upload_event));
    let upload_to_queued = series(&|t| span_ms(t.upload_event, t.queued));
    let preprocess_total = series(&|t| t.preprocess_total_ms.map(|v| v as f64));
    let preprocess_fetch = series(&|t| t.preprocess_fetch_ms.map(|v| v as f64));
    let preprocess_prepare = series(&|t| t.preprocess_prepare_ms.map(|v| v as f64));
    let upload_to_pulled = series(&|t| span_ms(t.upload_event, t.stand_in_pulled));
    let pulled_to_completed = series(&|t| span_ms(t.stand_in_pulled, t.completed_event));
    let completed_to_notified = series(&|t| span_ms(t.completed_event, t.notified));
    let pipeline = series(&|t| span_ms(t.upload_event, t.notified));
    let put_to_notified = series(&|t| span_ms(t.put_started, t.notified));
    // Upper bound: only preprocess's fetch and pipeline taken out (its S3 PUTs of the prepared
    // images, its two publishes and its KV write stay in).
    let control_plane_upper = series(&|t| {
        Some(
            span_ms(t.upload_event, t.notified)?
                - (t.preprocess_fetch_ms? + t.preprocess_prepare_ms?) as f64,
        )
    });
    // Lower bound: the whole handler taken out (its publishes and KV write too).
    let control_plane =
        series(&|t| Some(span_ms(t.upload_event, t.notified)? - t.preprocess_total_ms? as f64));
    let rows: [(&str, &[f64]); 14] = [
        ("PUT started → PUT returned", &put_duration),
        (
            "PUT started → upload event (SeaweedFS, webhook, ingest)",
            &put_to_upload,
        ),
        (
            "upload event → queued event (preprocess, real work)",
            &upload_to_queued,
        ),
        ("  preprocess handler total_ms (its log)", &preprocess_total),
        ("    of which fetch_ms (S3 HEAD + GET)", &preprocess_fetch),
        (
            "    of which prepare_ms (decode, resize, canny, PNG)",
            &preprocess_prepare,
        ),
        ("upload event → stand-in pulls the job", &upload_to_pulled),
        (
            "stand-in pulls → completed event (KV, started, completed)",
            &pulled_to_completed,
        ),
        (
            "completed event → completed notification (notifier)",
            &completed_to_notified,
        ),
        (
            "**pipeline: upload event → completed notification**",
            &pipeline,
        ),
        ("PUT started → completed notification", &put_to_notified),
        (
            "**control plane A: pipeline − preprocess fetch + prepare**",
            &control_plane_upper,
        ),
        (
            "**control plane B: pipeline − preprocess total_ms**",
            &control_plane,
        ),
        ("**raw JetStream: publish → pull (batch 1) receives**", raw),
    ];

    let mut table = String::new();
    let _ = writeln!(
        table,
        "| {:<58} | {:>5} | {:>8} | {:>8} | {:>8} | {:>8} |",
        "ms", "n", "p50", "p90", "p99", "max"
    );
    let _ = writeln!(
        table,
        "|{}|------:|---------:|---------:|---------:|---------:|",
        "-".repeat(60)
    );
    for (label, samples) in rows {
        row(&mut table, label, summarize(samples));
    }
    let _ = writeln!(table);
    let added = |what: &str, series: &[f64]| -> String {
        match (summarize(series), summarize(raw)) {
            (Some(s), Some(r)) => format!(
                "added ({what} − raw): p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms\n",
                s.p50 - r.p50,
                s.p90 - r.p90,
                s.p99 - r.p99
            ),
            _ => format!("added ({what} − raw): no samples\n"),
        }
    };
    table.push_str(&added("pipeline, preprocess work included", &pipeline));
    table.push_str(&added(
        "control plane A, preprocess fetch + prepare excluded",
        &control_plane_upper,
    ));
    table.push_str(&added(
        "control plane B, preprocess handler excluded",
        &control_plane,
    ));
    table
}

// ---------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------

fn machine_note() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    format!(
        "{cpus} CPUs ({model}), load average {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    )
}

fn memory_table(rows: &[(&str, Vec<Option<Memory>>)], functions: &[Function]) -> String {
    let mib = |kib: u64| kib as f64 / 1024.0;
    let mut table = String::new();
    let _ = write!(table, "| {:<20} |", "process");
    for (label, _) in rows {
        let _ = write!(table, " {label:>22} |");
    }
    let _ = writeln!(table, " {:>22} |", "peak RSS (VmHWM)");
    let _ = write!(table, "|{}|", "-".repeat(22));
    for _ in 0..=rows.len() {
        let _ = write!(table, "{}:|", "-".repeat(23));
    }
    let _ = writeln!(table);
    for (index, function) in functions.iter().enumerate() {
        let _ = write!(table, "| {:<20} |", function.name);
        let mut peak = None;
        for (_, snapshots) in rows {
            match snapshots.get(index).copied().flatten() {
                Some(memory) => {
                    let _ = write!(table, " {:>18.1} MiB |", mib(memory.rss_kib));
                    peak = Some(memory.hwm_kib);
                }
                None => {
                    let _ = write!(table, " {:>22} |", "-");
                }
            }
        }
        match peak {
            Some(kib) => {
                let _ = writeln!(table, " {:>18.1} MiB |", mib(kib));
            }
            None => {
                let _ = writeln!(table, " {:>22} |", "-");
            }
        }
    }
    table
}

fn snapshot(functions: &[Function]) -> Vec<Option<Memory>> {
    functions.iter().map(|f| f.memory().ok()).collect()
}

/// Counts, per job, the `completed` events the events stream stored.
async fn stored_completions(js: &jetstream::Context) -> Result<HashMap<JobId, u32>> {
    let stream = js
        .get_stream(subjects::EVENTS_STREAM)
        .await
        .context("open the events stream")?;
    let consumer: PullConsumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            filter_subject: "darkroom.events.*.completed".to_owned(),
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ack_policy: jetstream::consumer::AckPolicy::None,
            inactive_threshold: Duration::from_secs(60),
            ..Default::default()
        })
        .await
        .context("create a counting consumer")?;
    let mut counts = HashMap::new();
    let mut consumer = consumer;
    let pending = consumer.info().await.context("consumer info")?.num_pending;
    let mut seen = 0u64;
    while seen < pending {
        let mut batch = consumer
            .fetch()
            .max_messages(500)
            .expires(Duration::from_secs(2))
            .messages()
            .await
            .context("fetch completed events")?;
        let before = seen;
        while let Some(message) = batch.next().await {
            let message = message.map_err(|e| anyhow!("fetch: {e}"))?;
            if let Some(job) = lifecycle_job(&message.subject) {
                *counts.entry(job).or_insert(0) += 1;
            }
            seen += 1;
        }
        if seen == before {
            bail!("the events stream stopped after {seen} of {pending} completed events");
        }
    }
    Ok(counts)
}

/// What `jobs` jobs left in each stream and KV bucket, per job and against its bound: the
/// figures behind the sizing table of infra/README.md.
async fn storage_table(
    js: &jetstream::Context,
    topology: &Topology,
    jobs: usize,
) -> Result<String> {
    let mut rows: Vec<(String, i64, Duration)> = topology
        .streams()
        .into_iter()
        .map(|c| (c.name, c.max_bytes, c.max_age))
        .collect();
    rows.extend(
        topology
            .key_values()
            .into_iter()
            .map(|c| (format!("KV_{}", c.bucket), c.max_bytes, c.max_age)),
    );
    let mut table = format!(
        "JetStream storage after {jobs} jobs (the stand-in publishes no `progress`: a real render adds up to 2 a second)\n\n\
         | stream | messages | bytes | bytes per job | max_bytes | jobs it holds | max age |\n\
         |---|---:|---:|---:|---:|---:|---|\n"
    );
    let mut total = 0u64;
    for (name, max_bytes, max_age) in rows {
        let mut stream = js
            .get_stream(&name)
            .await
            .with_context(|| format!("open stream {name}"))?;
        let state = stream.info().await.context("stream info")?.state.clone();
        total += state.bytes;
        let per_job = state.bytes as f64 / jobs.max(1) as f64;
        let holds = if per_job > 0.0 {
            format!("{:.0}", max_bytes as f64 / per_job)
        } else {
            "-".to_owned()
        };
        let age = if name == subjects::JOBS_STREAM {
            "until consumed".to_owned()
        } else if max_age.is_zero() {
            "unlimited".to_owned()
        } else if max_age < Duration::from_secs(86_400) {
            format!("{} s", max_age.as_secs())
        } else {
            format!("{:.1} d", max_age.as_secs_f64() / 86_400.0)
        };
        let _ = writeln!(
            table,
            "| {name} | {} | {} | {per_job:.0} | {max_bytes} | {holds} | {age} |",
            state.messages, state.bytes
        );
    }
    let _ = writeln!(
        table,
        "| all | | {total} | {:.0} | | | |",
        total as f64 / jobs.max(1) as f64
    );
    Ok(table)
}

async fn stream_messages(js: &jetstream::Context, name: &str) -> Result<u64> {
    let mut stream = js
        .get_stream(name)
        .await
        .with_context(|| format!("open stream {name}"))?;
    Ok(stream.info().await.context("stream info")?.state.messages)
}

async fn run(args: Args) -> Result<bool> {
    for name in FUNCTIONS {
        let path = args.bin_dir.join(name);
        if !path.is_file() {
            bail!(
                "{} not found; build the functions first:\n  cargo build --release -p darkroom-ingest \
                 -p darkroom-preprocess -p darkroom-notifier --bins\n(or pass --bin-dir)",
                path.display()
            );
        }
    }
    let log_dir = tempfile::Builder::new()
        .prefix("darkroom-bench-")
        .tempdir()
        .context("create a log folder")?;
    println!(
        "# Darkroom control-plane benchmark\n\n\
         inference: ZERO-COST STAND-IN (this benchmark only): marks the record running, \
         publishes `started` and `completed`, marks it completed, acks; renders and stores nothing.\n\
         functions: {} (logs in {}, kept until the end)\nmachine: {}\n",
        args.bin_dir.display(),
        log_dir.path().display(),
        machine_note()
    );

    let nats = NatsServer::start().await?;
    let ingest_port = darkroom_tests::reserve_port()?;
    let s3_server = S3Server::start(Some(&format!(
        "http://127.0.0.1:{ingest_port}/v1/events/seaweedfs"
    )))
    .await?;
    let s3 = s3_server.client().await;
    darkroom_shared::s3::ensure_bucket(&s3, BUCKET)
        .await
        .context("create the bucket")?;
    let js = nats.jetstream().await?;
    let topology = Topology::default();
    topology.ensure(&js).await.context("ensure the topology")?;

    let timelines = Arc::new(Timelines::default());
    let observer = nats.client().await?;
    observe(&observer, timelines.clone()).await?;

    let mut env: Vec<(&str, String)> = nats.function_env();
    env.extend(s3_server.function_env());
    env.push(("DARKROOM_BUCKET", BUCKET.to_owned()));
    env.push(("DARKROOM_INGEST_LISTEN", format!("127.0.0.1:{ingest_port}")));
    env.push(("DARKROOM_INGEST_RECONCILE_INTERVAL_SECS", "0".to_owned()));
    let mut functions = Vec::new();
    for name in FUNCTIONS {
        let preprocess = (name == "darkroom-preprocess").then(|| timelines.clone());
        functions.push(spawn_function(name, &args, &env, log_dir.path(), preprocess).await?);
    }
    wait_listening(ingest_port).await?;
    wait_consuming(&js, subjects::UPLOADS_STREAM, consumers::PREPROCESS).await?;
    wait_consuming(&js, subjects::EVENTS_STREAM, consumers::NOTIFIER).await?;

    // The stand-in, on the shared consumer loop like the real worker.
    let pulled_timelines = timelines.clone();
    let stand_in = Arc::new(
        InferenceStandIn::new(
            Publisher::new(js.clone(), STAND_IN_SOURCE),
            JobStore::open(&js).await?,
            STAND_IN_WORKER,
        )
        .on_pulled(Arc::new(move |job| {
            let pulled = Instant::now();
            pulled_timelines.update(job, |t| {
                t.stand_in_pulled.get_or_insert(pulled);
                t.stand_in_handled += 1;
            });
        })),
    );
    let stand_in_shutdown = CancellationToken::new();
    let stand_in_task = tokio::spawn(consumer::run(
        stand_in.clone(),
        stand_in.publisher().clone(),
        ConsumerSettings::new(&topology, subjects::JOBS_STREAM, consumers::INFERENCE),
        stand_in_shutdown.clone(),
    ));
    wait_consuming(&js, subjects::JOBS_STREAM, consumers::INFERENCE).await?;

    // The raw anchor's payload: an S3 notification the size of the real ones.
    let sample = ObjectRef {
        etag: Some("0123456789abcdef0123456789abcdef".to_owned()),
        size: Some(100_000),
        ..ObjectRef::new(BUCKET, format!("inbox/{PRESET}/bench-000000.jpg"))
    };
    let payload = serde_json::to_vec(&darkroom_events::S3Notification {
        records: vec![darkroom_events::S3EventRecord::object_created(
            "darkroom:ingest",
            &sample,
            None,
        )],
    })
    .context("encode the raw payload")?;
    let mut raw = RawAnchor::start(js.clone(), payload.into()).await?;

    // Warm-up: connections, caches, the first KV writes.
    println!("warm-up: {WARM_UP_UPLOADS} uploads");
    for index in 0..WARM_UP_UPLOADS {
        let body = photo_jpeg(args.width, args.height, 1_000_000 + index)?;
        let job = put_upload(
            &s3,
            &timelines,
            format!("inbox/{PRESET}/warm-{index:03}.jpg"),
            body,
        )
        .await?;
        timelines.wait_notified(&[job], ONE_JOB_TIMEOUT).await?;
        raw.round_trip().await?;
    }
    let after_warm_up = snapshot(&functions);

    // Phase 1: one upload at a time, raw round trips interleaved.
    println!(
        "phase 1: {} uploads one at a time ({}×{} JPEG, preset {PRESET}), {} raw round trips after each",
        args.uploads, args.width, args.height, args.raw_per_upload
    );
    let mut latency_jobs = Vec::with_capacity(args.uploads);
    let mut raw_samples = Vec::with_capacity(args.uploads * args.raw_per_upload);
    for index in 0..args.uploads {
        let body = photo_jpeg(args.width, args.height, index)?;
        let job = put_upload(
            &s3,
            &timelines,
            format!("inbox/{PRESET}/one-{index:06}.jpg"),
            body,
        )
        .await?;
        timelines.wait_notified(&[job], ONE_JOB_TIMEOUT).await?;
        latency_jobs.push(job);
        for _ in 0..args.raw_per_upload {
            raw_samples.push(raw.round_trip().await?);
        }
        for function in &mut functions {
            function.check_alive()?;
        }
    }
    let after_phase_1 = snapshot(&functions);
    // Preprocess logs its timings after publishing `queued`, so the last line can trail the
    // notification a little.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline
        && latency_jobs.iter().any(|job| {
            timelines
                .get(*job)
                .is_none_or(|t| t.preprocess_total_ms.is_none())
        })
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let latency = latency_table(&timelines, &latency_jobs, &raw_samples);
    println!("\n{latency}");

    // Phase 2: the burst.
    let mut burst_ok = true;
    let mut burst_report = String::new();
    let mut after_burst = Vec::new();
    if args.burst > 0 {
        println!(
            "phase 2: burst of {} uploads, {} PUTs at a time",
            args.burst, args.burst_concurrency
        );
        let bodies = (0..args.burst)
            .map(|index| photo_jpeg(args.width, args.height, 2_000_000 + index))
            .collect::<Result<Vec<_>>>()?;
        let burst_started = Instant::now();
        let puts = futures::stream::iter(bodies.into_iter().enumerate().map(|(index, body)| {
            put_upload(
                &s3,
                &timelines,
                format!("inbox/{PRESET}/burst-{index:06}.jpg"),
                body,
            )
        }))
        .buffer_unordered(args.burst_concurrency)
        .collect::<Vec<_>>()
        .await;
        let burst_jobs = puts.into_iter().collect::<Result<Vec<_>>>()?;
        let puts_done = Instant::now();
        let waited = timelines
            .wait_notified(&burst_jobs, args.burst_timeout)
            .await;
        let last_notified = burst_jobs
            .iter()
            .filter_map(|job| timelines.get(*job).and_then(|t| t.notified))
            .max();
        if let Err(error) = &waited {
            println!("BURST INCOMPLETE: {error}");
        }
        tokio::time::sleep(SETTLE).await;
        after_burst = snapshot(&functions);

        let stored = stored_completions(&js).await?;
        let mut lost = Vec::new();
        let mut doubled_events = Vec::new();
        let mut doubled_notifications = Vec::new();
        let mut failed = 0;
        for job in &burst_jobs {
            let timeline = timelines.get(*job).unwrap_or_default();
            let events = stored.get(job).copied().unwrap_or(0);
            if events == 0 || timeline.notifications_heard == 0 {
                lost.push(*job);
            }
            if events > 1 {
                doubled_events.push(*job);
            }
            if timeline.notifications_heard > 1 {
                doubled_notifications.push(*job);
            }
            failed += timeline.failed_events_heard;
        }
        let dead_letters = stream_messages(&js, subjects::DLQ_STREAM).await?;
        let unique_jobs: std::collections::HashSet<_> = burst_jobs.iter().collect();
        let elapsed = last_notified.map(|t| t.saturating_duration_since(burst_started));
        let mut per_job_e2e = Vec::new();
        for job in &burst_jobs {
            if let Some(ms) = timelines
                .get(*job)
                .and_then(|t| span_ms(t.put_started, t.notified))
            {
                per_job_e2e.push(ms);
            }
        }
        let e2e = summarize(&per_job_e2e);
        let _ = writeln!(
            burst_report,
            "| uploads | distinct jobs | PUT phase s | first PUT → last notification s | jobs/s | \
             lost | doubled completed events | doubled notifications | failed events | dead letters |"
        );
        let _ = writeln!(
            burst_report,
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        let _ = writeln!(
            burst_report,
            "| {} | {} | {:.1} | {} | {} | {} | {} | {} | {} | {} |",
            args.burst,
            unique_jobs.len(),
            puts_done.duration_since(burst_started).as_secs_f64(),
            elapsed.map_or("-".to_owned(), |e| format!("{:.1}", e.as_secs_f64())),
            elapsed.map_or("-".to_owned(), |e| format!(
                "{:.1}",
                burst_jobs.len() as f64 / e.as_secs_f64()
            )),
            lost.len(),
            doubled_events.len(),
            doubled_notifications.len(),
            failed,
            dead_letters
        );
        if let Some(e2e) = e2e {
            let _ = writeln!(
                burst_report,
                "\nper job, PUT started → notification (queueing included): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
                e2e.p50, e2e.p99, e2e.max
            );
        }
        burst_ok = waited.is_ok()
            && lost.is_empty()
            && doubled_events.is_empty()
            && doubled_notifications.is_empty()
            && unique_jobs.len() == burst_jobs.len();
        for (what, jobs) in [
            ("LOST", &lost),
            ("DOUBLED completed event", &doubled_events),
            ("DOUBLED notification", &doubled_notifications),
        ] {
            for job in jobs.iter().take(10) {
                let _ = writeln!(burst_report, "{what}: job {job}");
            }
        }
        let _ = writeln!(
            burst_report,
            "\nexactly-once: {}",
            if burst_ok {
                "OK (every job one completed event, one notification)"
            } else {
                "FAILED"
            }
        );
        println!("\n{burst_report}");
    }

    let mut memory_rows = vec![
        ("RSS after warm-up", after_warm_up),
        ("RSS after phase 1", after_phase_1),
    ];
    if !after_burst.is_empty() {
        memory_rows.push(("RSS after burst", after_burst));
    }
    println!("{}", memory_table(&memory_rows, &functions));
    let jobs = WARM_UP_UPLOADS + args.uploads + args.burst;
    println!("{}", storage_table(&js, &topology, jobs).await?);
    let mut stand_in_handled: BTreeMap<u32, usize> = BTreeMap::new();
    {
        let all = timelines
            .jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for timeline in all.values() {
            *stand_in_handled
                .entry(timeline.stand_in_handled)
                .or_default() += 1;
        }
    }
    println!("stand-in deliveries per job (deliveries: jobs): {stand_in_handled:?}");
    println!("machine at the end: {}", machine_note());

    stand_in_shutdown.cancel();
    let _ = stand_in_task.await;
    drop(functions);
    Ok(burst_ok)
}
