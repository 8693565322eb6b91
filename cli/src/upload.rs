//! `darkroom upload FILE --preset NAME [--wait]`: PUT a photo into the inbox and, with `--wait`,
//! follow its job to the result.
//!
//! The job id is known before the upload: it is `JobId::for_object(bucket, key, etag)`, and
//! a single-part PUT's ETag is the MD5 of the body. So the CLI opens its subscription first
//! and uploads second, and cannot miss an event however fast the pipeline is. When the server
//! answers with another ETag (multipart, SSE-KMS), the job id is recomputed from it and the
//! subscription reopened; it delivers everything stored, so nothing is lost then either.
//!
//! Following reads the notifier's fan-out: an ordered consumer on `DARKROOM_NOTIFY` filtered
//! to `darkroom.fanout.job.<job>.>`, delivering everything stored (the stream keeps a day).
//! Every few seconds without news it also reads the job's record in the jobs KV bucket, so a
//! job finishes even when the notifier is not running, and a re-upload of bytes rendered long
//! ago (the same job, nothing new happens) is answered from the record at once.

use std::path::{Path, PathBuf};
use std::time::Duration;

use darkroom_events::JobId;
use darkroom_events::subjects::{self, NOTIFY_STREAM};
use darkroom_shared::jobs::JobStatus;
use futures::StreamExt;
use md5::{Digest, Md5};

use crate::client::Clients;
use crate::error::{CliError, Result};
use crate::event::{Lifecycle, reason_code};
use crate::lookup::{self, JobState, ResultLocation, status_word};
use crate::progress::Progress;

/// How often the record is read while no event arrives.
const RECORD_POLL: Duration = Duration::from_secs(3);

/// Arguments of `darkroom upload`.
#[derive(Debug, Clone, clap::Args)]
pub struct UploadArgs {
    /// The photo (JPEG, PNG or WebP; the type is sniffed from the bytes).
    pub file: PathBuf,
    /// The preset: the folder under the inbox (`profile-warm`, `profile-cool`, `storybook`,
    /// `desk-setup`, or one of the operator's).
    #[arg(long)]
    pub preset: String,
    /// What the photo shows, for the preset's prompt (`x-amz-meta-subject`).
    #[arg(long)]
    pub subject: Option<String>,
    /// Key prefix of the inbox.
    #[arg(long, default_value = "inbox/")]
    pub key_prefix: String,
    /// Follow the job and download its result.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: folder the result goes to, as <job>.png and <job>.json.
    #[arg(long, default_value = ".", requires = "wait")]
    pub out: PathBuf,
    /// With --wait: seconds to wait for the job to finish.
    #[arg(long, default_value_t = 600, requires = "wait")]
    pub timeout: u64,
}

/// The object key of an upload: `<prefix><preset>/<file name>` (a `/` added after a prefix
/// that lacks one).
pub fn object_key(prefix: &str, preset: &str, file: &Path) -> Result<String> {
    if preset.is_empty() || preset.contains('/') {
        return Err(CliError::Usage(format!(
            "--preset {preset:?}: a preset is one folder name, such as profile-warm"
        )));
    }
    let name = file
        .file_name()
        .and_then(|name| name.to_str())
        .ok_or_else(|| {
            CliError::Usage(format!(
                "{}: the file name must be valid UTF-8 to become an object key",
                file.display()
            ))
        })?;
    let mut key = prefix.to_owned();
    if !key.is_empty() && !key.ends_with('/') {
        key.push('/');
    }
    Ok(format!("{key}{preset}/{name}"))
}

/// The ETag S3 gives a single-part upload of `body`: the hex MD5 of the bytes.
pub fn single_part_etag(body: &[u8]) -> String {
    Md5::digest(body)
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Runs `darkroom upload`.
pub async fn run(clients: &mut Clients, args: &UploadArgs) -> Result<()> {
    let key = object_key(&args.key_prefix, &args.preset, &args.file)?;
    let body = std::fs::read(&args.file).map_err(|e| CliError::io(&args.file, e))?;
    let content_type = crate::sniff::content_type(&body);
    let size = body.len();
    let bucket = clients.config.bucket.clone();
    let md5 = single_part_etag(&body);
    let mut job = JobId::for_object(&bucket, &key, &md5);

    if !args.wait {
        let etag = clients
            .upload(&bucket, &key, body, content_type, args.subject.as_deref())
            .await?;
        if let Some(etag) = etag.filter(|etag| *etag != md5) {
            job = JobId::for_object(&bucket, &key, &etag);
        }
        eprintln!("uploaded s3://{bucket}/{key} ({content_type}, {size} bytes)");
        println!("{job}");
        return Ok(());
    }

    let mut progress = Progress::for_stderr();
    // Subscribe first, upload second.
    let mut before = clients.job_record(job).await?;
    let mut follower = Follower::open(clients, job).await?;
    let etag = clients
        .upload(&bucket, &key, body, content_type, args.subject.as_deref())
        .await?;
    if let Some(etag) = etag.filter(|etag| *etag != md5) {
        job = JobId::for_object(&bucket, &key, &etag);
        before = clients.job_record(job).await?;
        follower = Follower::open(clients, job).await?;
    }
    progress.note(&format!(
        "uploaded  s3://{bucket}/{key} ({content_type}, {size} bytes): job {job}"
    ));

    // Identical bytes are the same job: one that finished before will not run again.
    if let Some((record, _)) = &before
        && matches!(record.status, JobStatus::Completed | JobStatus::Failed)
    {
        progress.note(&format!(
            "these bytes were uploaded before as job {job}, which is {}",
            status_word(record.status)
        ));
        let state = JobState::load(clients, job).await?;
        if let Some(location) = state.result() {
            progress.finish();
            return finish(clients, job, &location, &args.out).await;
        }
        progress.finish();
        // A replay only helps when the cause was not the photo itself.
        if record.status == JobStatus::Failed
            && !record
                .failure
                .is_some_and(darkroom_events::FailureReason::lies_in_the_upload)
        {
            eprintln!("hint      retry it with: darkroom replay-dlq --job {job}");
        }
        return Err(state.failure().unwrap_or(CliError::NoResult {
            job,
            status: state.status(),
        }));
    }

    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout);
    let mut last_seen = "nothing yet (are ingest and preprocess running?)".to_owned();
    let mut poll = tokio::time::interval_at(tokio::time::Instant::now() + RECORD_POLL, RECORD_POLL);
    let mut failed_record_seen = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {
                progress.finish();
                return Err(CliError::Timeout { job, seconds: args.timeout, last_seen });
            }
            next = follower.next() => {
                let event = match next {
                    Ok(event) => event,
                    Err(error) => {
                        progress.note(&format!("warning   {error}"));
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                if event.job() != job {
                    continue;
                }
                progress.event(&event);
                last_seen = event.kind().as_str().to_owned();
                match event {
                    Lifecycle::Completed(completed) => {
                        return finish(clients, job, &ResultLocation::of(&completed), &args.out).await;
                    }
                    Lifecycle::Failed(failed) => {
                        return Err(CliError::JobFailed {
                            job,
                            stage: failed.data.stage.to_string(),
                            reason: reason_code(failed.data.reason),
                            message: failed.data.message,
                        });
                    }
                    _ => poll.reset(),
                }
            }
            _ = poll.tick() => {
                let Some((record, _)) = clients.job_record(job).await? else { continue };
                match record.status {
                    JobStatus::Completed => {
                        let state = JobState::load(clients, job).await?;
                        let location = state.result().unwrap_or_else(|| {
                            ResultLocation::conventional(&record.source.bucket, job)
                        });
                        progress.finish();
                        progress.note("completed (from the job record)");
                        return finish(clients, job, &location, &args.out).await;
                    }
                    JobStatus::Failed => {
                        // The record is marked before the failed event is published: give the
                        // event one more round to arrive with its stage and message.
                        let state = JobState::load(clients, job).await?;
                        if state.failed().is_some() || failed_record_seen {
                            progress.finish();
                            if let Some(error) = state.failure() {
                                return Err(error);
                            }
                        }
                        failed_record_seen = true;
                    }
                    status => last_seen = format!("{} (job record)", status_word(status)),
                }
            }
        }
    }
}

/// Downloads the result and prints the image's path on stdout.
async fn finish(
    clients: &mut Clients,
    job: JobId,
    location: &ResultLocation,
    out: &Path,
) -> Result<()> {
    let files = lookup::download(clients, job, location, out).await?;
    eprintln!("metadata  {}", files.metadata.display());
    println!("{}", files.image.display());
    Ok(())
}

/// An ordered consumer on the notifier's stored fan-out of one job.
pub struct Follower {
    messages: async_nats::jetstream::consumer::pull::Ordered,
    url: String,
}

impl Follower {
    /// Opens it on `darkroom.fanout.job.<job>.>`, from the first message stored.
    pub async fn open(clients: &mut Clients, job: JobId) -> Result<Self> {
        let live = subjects::notify_job_filter(job);
        let filter = subjects::notify_stored_subject(&live).unwrap_or(live);
        let consumer = clients.replay_from_start(NOTIFY_STREAM, &filter).await?;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| clients.nats_error(format!("read {NOTIFY_STREAM} ({filter})"), e))?;
        Ok(Follower {
            messages,
            url: clients.config.nats_url.clone(),
        })
    }

    /// The next lifecycle event; messages that are not one are skipped.
    pub async fn next(&mut self) -> Result<Lifecycle> {
        loop {
            let Some(message) = self.messages.next().await else {
                // The ordered consumer ended (the connection closed): nothing more will come.
                std::future::pending::<()>().await;
                continue;
            };
            let message = message.map_err(|e| CliError::Nats {
                url: self.url.clone(),
                operation: format!("follow {NOTIFY_STREAM}"),
                message: e.to_string(),
            })?;
            if let Ok(event) = Lifecycle::parse(&message.payload) {
                return Ok(event);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_prefix_preset_and_file_name() {
        let file = Path::new("/home/me/photos/red flower.jpg");
        assert_eq!(
            object_key("inbox/", "profile-warm", file).unwrap(),
            "inbox/profile-warm/red flower.jpg"
        );
        assert_eq!(
            object_key("inbox", "storybook", file).unwrap(),
            "inbox/storybook/red flower.jpg"
        );
        assert_eq!(object_key("", "p", file).unwrap(), "p/red flower.jpg");
        assert!(object_key("inbox/", "a/b", file).is_err());
        assert!(object_key("inbox/", "", file).is_err());
    }

    #[test]
    fn the_etag_is_the_md5_of_the_body() {
        // RFC 1321 test vectors.
        assert_eq!(single_part_etag(b""), "d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(single_part_etag(b"abc"), "900150983cd24fb0d6963f7d28e17f72");
    }
}
