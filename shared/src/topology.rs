//! Every stream, consumer and KV bucket Darkroom uses, declared in one place.
//!
//! [`Topology::ensure`] creates what is missing and updates what differs, so functions call it at
//! start-up and the deploy tooling calls it on every rollout; running it twice changes nothing.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};
use darkroom_events::subjects::{self, consumers};

use crate::{Result, RuntimeError};

pub mod diff;

/// Sizes and timings of the topology. `Default` is the production shape on one server.
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    /// Replicas of every stream and bucket (3 on a cluster).
    pub replicas: usize,
    /// JetStream de-duplication window for `Nats-Msg-Id` (default 2 min).
    pub duplicate_window: Duration,
    /// How long upload notifications are kept (default 7 days).
    pub uploads_max_age: Duration,
    /// How long lifecycle events are kept (default 7 days); also how long the notifier
    /// remembers what it delivered.
    pub events_max_age: Duration,
    /// How long the notifier's fan-out is kept for replay (default 1 day).
    pub notify_max_age: Duration,
    /// How long dead letters are kept (default 30 days).
    pub dlq_max_age: Duration,
    /// How long job records are kept (default 30 days).
    pub jobs_kv_max_age: Duration,
    /// Time a consumer has to ack before redelivery; workers send in-progress acks every third
    /// of it (default 60 s).
    pub ack_wait: Duration,
    /// Deliveries before a message is dead-lettered (default 5).
    pub max_deliver: i64,
    /// Deliveries of a lifecycle event to the notifier (default 8): each is one attempt at the
    /// webhooks not yet served, so this caps webhook attempts too.
    pub notifier_max_deliver: i64,
    /// GPU slots of the whole fleet: how many jobs may render at once across every worker
    /// (default 8, the Kubernetes autoscaler's `maxReplicaCount`). Each worker pulls one job
    /// at a time, so the fleet's own size bounds what is in hand; the inference consumer's
    /// `max_ack_pending` is this plus [`INFERENCE_RETRY_HEADROOM`] (see
    /// [`Self::inference_max_ack_pending`]).
    pub inference_slots: i64,
    /// Messages preprocess and notifier may have in flight (default 64).
    pub cpu_max_ack_pending: i64,
    /// Size bounds of every stream and KV bucket (see [`StorageBounds`]).
    pub bounds: StorageBounds,
}

const MIB: i64 = 1 << 20;
const GIB: i64 = 1 << 30;

/// The most bytes each stream and KV bucket may hold, so JetStream's store never fills by
/// itself: beside the max ages, which bound time but not volume. Defaults add up to 14 GiB,
/// inside the 18 GB store of the Kubernetes manifests; `infra/README.md` sizes them by jobs
/// per day.
///
/// What happens at a bound is chosen per stream so that no upload, job or completion is ever
/// dropped silently: the streams of work and outcomes (uploads, jobs, events, dead letters)
/// and the job records refuse new messages (`discard: new`) — the publisher gets
/// [`RuntimeError::StoreFull`], counts `darkroom_store_full_total` and the message is retried
/// or stays where it came from — while the notifier's fan-out, which only keeps replay history
/// (live subscribers get each message as it is stored), drops its oldest. Within the events
/// stream, a job's `progress` events are kept to the last [`EVENTS_PER_SUBJECT`].
#[derive(Debug, Clone, PartialEq)]
pub struct StorageBounds {
    /// `DARKROOM_UPLOADS` (default 1 GiB; refuses new when full).
    pub uploads: i64,
    /// `DARKROOM_JOBS`, the work queue (default 1 GiB; refuses new when full).
    pub jobs_stream: i64,
    /// `DARKROOM_EVENTS` (default 5 GiB; refuses new when full).
    pub events: i64,
    /// `DARKROOM_NOTIFY` (default 2 GiB; drops its oldest when full).
    pub notify: i64,
    /// `DARKROOM_DLQ` (default 1 GiB; refuses new when full).
    pub dlq: i64,
    /// The job records, `darkroom_jobs` (default 3 GiB; refuses new when full).
    pub jobs_kv: i64,
    /// The notifier's ledger, `darkroom_notifier_deliveries` (default 1 GiB).
    pub deliveries_kv: i64,
}

impl Default for StorageBounds {
    fn default() -> Self {
        StorageBounds {
            uploads: GIB,
            jobs_stream: GIB,
            events: 5 * GIB,
            notify: 2 * GIB,
            dlq: GIB,
            jobs_kv: 3 * GIB,
            deliveries_kv: GIB,
        }
    }
}

/// Bytes of each of the small buckets (webhook endpoint state, worker inventories).
pub const SMALL_BUCKET_MAX_BYTES: i64 = 64 * MIB;

/// Messages kept per subject of the events stream: a job's events of one kind. Only
/// `progress` comes near it (at most two a second per render); past it a job's oldest
/// progress events go first. One job's `started` (one per delivery attempt) or any other kind
/// never reaches it.
pub const EVENTS_PER_SUBJECT: i64 = 32;

impl Default for Topology {
    fn default() -> Self {
        const DAY: Duration = Duration::from_secs(24 * 60 * 60);
        Topology {
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            uploads_max_age: 7 * DAY,
            events_max_age: 7 * DAY,
            notify_max_age: DAY,
            dlq_max_age: 30 * DAY,
            jobs_kv_max_age: 30 * DAY,
            ack_wait: Duration::from_secs(60),
            max_deliver: 5,
            notifier_max_deliver: 8,
            inference_slots: 8,
            cpu_max_ack_pending: 64,
            bounds: StorageBounds::default(),
        }
    }
}

/// Jobs that may wait out a retry delay (a `NAK` with a delay, e.g. after an out-of-memory
/// render) on top of the fleet's slots. JetStream counts such a job against the consumer's
/// `max_ack_pending` until it is redelivered; without this headroom a few waiting jobs would
/// take every slot and idle the whole fleet.
pub const INFERENCE_RETRY_HEADROOM: i64 = 64;

impl Topology {
    /// The inference consumer's `max_ack_pending`: one per GPU slot of the fleet, plus
    /// [`INFERENCE_RETRY_HEADROOM`] for jobs waiting out a retry delay. Workers pull one job at
    /// a time (batch 1, the next pull only after the job is settled), so no worker ever holds
    /// more than its slot: the limit only has to be high enough never to idle a worker.
    pub fn inference_max_ack_pending(&self) -> i64 {
        self.inference_slots.max(1) + INFERENCE_RETRY_HEADROOM
    }

    /// The uploads stream: S3 notifications, limits retention.
    pub fn uploads_stream(&self) -> stream::Config {
        self.stream(
            subjects::UPLOADS_STREAM,
            subjects::UPLOADS_SUBJECTS,
            self.uploads_max_age,
            stream::RetentionPolicy::Limits,
            self.bounds.uploads,
        )
    }

    /// The jobs stream: work queue, each job consumed once.
    pub fn jobs_stream(&self) -> stream::Config {
        self.stream(
            subjects::JOBS_STREAM,
            subjects::JOBS_SUBJECTS,
            Duration::ZERO,
            stream::RetentionPolicy::WorkQueue,
            self.bounds.jobs_stream,
        )
    }

    /// The lifecycle events stream.
    pub fn events_stream(&self) -> stream::Config {
        stream::Config {
            max_messages_per_subject: EVENTS_PER_SUBJECT,
            ..self.stream(
                subjects::EVENTS_STREAM,
                subjects::EVENTS_SUBJECTS,
                self.events_max_age,
                stream::RetentionPolicy::Limits,
                self.bounds.events,
            )
        }
    }

    /// The notifier's fan-out: stored from `darkroom.fanout.>` and republished on
    /// `darkroom.notify.>` once stored, so de-duplicated messages never reach subscribers.
    pub fn notify_stream(&self) -> stream::Config {
        stream::Config {
            republish: Some(stream::Republish {
                source: subjects::NOTIFY_STREAM_SUBJECTS.to_owned(),
                destination: subjects::NOTIFY_SUBJECTS.to_owned(),
                headers_only: false,
            }),
            // Replay history only: subscribers get each message as it is stored.
            discard: stream::DiscardPolicy::Old,
            ..self.stream(
                subjects::NOTIFY_STREAM,
                subjects::NOTIFY_STREAM_SUBJECTS,
                self.notify_max_age,
                stream::RetentionPolicy::Limits,
                self.bounds.notify,
            )
        }
    }

    /// The dead-letter stream.
    pub fn dlq_stream(&self) -> stream::Config {
        self.stream(
            subjects::DLQ_STREAM,
            subjects::DLQ_SUBJECTS,
            self.dlq_max_age,
            stream::RetentionPolicy::Limits,
            self.bounds.dlq,
        )
    }

    /// The jobs KV bucket.
    pub fn jobs_kv(&self) -> kv::Config {
        kv::Config {
            bucket: subjects::JOBS_KV.to_owned(),
            description: "Darkroom job records, keyed by job id".to_owned(),
            history: 1,
            max_age: self.jobs_kv_max_age,
            max_bytes: self.bounds.jobs_kv,
            storage: stream::StorageType::File,
            num_replicas: self.replicas,
            ..Default::default()
        }
    }

    /// The notifier's record of fan-outs and webhook deliveries done.
    pub fn notifier_deliveries_kv(&self) -> kv::Config {
        kv::Config {
            bucket: subjects::NOTIFIER_DELIVERIES_KV.to_owned(),
            description: "Darkroom notifier: fan-outs and webhook deliveries done".to_owned(),
            history: 1,
            max_age: self.events_max_age,
            max_bytes: self.bounds.deliveries_kv,
            storage: stream::StorageType::File,
            num_replicas: self.replicas,
            ..Default::default()
        }
    }

    /// Webhook endpoint state (disabled after `410 Gone`), kept until deleted.
    pub fn webhook_endpoints_kv(&self) -> kv::Config {
        kv::Config {
            bucket: subjects::WEBHOOK_ENDPOINTS_KV.to_owned(),
            description: "Darkroom webhook endpoints disabled by a 410 Gone".to_owned(),
            history: 1,
            max_bytes: SMALL_BUCKET_MAX_BYTES,
            storage: stream::StorageType::File,
            num_replicas: self.replicas,
            ..Default::default()
        }
    }

    /// Running inference workers' inventories, forgotten after [`crate::workers::EXPIRY`]
    /// without a refresh.
    pub fn workers_kv(&self) -> kv::Config {
        kv::Config {
            bucket: subjects::WORKERS_KV.to_owned(),
            description: "Darkroom inference workers and the files they can render with".to_owned(),
            history: 1,
            max_age: crate::workers::EXPIRY,
            max_bytes: SMALL_BUCKET_MAX_BYTES,
            storage: stream::StorageType::File,
            num_replicas: self.replicas,
            ..Default::default()
        }
    }

    /// The durable pull consumers: `(stream, config)` pairs.
    pub fn consumers(&self) -> Vec<(&'static str, consumer::pull::Config)> {
        vec![
            (
                subjects::UPLOADS_STREAM,
                self.consumer(consumers::PREPROCESS, self.cpu_max_ack_pending),
            ),
            (
                subjects::JOBS_STREAM,
                self.consumer(consumers::INFERENCE, self.inference_max_ack_pending()),
            ),
            (
                subjects::EVENTS_STREAM,
                self.consumer(consumers::NOTIFIER, self.cpu_max_ack_pending),
            ),
        ]
    }

    /// Every stream, in the order they are ensured.
    pub fn streams(&self) -> Vec<stream::Config> {
        vec![
            self.uploads_stream(),
            self.jobs_stream(),
            self.events_stream(),
            self.notify_stream(),
            self.dlq_stream(),
        ]
    }

    /// Every KV bucket, in the order they are ensured.
    pub fn key_values(&self) -> Vec<kv::Config> {
        vec![
            self.jobs_kv(),
            self.notifier_deliveries_kv(),
            self.webhook_endpoints_kv(),
            self.workers_kv(),
        ]
    }

    /// Creates what is missing and updates what differs, field by field ([`diff`]), in the
    /// order streams, KV buckets, consumers.
    ///
    /// A resource whose update would lose data ([`diff::loses_data`]: fewer replicas, a max age
    /// shorter than its oldest message, …) is left as the server has it, with a warning: only
    /// an operator's `darkroom-infra apply --force` makes such a change, so a function started
    /// with stale settings never shrinks what the operator provisioned.
    pub async fn ensure(&self, js: &jetstream::Context) -> Result<()> {
        for config in self.streams() {
            let name = config.name.clone();
            let operation = || format!("ensure stream {name}");
            match stream_info(js, &name).await? {
                None => {
                    js.create_stream(config)
                        .await
                        .map_err(|e| RuntimeError::jetstream(operation(), e))?;
                }
                Some(info) => {
                    let changes = diff::stream_changes(&config, &info);
                    if update_is_safe(&format!("stream {name}"), &changes) {
                        js.update_stream(config)
                            .await
                            .map_err(|e| RuntimeError::jetstream(operation(), e))?;
                    }
                }
            }
        }
        for config in self.key_values() {
            let name = config.bucket.clone();
            let wanted = diff::kv_stream_config(&config);
            let update = match stream_info(js, &wanted.name).await? {
                None => true,
                Some(info) => update_is_safe(
                    &format!("KV bucket {name}"),
                    &diff::stream_changes(&wanted, &info),
                ),
            };
            if update {
                js.create_or_update_key_value(config)
                    .await
                    .map_err(|e| RuntimeError::jetstream(format!("ensure KV {name}"), e))?;
            }
        }
        for (stream, config) in self.consumers() {
            let name = config.durable_name.clone().unwrap_or_default();
            let update = match consumer_info(js, stream, &name).await? {
                None => true,
                Some(info) => update_is_safe(
                    &format!("consumer {stream}/{name}"),
                    &diff::consumer_changes(&config, &info.config),
                ),
            };
            if update {
                js.create_consumer_on_stream(config, stream)
                    .await
                    .map_err(|e| {
                        RuntimeError::jetstream(format!("ensure consumer {stream}/{name}"), e)
                    })?;
            }
        }
        Ok(())
    }

    /// Checks, reading only, that every stream, KV bucket and consumer exists: what a function
    /// whose NATS user may not change the topology does at start (see
    /// [`crate::RuntimeConfig::jetstream_provision`]). It compares nothing: keeping the
    /// configuration right is the provisioner's job.
    pub async fn check(&self, js: &jetstream::Context) -> Result<()> {
        fn missing(what: String, error: impl std::fmt::Display) -> RuntimeError {
            RuntimeError::jetstream(
                format!("{what} is missing or unreadable (run the provisioner)"),
                error,
            )
        }
        for config in [
            self.uploads_stream(),
            self.jobs_stream(),
            self.events_stream(),
            self.notify_stream(),
            self.dlq_stream(),
        ] {
            js.get_stream(&config.name)
                .await
                .map_err(|e| missing(format!("stream {}", config.name), e))?;
        }
        for config in [
            self.jobs_kv(),
            self.notifier_deliveries_kv(),
            self.webhook_endpoints_kv(),
            self.workers_kv(),
        ] {
            js.get_key_value(&config.bucket)
                .await
                .map_err(|e| missing(format!("KV {}", config.bucket), e))?;
        }
        for (stream, config) in self.consumers() {
            let name = config.durable_name.clone().unwrap_or_default();
            let what = || format!("consumer {stream}/{name}");
            js.get_stream_no_info(stream)
                .await
                .map_err(|e| missing(what(), e))?
                .consumer_info(&name)
                .await
                .map_err(|e| missing(what(), e))?;
        }
        Ok(())
    }

    fn stream(
        &self,
        name: &str,
        subjects: &str,
        max_age: Duration,
        retention: stream::RetentionPolicy,
        max_bytes: i64,
    ) -> stream::Config {
        stream::Config {
            name: name.to_owned(),
            subjects: vec![subjects.to_owned()],
            retention,
            max_age,
            max_bytes,
            // Full: refuse what comes next, never drop what is there (see `StorageBounds`).
            discard: stream::DiscardPolicy::New,
            storage: stream::StorageType::File,
            num_replicas: self.replicas,
            // The server refuses a de-duplication window longer than the max age.
            duplicate_window: if max_age.is_zero() {
                self.duplicate_window
            } else {
                self.duplicate_window.min(max_age)
            },
            ..Default::default()
        }
    }

    /// Handling attempts of each message on durable `consumer`: the notifier's own
    /// [`Self::notifier_max_deliver`], everyone else's [`Self::max_deliver`].
    pub fn attempts(&self, consumer: &str) -> i64 {
        if consumer == consumers::NOTIFIER {
            self.notifier_max_deliver.max(1)
        } else {
            self.max_deliver.max(1)
        }
    }

    /// The server's MaxDeliver for a consumer allowing `attempts` handling attempts: one more,
    /// the settling delivery on which the loop dead-letters a message that was never settled
    /// (see `consumer.rs`), whether or not a consumer was connected when its last attempt died.
    pub fn server_max_deliver(attempts: i64) -> i64 {
        attempts.max(1) + 1
    }

    fn consumer(&self, name: &str, max_ack_pending: i64) -> consumer::pull::Config {
        consumer::pull::Config {
            durable_name: Some(name.to_owned()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: self.ack_wait,
            max_deliver: Self::server_max_deliver(self.attempts(name)),
            max_ack_pending,
            // Batch 1 from the client side too: no message waits in a buffer while its AckWait runs.
            max_batch: 1,
            ..Default::default()
        }
    }
}

/// Whether `changes` should be applied by [`Topology::ensure`]: some, and none losing data
/// (those are logged and left to `darkroom-infra apply --force`).
fn update_is_safe(resource: &str, changes: &[diff::FieldChange]) -> bool {
    if changes.is_empty() {
        return false;
    }
    let refused: Vec<String> = changes
        .iter()
        .filter_map(|change| {
            change
                .data_loss
                .as_ref()
                .map(|why| format!("{change}: {why}"))
        })
        .collect();
    if refused.is_empty() {
        return true;
    }
    tracing::warn!(
        resource,
        refused = %refused.join("; "),
        "left as the server has it: the wanted change would lose data \
         (run `darkroom-infra apply --force` to make it)"
    );
    false
}

/// The server's info on stream `name`, or `None` when it does not exist.
pub async fn stream_info(js: &jetstream::Context, name: &str) -> Result<Option<stream::Info>> {
    match js.get_stream(name).await {
        Ok(stream) => Ok(Some(stream.cached_info().clone())),
        Err(error) => match error.kind() {
            jetstream::context::GetStreamErrorKind::JetStream(inner)
                if inner.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                Ok(None)
            }
            _ => Err(RuntimeError::jetstream(
                format!("stream info {name}"),
                error,
            )),
        },
    }
}

/// The server's info on durable consumer `name` of `stream`, or `None` when it (or its
/// stream) does not exist.
pub async fn consumer_info(
    js: &jetstream::Context,
    stream: &str,
    name: &str,
) -> Result<Option<consumer::Info>> {
    let handle = js
        .get_stream_no_info(stream)
        .await
        .map_err(|e| RuntimeError::jetstream(format!("consumer info {stream}/{name}"), e))?;
    match handle.consumer_info(name).await {
        Ok(info) => Ok(Some(info)),
        Err(error) => match error.kind() {
            jetstream::context::ConsumerInfoErrorKind::NotFound
            | jetstream::context::ConsumerInfoErrorKind::StreamNotFound => Ok(None),
            _ => Err(RuntimeError::jetstream(
                format!("consumer info {stream}/{name}"),
                error,
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stream_and_bucket_has_a_size_bound_and_they_fit_the_kubernetes_store() {
        let topology = Topology::default();
        let mut total = 0;
        for config in topology.streams() {
            assert!(config.max_bytes > 0, "stream {} is unbounded", config.name);
            total += config.max_bytes;
        }
        for config in topology.key_values() {
            assert!(
                config.max_bytes > 0,
                "bucket {} is unbounded",
                config.bucket
            );
            total += config.max_bytes;
        }
        // infra/k8s/base/nats/config.yaml: max_file_store 18GB (decimal), with room to spare.
        assert!(total <= 15 * GIB, "{total} bytes");
    }

    #[test]
    fn only_replay_history_drops_its_oldest() {
        let topology = Topology::default();
        for config in topology.streams() {
            let wanted = if config.name == subjects::NOTIFY_STREAM {
                stream::DiscardPolicy::Old
            } else {
                stream::DiscardPolicy::New
            };
            assert_eq!(config.discard, wanted, "{}", config.name);
        }
        assert_eq!(
            topology.events_stream().max_messages_per_subject,
            EVENTS_PER_SUBJECT
        );
    }
}
