//! `darkroom replay-dlq [--stage S] [--job JOB] [--dry-run]`: puts dead letters back on the
//! subjects they were first published on, and removes them from `DARKROOM_DLQ`.
//!
//! Each dead letter is republished with its payload untouched, its trace context, and a fresh
//! `Nats-Msg-Id`, `replay.<its sequence in DARKROOM_DLQ>`: the original id would be dropped by
//! the target stream's duplicate window, and a stable new one means that a replay interrupted
//! between the publish and the delete, then run again, is dropped as a duplicate instead of
//! making a second message. The dead letter is deleted only once the publish is acknowledged.
//! The functions take a replayed job whose record says `failed` (preprocess moves it back to
//! `queued`).

use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use darkroom_events::s3::{S3Message, parse_s3_message};
use darkroom_events::subjects::{self, DLQ_STREAM, DLQ_SUBJECTS, headers};
use darkroom_events::{JobId, Stage};
use futures::StreamExt;

use crate::client::Clients;
use crate::error::Result;

/// How long to wait for the next dead letter the consumer said was pending.
const NEXT_LETTER_TIMEOUT: Duration = Duration::from_secs(10);

/// A dead letter as read from the stream.
#[derive(Debug, Clone)]
pub struct Letter {
    /// Its sequence in `DARKROOM_DLQ`.
    pub sequence: u64,
    /// Its subject there (`darkroom.dlq.<stage>`).
    pub dlq_subject: String,
    /// Where it was first published (`Darkroom-Original-Subject`).
    pub original_subject: Option<String>,
    /// `Darkroom-Failure-Reason`.
    pub reason: String,
    /// `Darkroom-Failure-Message`.
    pub message: String,
    /// The trace context: the `traceparent` header, else the CloudEvent attribute.
    pub traceparent: Option<String>,
    /// The original payload.
    pub payload: Bytes,
}

impl Letter {
    /// Reads a dead letter's headers.
    pub fn new(
        sequence: u64,
        dlq_subject: &str,
        header_map: Option<&HeaderMap>,
        payload: Bytes,
    ) -> Self {
        let header = |name: &str| {
            header_map
                .and_then(|h| h.get(name))
                .map(|value| value.as_str().to_owned())
        };
        let traceparent = header(headers::TRACEPARENT).or_else(|| {
            serde_json::from_slice::<serde_json::Value>(&payload)
                .ok()
                .and_then(|value| value.get("traceparent")?.as_str().map(str::to_owned))
        });
        Letter {
            sequence,
            dlq_subject: dlq_subject.to_owned(),
            original_subject: header(headers::DLQ_ORIGINAL_SUBJECT),
            reason: header(headers::DLQ_REASON).unwrap_or_else(|| "unknown".to_owned()),
            message: header(headers::DLQ_MESSAGE).unwrap_or_default(),
            traceparent,
            payload,
        }
    }

    /// The stage that gave up on it (the last token of its subject).
    pub fn stage(&self) -> &str {
        self.dlq_subject.rsplit('.').next().unwrap_or_default()
    }

    /// The jobs its payload belongs to: a CloudEvent's job (`subject`, or `data.job_id`), or
    /// the jobs of an S3 notification's records that carry an ETag.
    pub fn jobs(&self) -> Vec<JobId> {
        if let Ok(value) = serde_json::from_slice::<serde_json::Value>(&self.payload)
            && value.get("specversion").is_some()
        {
            let job = value
                .get("data")
                .and_then(|data| data.get("job_id"))
                .or_else(|| value.get("subject"))
                .and_then(|id| id.as_str())
                .and_then(|id| id.parse().ok());
            return job.into_iter().collect();
        }
        match parse_s3_message(&self.payload) {
            Ok(S3Message::Records(records)) => records
                .iter()
                .filter_map(|record| record.object_ref().ok()?.job_id())
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The `Nats-Msg-Id` of its replay: `replay.<sequence>`.
    pub fn replay_id(&self) -> String {
        format!("replay.{}", self.sequence)
    }

    fn describe(&self) -> String {
        let jobs = self.jobs();
        let jobs = if jobs.is_empty() {
            String::new()
        } else {
            let list: Vec<String> = jobs.iter().map(JobId::to_string).collect();
            format!(" job {}", list.join(","))
        };
        format!(
            "dlq#{} {} {}{jobs}: {}",
            self.sequence,
            self.stage(),
            self.reason,
            self.message
        )
    }
}

/// Runs `darkroom replay-dlq`.
pub async fn run(
    clients: &mut Clients,
    stage: Option<Stage>,
    job: Option<JobId>,
    dry_run: bool,
) -> Result<()> {
    let js = clients.jetstream().await?;
    let filter = stage.map_or_else(|| DLQ_SUBJECTS.to_owned(), subjects::dlq_subject);
    let stream = js
        .get_stream_no_info(DLQ_STREAM)
        .await
        .map_err(|e| clients.nats_error(format!("open stream {DLQ_STREAM}"), e))?;
    let mut consumer = clients.replay_from_start(DLQ_STREAM, &filter).await?;
    let pending = consumer
        .info()
        .await
        .map_err(|e| clients.nats_error(format!("consumer info on {DLQ_STREAM}"), e))?
        .num_pending;
    let (mut replayed, mut skipped) = (0u64, 0u64);
    if pending > 0 {
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| clients.nats_error(format!("read {DLQ_STREAM} ({filter})"), e))?;
        loop {
            let next = tokio::time::timeout(NEXT_LETTER_TIMEOUT, messages.next()).await;
            let message = match next {
                Ok(Some(Ok(message))) => message,
                Ok(Some(Err(error))) => {
                    return Err(clients.nats_error(format!("read {DLQ_STREAM}"), error));
                }
                Ok(None) | Err(_) => {
                    return Err(clients.nats_error(
                        format!("read {DLQ_STREAM} ({filter})"),
                        "the dead letters stopped arriving before the last one",
                    ));
                }
            };
            let (sequence, remaining) = match message.info() {
                Ok(info) => (info.stream_sequence, info.pending),
                Err(error) => {
                    return Err(clients.nats_error(format!("read {DLQ_STREAM}"), error));
                }
            };
            let letter = Letter::new(
                sequence,
                message.subject.as_str(),
                message.headers.as_ref(),
                message.payload.clone(),
            );
            if job.is_none_or(|job| letter.jobs().contains(&job)) {
                match replay(clients, &js, &stream, &letter, dry_run).await? {
                    true => replayed += 1,
                    false => skipped += 1,
                }
            }
            if remaining == 0 {
                break;
            }
        }
    }
    let verb = if dry_run { "would replay" } else { "replayed" };
    eprintln!("{verb} {replayed} dead letter(s), skipped {skipped} ({filter})");
    Ok(())
}

/// Replays one letter; `false` when it cannot be (no original subject).
async fn replay(
    clients: &Clients,
    js: &async_nats::jetstream::Context,
    stream: &async_nats::jetstream::stream::Stream<()>,
    letter: &Letter,
    dry_run: bool,
) -> Result<bool> {
    let Some(subject) = &letter.original_subject else {
        println!(
            "skipped   {}: no {} header",
            letter.describe(),
            headers::DLQ_ORIGINAL_SUBJECT
        );
        return Ok(false);
    };
    if dry_run {
        println!("would replay {} → {subject}", letter.describe());
        return Ok(true);
    }
    let mut header_map = HeaderMap::new();
    header_map.insert(headers::MSG_ID, letter.replay_id().as_str());
    if let Some(traceparent) = &letter.traceparent {
        header_map.insert(headers::TRACEPARENT, traceparent.as_str());
    }
    let ack = js
        .publish_with_headers(subject.clone(), header_map, letter.payload.clone())
        .await
        .map_err(|e| clients.nats_error(format!("publish to {subject}"), e))?
        .await
        .map_err(|e| clients.nats_error(format!("ack of publish to {subject}"), e))?;
    stream.delete_message(letter.sequence).await.map_err(|e| {
        clients.nats_error(
            format!("delete dlq#{} from {DLQ_STREAM}", letter.sequence),
            e,
        )
    })?;
    let outcome = if ack.duplicate {
        "already replayed before (dropped as a duplicate)".to_owned()
    } else {
        format!("{} seq {}", ack.stream, ack.sequence)
    };
    println!("replayed  {} → {subject}: {outcome}", letter.describe());
    Ok(true)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use darkroom_events::{ObjectRef, S3EventRecord, S3Notification};

    #[test]
    fn letters_name_their_jobs_and_keep_their_trace() {
        let object = ObjectRef {
            etag: Some("abc".into()),
            ..ObjectRef::new("photos", "inbox/a/x.jpg")
        };
        let notification = S3Notification {
            records: vec![S3EventRecord::object_created(
                "darkroom:ingest",
                &object,
                None,
            )],
        };
        let mut header_map = HeaderMap::new();
        header_map.insert(headers::DLQ_ORIGINAL_SUBJECT, "darkroom.uploads.photos");
        header_map.insert(headers::DLQ_REASON, "object_not_found");
        header_map.insert(
            headers::TRACEPARENT,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        );
        let letter = Letter::new(
            7,
            "darkroom.dlq.preprocess",
            Some(&header_map),
            serde_json::to_vec(&notification).unwrap().into(),
        );
        assert_eq!(letter.jobs(), vec![object.job_id().unwrap()]);
        assert_eq!(letter.stage(), "preprocess");
        assert_eq!(letter.replay_id(), "replay.7");
        assert_eq!(
            letter.original_subject.as_deref(),
            Some("darkroom.uploads.photos")
        );
        assert!(letter.traceparent.is_some());

        let job = JobId::for_object("photos", "k", "e");
        let event = serde_json::json!({
            "specversion": "1.0", "id": "i", "source": "/darkroom/inference",
            "type": "studio.darkroom.job.completed.v1", "subject": job.to_string(),
            "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "data": {"job_id": job.to_string()}
        });
        let letter = Letter::new(8, "darkroom.dlq.notifier", None, event.to_string().into());
        assert_eq!(letter.jobs(), vec![job]);
        assert_eq!(
            letter.traceparent.as_deref(),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        assert!(letter.original_subject.is_none());
        assert!(
            Letter::new(9, "darkroom.dlq.x", None, Bytes::from_static(b"junk"))
                .jobs()
                .is_empty()
        );
    }
}
