//! NATS subjects, JetStream streams and consumers, the jobs KV bucket and header names.
//!
//! The table in `events/README.md` documents the same names for clients in other languages.

use crate::job::JobId;
use crate::lifecycle::{LifecycleKind, Stage};

/// Stream of S3 event notifications (limits retention).
pub const UPLOADS_STREAM: &str = "DARKROOM_UPLOADS";
/// Subjects of [`UPLOADS_STREAM`].
pub const UPLOADS_SUBJECTS: &str = "darkroom.uploads.>";

/// Subject S3 notifications for `bucket` are published on.
///
/// Bucket names may contain dots, which NATS reads as token separators; they become `_`, a
/// character bucket names cannot contain, so the mapping stays one-to-one.
pub fn uploads_subject(bucket: &str) -> String {
    format!("darkroom.uploads.{}", bucket.replace('.', "_"))
}

/// Work-queue stream of inference jobs.
pub const JOBS_STREAM: &str = "DARKROOM_JOBS";
/// Subjects of [`JOBS_STREAM`].
pub const JOBS_SUBJECTS: &str = "darkroom.jobs.>";
/// Subject of [`crate::InferenceJob`]s.
pub const INFERENCE_JOBS_SUBJECT: &str = "darkroom.jobs.inference";

/// Stream of lifecycle events (limits retention, kept for days).
pub const EVENTS_STREAM: &str = "DARKROOM_EVENTS";
/// Subjects of [`EVENTS_STREAM`].
pub const EVENTS_SUBJECTS: &str = "darkroom.events.>";

/// Subject of a job's lifecycle event: `darkroom.events.<job>.<kind>`.
pub fn lifecycle_subject(job: JobId, kind: LifecycleKind) -> String {
    format!("darkroom.events.{job}.{}", kind.as_str())
}

/// Wildcard for one kind of event of every job: `darkroom.events.*.<kind>`.
pub fn lifecycle_kind_filter(kind: LifecycleKind) -> String {
    format!("darkroom.events.*.{}", kind.as_str())
}

/// Wildcard for every event of one job: `darkroom.events.<job>.*`.
pub fn job_events_filter(job: JobId) -> String {
    format!("darkroom.events.{job}.*")
}

/// Stream that stores the notifier's fan-out (limits retention, kept a day), for replay.
///
/// The notifier publishes on `darkroom.fanout.…` with a `Nats-Msg-Id`; the stream stores each
/// message once and *republishes* it on the matching `darkroom.notify.…` subject. Duplicates
/// are dropped before that republish, so a core-NATS subscriber (`nats sub`) on
/// `darkroom.notify.…` hears each event once, and a JetStream consumer on this stream (filter
/// `darkroom.fanout.…`, the same tokens) can replay what it missed.
pub const NOTIFY_STREAM: &str = "DARKROOM_NOTIFY";
/// Subjects of [`NOTIFY_STREAM`]: what the notifier publishes on.
pub const NOTIFY_STREAM_SUBJECTS: &str = "darkroom.fanout.>";
/// Subjects the stream republishes on, where users subscribe.
pub const NOTIFY_SUBJECTS: &str = "darkroom.notify.>";
/// Folders of an object key that become tokens of its notification subject; deeper folders
/// are left out (an object in `a/b/…/i/j/x.jpg` is announced under its first eight folders).
pub const NOTIFY_MAX_FOLDERS: usize = 8;

const NOTIFY_ROOT: &str = "darkroom.notify.";
const FANOUT_ROOT: &str = "darkroom.fanout.";

/// One subject token for arbitrary text: ASCII letters, digits, `-` and `_` stay, every other
/// byte of its UTF-8 becomes `%XX` (upper-case hex), and the empty string becomes a lone `%`.
///
/// The result never contains `.`, `*`, `>` or white space, and the mapping is one-to-one, so
/// a subscriber can compute the token of any folder name (`red flower` → `red%20flower`,
/// `v1.2` → `v1%2E2`, `日本` → `%E6%97%A5%E6%9C%AC`).
pub fn subject_token(text: &str) -> String {
    if text.is_empty() {
        return "%".to_owned();
    }
    let mut token = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_' {
            token.push(char::from(byte));
        } else {
            token.push_str(&format!("%{byte:02X}"));
        }
    }
    token
}

/// The token of a bucket name: `.` becomes `_` as on the uploads subjects (bucket names cannot
/// contain `_`), then [`subject_token`] escapes anything else.
pub fn bucket_token(bucket: &str) -> String {
    subject_token(&bucket.replace('.', "_"))
}

/// Notification subject of a job's event: `darkroom.notify.job.<job>.<kind>`.
pub fn notify_job_subject(job: JobId, kind: LifecycleKind) -> String {
    format!("{NOTIFY_ROOT}job.{job}.{}", kind.as_str())
}

/// Wildcard for every notification of one job: `darkroom.notify.job.<job>.>` (pass it to
/// [`notify_stored_subject`] to consume [`NOTIFY_STREAM`] instead).
pub fn notify_job_filter(job: JobId) -> String {
    format!("{NOTIFY_ROOT}job.{job}.>")
}

/// Notification subject of an event about an upload `key` in `bucket`:
/// `darkroom.notify.bucket.<bucket>.<folder>….<kind>`, one [`subject_token`] per folder of the
/// key (the file name itself is not a token), at most [`NOTIFY_MAX_FOLDERS`] of them.
///
/// `photos`, `inbox/profile-warm/me.jpg`, `completed` →
/// `darkroom.notify.bucket.photos.inbox.profile-warm.completed`. The kind is always the last
/// token, so `darkroom.notify.bucket.photos.inbox.>` hears everything under `inbox/` and
/// `darkroom.notify.bucket.photos.inbox.*.completed` the results one folder below it.
pub fn notify_object_subject(bucket: &str, key: &str, kind: LifecycleKind) -> String {
    let mut subject = format!("{NOTIFY_ROOT}bucket.{}", bucket_token(bucket));
    for folder in key_folders(key).take(NOTIFY_MAX_FOLDERS) {
        subject.push('.');
        subject.push_str(&subject_token(folder));
    }
    subject.push('.');
    subject.push_str(kind.as_str());
    subject
}

/// Wildcard subject for every notification under a key prefix: `darkroom.notify.bucket.<bucket>.<folder>….>`.
///
/// Only whole folders can be matched by subject: `inbox/profile-warm/` gives
/// `darkroom.notify.bucket.photos.inbox.profile-warm.>`, while a trailing partial name
/// (`inbox/prof`) is dropped, so the filter covers `inbox/` and the subscriber compares
/// `data.source.key` with the full prefix itself. Folders past [`NOTIFY_MAX_FOLDERS`] are
/// dropped the same way.
pub fn notify_prefix_filter(bucket: &str, prefix: &str) -> String {
    let mut filter = format!("{NOTIFY_ROOT}bucket.{}", bucket_token(bucket));
    for folder in key_folders(prefix).take(NOTIFY_MAX_FOLDERS) {
        filter.push('.');
        filter.push_str(&subject_token(folder));
    }
    filter.push_str(".>");
    filter
}

/// The subject a notification is stored under in [`NOTIFY_STREAM`] (`darkroom.fanout.…`) for
/// its `darkroom.notify.…` subject or filter; `None` for any other subject.
pub fn notify_stored_subject(subject: &str) -> Option<String> {
    subject
        .strip_prefix(NOTIFY_ROOT)
        .map(|tail| format!("{FANOUT_ROOT}{tail}"))
}

/// The folders of a key: every `/`-separated part but the last.
fn key_folders(key: &str) -> impl Iterator<Item = &str> {
    let folders = key.rsplit_once('/').map_or("", |(folders, _)| folders);
    folders.split('/').filter(move |_| !folders.is_empty())
}

/// Stream of dead letters: messages that failed for good, with the reason in headers.
pub const DLQ_STREAM: &str = "DARKROOM_DLQ";
/// Subjects of [`DLQ_STREAM`].
pub const DLQ_SUBJECTS: &str = "darkroom.dlq.>";

/// Dead-letter subject of a stage: `darkroom.dlq.<stage>`.
pub fn dlq_subject(stage: Stage) -> String {
    format!("darkroom.dlq.{}", stage.as_str())
}

/// Core-NATS subject that asks workers to cancel a job: `darkroom.control.cancel.<job>`.
pub fn cancel_subject(job: JobId) -> String {
    format!("darkroom.control.cancel.{job}")
}

/// Wildcard for every cancel request: `darkroom.control.cancel.*`.
pub fn cancel_subject_filter() -> String {
    "darkroom.control.cancel.*".to_owned()
}

/// KV bucket of job records, keyed by job id.
pub const JOBS_KV: &str = "darkroom_jobs";

/// KV bucket where the notifier records what it has done, so a redelivered event is not
/// announced or delivered twice: `fanout.<id>` and `webhook.<webhook-id>` (kept as long as the
/// events).
pub const NOTIFIER_DELIVERIES_KV: &str = "darkroom_notifier_deliveries";

/// KV bucket of webhook endpoint state, keyed by endpoint id: an endpoint that answered
/// `410 Gone` is recorded here as disabled (kept until an operator deletes the key).
pub const WEBHOOK_ENDPOINTS_KV: &str = "darkroom_webhook_endpoints";

/// KV bucket of running inference workers' inventories (model, LoRAs, ControlNets, LUTs),
/// keyed by worker; an entry not refreshed for 90 s expires.
pub const WORKERS_KV: &str = "darkroom_workers";

/// Durable consumer names.
pub mod consumers {
    /// Preprocess, on the uploads stream.
    pub const PREPROCESS: &str = "preprocess";
    /// Inference, on the jobs stream.
    pub const INFERENCE: &str = "inference";
    /// Notifier, on the events stream: fan-out to subjects and webhooks.
    pub const NOTIFIER: &str = "notifier";
}

/// Header names Darkroom sets on NATS messages.
pub mod headers {
    /// JetStream de-duplication id.
    pub const MSG_ID: &str = "Nats-Msg-Id";
    /// W3C trace context.
    pub const TRACEPARENT: &str = "traceparent";
    /// Dead letters: subject the message was first published on.
    pub const DLQ_ORIGINAL_SUBJECT: &str = "Darkroom-Original-Subject";
    /// Dead letters: stream the message came from.
    pub const DLQ_ORIGINAL_STREAM: &str = "Darkroom-Original-Stream";
    /// Dead letters: its sequence in that stream.
    pub const DLQ_ORIGINAL_SEQUENCE: &str = "Darkroom-Original-Sequence";
    /// Dead letters: machine-readable reason ([`crate::FailureReason`] in snake case).
    pub const DLQ_REASON: &str = "Darkroom-Failure-Reason";
    /// Dead letters: the error message.
    pub const DLQ_MESSAGE: &str = "Darkroom-Failure-Message";
    /// Dead letters: deliveries made.
    pub const DLQ_DELIVERIES: &str = "Darkroom-Deliveries";
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn dotted_bucket_names_stay_one_token() {
        assert_eq!(uploads_subject("my.photos"), "darkroom.uploads.my_photos");
        assert_eq!(uploads_subject("photos"), "darkroom.uploads.photos");
    }

    #[test]
    fn tokens_escape_everything_a_subject_reserves() {
        assert_eq!(subject_token("profile-warm"), "profile-warm");
        assert_eq!(subject_token("red flower"), "red%20flower");
        assert_eq!(subject_token("v1.2*>"), "v1%2E2%2A%3E");
        assert_eq!(subject_token("日本"), "%E6%97%A5%E6%9C%AC");
        assert_eq!(subject_token("%"), "%25");
        assert_eq!(subject_token(""), "%");
        assert_eq!(bucket_token("studio.photos"), "studio_photos");
    }

    #[test]
    fn object_subjects_have_one_token_per_folder_and_the_kind_last() {
        let kind = LifecycleKind::Completed;
        assert_eq!(
            notify_object_subject("photos", "inbox/profile-warm/me.jpg", kind),
            "darkroom.notify.bucket.photos.inbox.profile-warm.completed"
        );
        assert_eq!(
            notify_object_subject("photos", "me.jpg", kind),
            "darkroom.notify.bucket.photos.completed"
        );
        assert_eq!(
            notify_object_subject("my.photos", "in box/a.b/x", LifecycleKind::Queued),
            "darkroom.notify.bucket.my_photos.in%20box.a%2Eb.queued"
        );
        assert_eq!(
            notify_object_subject("p", "a//x", kind),
            "darkroom.notify.bucket.p.a.%.completed"
        );
        let deep = "1/2/3/4/5/6/7/8/9/10/x.jpg";
        assert_eq!(
            notify_object_subject("p", deep, kind),
            "darkroom.notify.bucket.p.1.2.3.4.5.6.7.8.completed"
        );
    }

    #[test]
    fn prefix_filters_match_whole_folders() {
        assert_eq!(
            notify_prefix_filter("photos", "inbox/profile-warm/"),
            "darkroom.notify.bucket.photos.inbox.profile-warm.>"
        );
        assert_eq!(
            notify_prefix_filter("photos", "inbox/prof"),
            "darkroom.notify.bucket.photos.inbox.>"
        );
        assert_eq!(
            notify_prefix_filter("photos", ""),
            "darkroom.notify.bucket.photos.>"
        );
        let subject = notify_object_subject("photos", "inbox/x/y.jpg", LifecycleKind::Failed);
        let filter = notify_prefix_filter("photos", "inbox/");
        assert!(subject.starts_with(filter.trim_end_matches('>')));
    }

    #[test]
    fn stored_subjects_mirror_the_live_ones() {
        let job = JobId::for_object("b", "k", "e");
        let live = notify_job_subject(job, LifecycleKind::Progress);
        assert_eq!(
            notify_stored_subject(&live).unwrap(),
            format!("darkroom.fanout.job.{job}.progress")
        );
        assert_eq!(notify_stored_subject("darkroom.events.x"), None);
        let filter = notify_job_filter(job);
        assert!(live.starts_with(filter.trim_end_matches('>')));
        assert_eq!(
            notify_stored_subject(&filter).unwrap(),
            format!("darkroom.fanout.job.{job}.>")
        );
    }

    #[test]
    fn lifecycle_subjects_match_the_filter() {
        let job = JobId::for_object("b", "k", "e");
        let subject = lifecycle_subject(job, LifecycleKind::Completed);
        assert_eq!(subject, format!("darkroom.events.{job}.completed"));
        assert!(subject.starts_with(job_events_filter(job).trim_end_matches('*')));
    }
}
