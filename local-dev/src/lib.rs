//! The local stack's own tooling: provisioning and the demo.

use std::time::Duration;

use anyhow::{Context, bail};
use darkroom_events::s3::{S3Message, parse_s3_message};
use darkroom_events::subjects;
use darkroom_events::{CloudEvent, JobCompleted, JobFailed, JobProgress, JobQueued, JobStarted};
use darkroom_shared::RuntimeConfig;
use futures::StreamExt;

/// Ensures every stream, consumer and KV bucket, and the S3 bucket.
pub async fn provision(config: &RuntimeConfig) -> anyhow::Result<()> {
    let nats = darkroom_shared::nats::connect(config, "darkroom-dev").await?;
    let js = async_nats::jetstream::new(nats);
    config.topology().ensure(&js).await?;
    let s3 = darkroom_shared::s3::client(config).await;
    darkroom_shared::s3::ensure_bucket(&s3, &config.bucket).await?;
    println!(
        "provisioned: streams {}, {}, {}, {}, {}; KV {}, {}, {}, {}; bucket {}",
        subjects::UPLOADS_STREAM,
        subjects::JOBS_STREAM,
        subjects::EVENTS_STREAM,
        subjects::NOTIFY_STREAM,
        subjects::DLQ_STREAM,
        subjects::JOBS_KV,
        subjects::NOTIFIER_DELIVERIES_KV,
        subjects::WEBHOOK_ENDPOINTS_KV,
        subjects::WORKERS_KV,
        config.bucket
    );
    Ok(())
}

/// What the demo uploads and how long it waits.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// JPEG to upload; a generated test photo when `None`.
    pub photo: Option<std::path::PathBuf>,
    /// Preset, as the inbox folder (`inbox/<preset>/…`).
    pub preset: String,
    /// How long to wait for the upload's event and for the job to be queued.
    pub timeout: Duration,
    /// How long to wait for the rendered picture once queued.
    pub render_timeout: Duration,
    /// Folder the result is downloaded into.
    pub out: std::path::PathBuf,
}

/// Uploads one photo to the inbox and follows it through the pipeline, as a user subscribed to
/// the job's notifications does: queued, started, progress, then `completed` (printed whole,
/// the result downloaded into [`DemoOptions::out`]) or `failed` (an error).
pub async fn demo(config: &RuntimeConfig, options: &DemoOptions) -> anyhow::Result<()> {
    // Provision when this user may (no authorisation, or the provisioner); otherwise (the
    // operator of the local stack) check that `local-dev/stack start` did.
    if config.jetstream_provision {
        provision(config).await?;
    }
    let nats = darkroom_shared::nats::connect(config, "darkroom-dev").await?;
    if !config.jetstream_provision {
        let js = async_nats::jetstream::new(nats.clone());
        config.topology().check(&js).await?;
    }
    // Subscribe before uploading so nothing can slip past.
    let mut uploads = nats
        .subscribe(subjects::uploads_subject(&config.bucket))
        .await
        .context("subscribe to the uploads subject")?;
    // What a user subscribes to: the notifier's per-job subjects.
    let mut events = nats
        .subscribe("darkroom.notify.job.>")
        .await
        .context("subscribe to the job notifications")?;

    let (body, extension, content_type) = match &options.photo {
        Some(path) => {
            let body = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
            let extension = path
                .extension()
                .and_then(|e| e.to_str())
                .unwrap_or("jpg")
                .to_ascii_lowercase();
            let content_type = match extension.as_str() {
                "png" => "image/png",
                "webp" => "image/webp",
                _ => "image/jpeg",
            };
            (body, extension, content_type)
        }
        None => (demo_photo()?, "jpg".to_owned(), "image/jpeg"),
    };
    let key = format!(
        "inbox/{}/demo-{}.{extension}",
        options.preset,
        chrono::Utc::now().format("%Y%m%dT%H%M%S%.3f")
    );
    let s3 = darkroom_shared::s3::client(config).await;
    let put = s3
        .put_object()
        .bucket(&config.bucket)
        .key(&key)
        .content_type(content_type)
        .body(body.into())
        .send()
        .await
        .map_err(|e| anyhow::anyhow!(aws_sdk_s3::error::DisplayErrorContext(e).to_string()))
        .with_context(|| format!("upload s3://{}/{key}", config.bucket))?;
    println!(
        "uploaded  s3://{}/{key} (ETag {})",
        config.bucket,
        put.e_tag().unwrap_or("?")
    );

    let deadline = tokio::time::Instant::now() + options.timeout;
    let job = loop {
        let message = tokio::time::timeout_at(deadline, uploads.next())
            .await
            .ok()
            .flatten();
        let Some(message) = message else {
            bail!(
                "no S3 event for {key} on {} within {:?}: is darkroom-ingest running and SeaweedFS's webhook pointing at it? (local-dev/stack status)",
                subjects::uploads_subject(&config.bucket),
                options.timeout
            );
        };
        let Ok(S3Message::Records(records)) = parse_s3_message(&message.payload) else {
            continue;
        };
        let Some(record) = records
            .into_iter()
            .find(|r| r.object_ref().is_ok_and(|o| o.key == key))
        else {
            continue;
        };
        let job = record
            .object_ref()?
            .job_id()
            .context("the record carries no ETag, so no job id")?;
        println!(
            "event     {} on {} from {}",
            record.event_name, message.subject, record.event_source
        );
        println!("job       {job}");
        break job;
    };

    let prefix = format!("darkroom.notify.job.{job}.");
    let mut deadline = tokio::time::Instant::now() + options.timeout;
    let mut last_progress = None;
    loop {
        let message = tokio::time::timeout_at(deadline, events.next())
            .await
            .ok()
            .flatten();
        let Some(message) = message else {
            bail!(
                "job {job}: no notification within {:?} of the last one: are darkroom-preprocess, darkroom-inference and darkroom-notifier running? (local-dev/stack status)",
                options.timeout.max(options.render_timeout)
            );
        };
        let Some(kind) = message.subject.as_str().strip_prefix(&prefix) else {
            continue;
        };
        match kind {
            "queued" => {
                let event: CloudEvent<JobQueued> =
                    serde_json::from_slice(&message.payload).context("parse the queued event")?;
                println!(
                    "queued    preset {}: s3://{}/work/{job}/ holds the framed input and its control maps",
                    event.data.preset, config.bucket
                );
                deadline = tokio::time::Instant::now() + options.render_timeout;
            }
            "started" => {
                let event: CloudEvent<JobStarted> =
                    serde_json::from_slice(&message.payload).context("parse the started event")?;
                println!(
                    "started   on worker {} (attempt {})",
                    event.data.worker, event.data.attempt
                );
                deadline = tokio::time::Instant::now() + options.render_timeout;
            }
            "progress" => {
                let event: CloudEvent<JobProgress> =
                    serde_json::from_slice(&message.payload).context("parse a progress event")?;
                let (step, total) = (event.data.step, event.data.total_steps);
                // A line per quarter of the steps is enough for a log.
                let quarter = (step * 4) / total.max(1);
                if last_progress != Some(quarter) || step == total {
                    println!("progress  step {step}/{total}");
                    last_progress = Some(quarter);
                }
                deadline = tokio::time::Instant::now() + options.render_timeout;
            }
            "completed" => {
                let event: CloudEvent<JobCompleted> = serde_json::from_slice(&message.payload)
                    .context("parse the completed event")?;
                let pretty: serde_json::Value = serde_json::from_slice(&message.payload)?;
                println!("completed on {}:", message.subject);
                println!("{}", serde_json::to_string_pretty(&pretty)?);
                let path = download_result(&s3, &event.data, &options.out).await?;
                println!("result    {}", path.display());
                return Ok(());
            }
            "failed" => {
                let event: CloudEvent<JobFailed> =
                    serde_json::from_slice(&message.payload).context("parse the failed event")?;
                bail!(
                    "job {job} failed at {:?}: {:?}, {}",
                    event.data.stage,
                    event.data.reason,
                    event.data.message
                );
            }
            _ => continue,
        }
    }
}

/// Downloads a completed job's picture into `out` as `<job>.png`.
async fn download_result(
    s3: &aws_sdk_s3::Client,
    completed: &JobCompleted,
    out: &std::path::Path,
) -> anyhow::Result<std::path::PathBuf> {
    let result = &completed.result;
    let object = s3
        .get_object()
        .bucket(&result.bucket)
        .key(&result.key)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!(aws_sdk_s3::error::DisplayErrorContext(e).to_string()))
        .with_context(|| format!("download {result}"))?;
    let bytes = object
        .body
        .collect()
        .await
        .with_context(|| format!("read {result}"))?
        .into_bytes();
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    let path = out.join(format!("{}.png", completed.job_id));
    std::fs::write(&path, &bytes).with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

/// A 768×1024 test photo: a warm backdrop and a face-like oval, as a JPEG.
pub fn demo_photo() -> anyhow::Result<Vec<u8>> {
    let (width, height) = (768u32, 1024u32);
    let image = image::RgbImage::from_fn(width, height, |x, y| {
        let (fx, fy) = (x as f32 / width as f32, y as f32 / height as f32);
        let (dx, dy) = ((fx - 0.5) / 0.22, (fy - 0.42) / 0.2);
        if dx * dx + dy * dy < 1.0 {
            image::Rgb([224, 182, 150])
        } else {
            image::Rgb([(90.0 + 80.0 * fy) as u8, (70.0 + 40.0 * fx) as u8, 60])
        }
    });
    let mut jpeg = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut jpeg, image::ImageFormat::Jpeg)
        .context("encode the demo photo")?;
    Ok(jpeg.into_inner())
}
