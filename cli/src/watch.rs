//! `darkroom watch [--prefix P] [--json]`: completion events (`completed`, `failed`) of the
//! bucket or a key prefix, one line each, as they arrive.
//!
//! Subscribes (core NATS) to the notifier's bucket subjects for the prefix
//! ([`notify_prefix_filter`]). Subjects match whole folders only, so the full prefix is
//! compared with each event's `data.source.key` here.

use darkroom_events::LifecycleKind;
use darkroom_events::subjects::notify_prefix_filter;
use futures::StreamExt;

use crate::client::Clients;
use crate::error::Result;
use crate::event::Lifecycle;

/// Runs `darkroom watch` until interrupted.
pub async fn run(clients: &mut Clients, prefix: &str, json: bool) -> Result<()> {
    let bucket = clients.config.bucket.clone();
    let filter = notify_prefix_filter(&bucket, prefix);
    let nats = clients.nats().await?;
    let mut subscription = nats
        .subscribe(filter.clone())
        .await
        .map_err(|e| clients.nats_error(format!("subscribe to {filter}"), e))?;
    // The subscription leaves before the banner; events published once the server has it are
    // all heard (a flush does not wait for the server's acknowledgement).
    nats.flush()
        .await
        .map_err(|e| clients.nats_error(format!("subscribe to {filter}"), e))?;
    eprintln!("watching s3://{bucket}/{prefix}… on {filter} (completed and failed; Ctrl-C stops)");
    while let Some(message) = subscription.next().await {
        if let Some(line) = render(&message.payload, &bucket, prefix, json) {
            println!("{line}");
        }
    }
    Err(clients.nats_error(format!("subscription to {filter}"), "the connection closed"))
}

/// The line printed for a notification, or `None` when it is not a completion event of an
/// upload in `bucket` under `prefix`.
pub fn render(payload: &[u8], bucket: &str, prefix: &str, json: bool) -> Option<String> {
    let event = Lifecycle::parse(payload).ok()?;
    let source = match &event {
        Lifecycle::Completed(e) => Some(&e.data.source),
        Lifecycle::Failed(e) => e.data.source.as_ref(),
        _ => None,
    }?;
    if source.bucket != bucket || !source.key.starts_with(prefix) {
        return None;
    }
    debug_assert!(matches!(
        event.kind(),
        LifecycleKind::Completed | LifecycleKind::Failed
    ));
    if json {
        let text = String::from_utf8_lossy(payload);
        if text.contains('\n') {
            // One event per line, whatever the producer's formatting.
            return serde_json::from_slice::<serde_json::Value>(payload)
                .ok()
                .map(|value| value.to_string());
        }
        return Some(text.into_owned());
    }
    Some(format!(
        "{:<9} {} {}",
        event.kind().as_str(),
        event.job(),
        event.summary()
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use darkroom_events::{
        CloudEvent, FailureReason, JobFailed, JobId, JobQueued, ObjectRef, Stage,
    };

    fn failed(key: &str) -> Vec<u8> {
        let job = JobId::for_object("photos", key, "e");
        CloudEvent::new(
            "id",
            "/darkroom/preprocess",
            JobFailed {
                job_id: job,
                stage: Stage::Preprocess,
                reason: FailureReason::DecodeFailed,
                message: "bad".into(),
                attempts: 1,
                source: Some(ObjectRef::new("photos", key)),
            },
        )
        .to_json()
    }

    #[test]
    fn only_completions_under_the_full_prefix() {
        let inside = failed("inbox/profile-warm/a.jpg");
        let line = render(&inside, "photos", "inbox/prof", false).unwrap();
        assert!(line.starts_with("failed    "), "{line}");
        assert!(
            line.ends_with("at preprocess: decode_failed: bad"),
            "{line}"
        );
        assert_eq!(
            render(&inside, "photos", "inbox/prof", true)
                .unwrap()
                .as_bytes(),
            inside.as_slice()
        );
        // Same folder, but not under the full prefix.
        assert!(
            render(
                &failed("inbox/storybook/a.jpg"),
                "photos",
                "inbox/prof",
                false
            )
            .is_none()
        );
        assert!(render(&inside, "other", "", false).is_none());
        let queued = CloudEvent::new(
            "id",
            "/darkroom/preprocess",
            JobQueued {
                job_id: JobId::for_object("photos", "inbox/a/b.jpg", "e"),
                source: ObjectRef::new("photos", "inbox/a/b.jpg"),
                preset: "a".into(),
            },
        );
        assert!(render(&queued.to_json(), "photos", "", false).is_none());
    }
}
