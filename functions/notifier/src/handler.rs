//! The notifier function: a lifecycle event in; notification subjects and signed webhooks out.
//!
//! One [`NotifierHandler`] serves both transports: the shared JetStream loop on the events
//! stream (`darkroom-notifier serve`) and the shared Lambda adapter
//! (`darkroom-notifier lambda`, the CloudEvent as the invocation payload or an SQS body). For
//! each event, top to bottom:
//!
//! 1. **read** the CloudEvent ([`Notice`]); anything else is permanent (`invalid_event`);
//! 2. **locate** its upload: from the event, else from the job's record (`started` and
//!    `progress` do not carry it), kept in a small cache;
//! 3. **fan out** on `darkroom.notify.job.<job>.<kind>` and
//!    `darkroom.notify.bucket.<bucket>.<folder>….<kind>` (through the `DARKROOM_NOTIFY` stream,
//!    which stores each `Nats-Msg-Id` once and republishes it), unless the ledger says this
//!    event was already fanned out;
//! 4. **deliver** to every endpoint that wants it, concurrently: skip endpoints disabled by a
//!    410 and deliveries already settled, claim the delivery, POST once, record the outcome.
//!
//! **Retries go through redelivery of the event**, not sleeps in the handler: when an endpoint
//! fails, the handler returns a transient error carrying the delay (exponential backoff with
//! full jitter, at least the receiver's `Retry-After`), the loop naks the message with that
//! delay, and the next delivery tries only the deliveries not yet settled. Each attempt is
//! bounded by the request timeout, so a slow endpoint holds a puller for seconds, never
//! minutes, other events flow meanwhile (several pullers share the consumer), and the message
//! stays in the stream until every endpoint is settled, so nothing is lost if the process dies.
//! On the last attempt (the lesser of `notifier_max_attempts` and the consumer's MaxDeliver)
//! the deliveries still failing are dead-lettered on `darkroom.dlq.notifier` and the event
//! is acknowledged. A refused target (network policy) is not retried: it is dead-lettered with
//! `target_refused` once the event is otherwise settled.
//!
//! The notifier's own failures never produce a job `failed` event: the job did not fail.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use darkroom_events::subjects::{
    lifecycle_subject, notify_job_subject, notify_object_subject, notify_stored_subject,
};
use darkroom_events::{FailureReason, JobId, ObjectRef, Stage};
use darkroom_shared::jobs::JobStore;
use darkroom_shared::publish::{DeadLetter, Publisher};
use darkroom_shared::telemetry::TraceParent;
use darkroom_shared::{Delivery, ErrorClass, Handler, HandlerError, RuntimeError};

use crate::breaker::{Admission, BreakerSettings, Breakers};
use crate::config::NotifierConfig;
use crate::endpoint::{Endpoint, Registry};
use crate::ledger::{Claim, DeliveryState, Ledger, webhook_id};
use crate::metric;
use crate::network::TargetRefused;
use crate::notice::Notice;
use crate::retry::Backoff;
use crate::webhook::{Attempt, WebhookSender};

/// The CloudEvents `source` of everything the notifier publishes.
pub const SOURCE: &str = "/darkroom/notifier";

/// Jobs whose upload is remembered between events.
const SOURCE_CACHE_CAPACITY: usize = 4096;

/// What became of one endpoint's delivery in one handling of an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// Delivered now (2xx).
    Delivered,
    /// Delivered, or gone, on an earlier delivery of the event.
    AlreadySettled,
    /// The endpoint was disabled by an earlier `410 Gone`.
    Disabled,
    /// Answered `410 Gone` now; the endpoint is disabled from here on.
    Gone,
    /// Another worker is sending it until then.
    Busy(DateTime<Utc>),
    /// Failed, or not sent because the endpoint's breaker is open; to be retried.
    Failed {
        /// What went wrong.
        error: String,
        /// The earliest time to try again, if the receiver asked (`Retry-After`) or the
        /// endpoint's breaker is open.
        retry_after: Option<Duration>,
    },
    /// Refused by the network policy; no request was made.
    Refused(TargetRefused),
}

/// What one handling of an event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Whether the fan-out was published now (`false`: an earlier delivery did it).
    pub fanned_out: bool,
    /// Every matching endpoint's outcome, by endpoint id.
    pub deliveries: Vec<(String, DeliveryOutcome)>,
    /// Endpoints dead-lettered now.
    pub dead_lettered: Vec<String>,
}

/// How failed deliveries are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Delay before the next attempt.
    pub backoff: Backoff,
    /// Attempts before a delivery is dead-lettered.
    pub max_attempts: u32,
    /// Longest `Retry-After` honoured.
    pub retry_after_max: Duration,
    /// How long a claimed delivery is kept from other workers.
    pub lease: Duration,
    /// When an endpoint that keeps failing is cut off ([`crate::breaker`]).
    pub breaker: BreakerSettings,
}

impl RetryPolicy {
    /// The policy `config` describes.
    pub fn from_config(config: &NotifierConfig) -> Self {
        RetryPolicy {
            backoff: config.backoff(),
            max_attempts: config.notifier_max_attempts.max(1),
            retry_after_max: config.retry_after_max(),
            lease: config.limits().request_timeout + Duration::from_secs(5),
            breaker: config.breaker(),
        }
    }
}

/// The notifier handler: bus, ledger, job records, endpoints and the HTTP sender.
#[derive(Clone)]
pub struct NotifierHandler {
    publisher: Publisher,
    ledger: Ledger,
    jobs: JobStore,
    registry: Arc<Registry>,
    sender: WebhookSender,
    retry: RetryPolicy,
    breakers: Arc<Breakers>,
    sources: Arc<SourceCache>,
}

impl NotifierHandler {
    /// A handler over these clients. `publisher` should publish as [`SOURCE`].
    pub fn new(
        publisher: Publisher,
        ledger: Ledger,
        jobs: JobStore,
        registry: Registry,
        sender: WebhookSender,
        retry: RetryPolicy,
    ) -> Self {
        NotifierHandler {
            publisher,
            ledger,
            jobs,
            registry: Arc::new(registry),
            sender,
            retry,
            breakers: Arc::new(Breakers::new(retry.breaker)),
            sources: Arc::new(SourceCache::default()),
        }
    }

    /// The publisher, for the transports that report failures with it.
    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    /// The ledger.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Handles one event (see the module docs).
    ///
    /// # Errors
    /// `invalid_event` for a message that is not a lifecycle CloudEvent (permanent); NATS
    /// trouble, or deliveries to retry, as a transient error whose `retry_after` is the delay
    /// before the next attempt.
    pub async fn notify(&self, delivery: &Delivery) -> Result<Report, HandlerError> {
        let notice = Notice::parse(delivery.payload.clone())
            .map_err(|e| HandlerError::permanent(FailureReason::InvalidEvent, e.to_string()))?;
        let source = self.source_of(&notice).await.map_err(runtime_error)?;
        let fanned_out = self
            .fan_out(&notice, source.as_ref(), delivery.traceparent)
            .await
            .map_err(runtime_error)?;

        let endpoints = self.registry.matching(notice.kind, source.as_ref());
        let results = futures::future::join_all(
            endpoints
                .iter()
                .map(|endpoint| self.deliver(endpoint, &notice, delivery.attempt)),
        )
        .await;
        let mut deliveries = Vec::with_capacity(endpoints.len());
        let mut trouble = None;
        for (endpoint, result) in endpoints.iter().zip(results) {
            match result {
                Ok(outcome) => deliveries.push((endpoint.clone(), outcome)),
                Err(error) => trouble = Some(error),
            }
        }
        if let Some(error) = trouble {
            // The ledger or NATS failed for some endpoint: redeliver; settled ones are skipped.
            return Err(runtime_error(error));
        }

        let last = delivery.attempt >= self.retry.max_attempts || delivery.is_last_attempt();
        let failing: Vec<&(Arc<Endpoint>, DeliveryOutcome)> = deliveries
            .iter()
            .filter(|(_, outcome)| matches!(outcome, DeliveryOutcome::Failed { .. }))
            .collect();
        if !failing.is_empty() && !last {
            let delay = self.retry_delay(delivery.attempt, &failing);
            tracing::warn!(
                event = %notice.id,
                failing = failing.len(),
                attempt = delivery.attempt,
                ?delay,
                "webhook deliveries failed; retrying"
            );
            return Err(retry_in(
                delay,
                format!("{} webhook deliveries to retry", failing.len()),
            ));
        }
        let busy_until = deliveries
            .iter()
            .filter_map(|(_, outcome)| match outcome {
                DeliveryOutcome::Busy(until) => Some(*until),
                _ => None,
            })
            .max();
        if let Some(until) = busy_until
            && !last
        {
            // Another worker is sending; come back when its claim lapses, to be sure it did.
            let delay = (until - Utc::now()).to_std().unwrap_or(Duration::ZERO);
            return Err(retry_in(
                delay,
                "a webhook delivery is being sent by another worker".to_owned(),
            ));
        }

        // Settled: dead-letter what failed for good, then acknowledge.
        let mut dead_lettered = Vec::new();
        for (endpoint, outcome) in &deliveries {
            let (reason, text) = match outcome {
                DeliveryOutcome::Refused(refused) => (
                    FailureReason::TargetRefused,
                    format!("target refused: {refused}"),
                ),
                DeliveryOutcome::Failed { error, .. } => (
                    FailureReason::MaxDeliveriesExceeded,
                    format!("gave up after {} attempts; last: {error}", delivery.attempt),
                ),
                _ => continue,
            };
            self.dead_letter(delivery, &notice, endpoint, reason, &text)
                .await
                .map_err(runtime_error)?;
            dead_lettered.push(endpoint.id.clone());
        }
        Ok(Report {
            fanned_out,
            deliveries: deliveries
                .into_iter()
                .map(|(endpoint, outcome)| (endpoint.id.clone(), outcome))
                .collect(),
            dead_lettered,
        })
    }

    /// The upload an event is about: from the event, the cache, or the job's record.
    async fn source_of(&self, notice: &Notice) -> Result<Option<ObjectRef>, RuntimeError> {
        if let Some(source) = &notice.source {
            self.sources.insert(notice.job, source.clone());
            return Ok(Some(source.clone()));
        }
        if let Some(source) = self.sources.get(notice.job) {
            return Ok(Some(source));
        }
        let Some((record, _)) = self.jobs.get(notice.job).await? else {
            tracing::debug!(job = %notice.job, "no job record: announced on the job subject only");
            return Ok(None);
        };
        self.sources.insert(notice.job, record.source.clone());
        Ok(Some(record.source))
    }

    /// Publishes the event on its notification subjects; `false` when the ledger says an
    /// earlier delivery did.
    async fn fan_out(
        &self,
        notice: &Notice,
        source: Option<&ObjectRef>,
        traceparent: Option<TraceParent>,
    ) -> Result<bool, RuntimeError> {
        if self.ledger.fanned_out(&notice.id).await? {
            return Ok(false);
        }
        let mut subjects = vec![("job", notify_job_subject(notice.job, notice.kind))];
        if let Some(source) = source {
            subjects.push((
                "bucket",
                notify_object_subject(&source.bucket, &source.key, notice.kind),
            ));
        }
        for (label, subject) in subjects {
            let stored = notify_stored_subject(&subject).unwrap_or(subject);
            self.publisher
                .publish_deduplicated(
                    stored,
                    &format!("{}:{label}", notice.id),
                    notice.body.clone(),
                    traceparent,
                )
                .await?;
        }
        self.ledger.mark_fanned_out(&notice.id).await?;
        metrics::counter!(metric::NOTIFICATIONS, "kind" => notice.kind.as_str()).increment(1);
        Ok(true)
    }

    /// One attempt at one endpoint, unless it is disabled, settled, claimed elsewhere or cut
    /// off by its breaker.
    async fn deliver(
        &self,
        endpoint: &Endpoint,
        notice: &Notice,
        attempt: u32,
    ) -> Result<DeliveryOutcome, RuntimeError> {
        let webhook_id = webhook_id(&notice.id, &endpoint.id);
        if self.ledger.disabled(endpoint).await?.is_some() {
            return Ok(DeliveryOutcome::Disabled);
        }
        match self
            .ledger
            .claim(&webhook_id, &endpoint.id, self.retry.lease)
            .await?
        {
            Claim::Granted => {}
            Claim::Settled(_) => return Ok(DeliveryOutcome::AlreadySettled),
            Claim::Busy(until) => return Ok(DeliveryOutcome::Busy(until)),
        }
        if let Admission::Open { retry_in, failures } =
            self.breakers.admit(&endpoint.id, Instant::now())
        {
            metrics::counter!(metric::WEBHOOK_ATTEMPTS, "endpoint" => endpoint.id.clone(), "outcome" => "breaker_open")
                .increment(1);
            metrics::gauge!(metric::BREAKER_OPEN, "endpoint" => endpoint.id.clone()).set(1.0);
            let error = format!(
                "not sent: the endpoint failed {failures} attempts in a row and is cut off for {}s more",
                retry_in.as_secs_f64().ceil()
            );
            tracing::debug!(endpoint = %endpoint.id, %webhook_id, event = %notice.id, attempt, %error, "webhook deferred");
            // Writing the record also gives up the claim.
            let state = DeliveryState::Failed {
                attempts: attempt,
                last_error: error.clone(),
            };
            self.ledger.record(&webhook_id, &endpoint.id, state).await?;
            return Ok(DeliveryOutcome::Failed {
                error,
                retry_after: Some(retry_in),
            });
        }
        let sent = Instant::now();
        let result = self.sender.send(endpoint, &webhook_id, &notice.body).await;
        metrics::histogram!(metric::WEBHOOK_SECONDS, "endpoint" => endpoint.id.clone())
            .record(sent.elapsed().as_secs_f64());
        let succeeded = matches!(result, Attempt::Delivered { .. } | Attempt::Gone);
        let now = Instant::now();
        self.breakers.record(&endpoint.id, succeeded, now);
        let open = self.breakers.is_open(&endpoint.id, now);
        metrics::gauge!(metric::BREAKER_OPEN, "endpoint" => endpoint.id.clone()).set(if open {
            1.0
        } else {
            0.0
        });
        let label = match &result {
            Attempt::Delivered { .. } => "delivered",
            Attempt::Gone => "gone",
            Attempt::Failed { .. } => "failed",
            Attempt::Refused(_) => "refused",
        };
        metrics::counter!(metric::WEBHOOK_ATTEMPTS, "endpoint" => endpoint.id.clone(), "outcome" => label)
            .increment(1);
        match result {
            Attempt::Delivered { status } => {
                tracing::info!(endpoint = %endpoint.id, %webhook_id, event = %notice.id, attempt, status, "webhook delivered");
                self.ledger
                    .record(
                        &webhook_id,
                        &endpoint.id,
                        DeliveryState::Delivered { status },
                    )
                    .await?;
                Ok(DeliveryOutcome::Delivered)
            }
            Attempt::Gone => {
                tracing::warn!(endpoint = %endpoint.id, %webhook_id, url = %endpoint.url, "410 Gone: endpoint disabled");
                self.ledger.disable(endpoint, &webhook_id).await?;
                self.ledger
                    .record(&webhook_id, &endpoint.id, DeliveryState::Gone)
                    .await?;
                Ok(DeliveryOutcome::Gone)
            }
            Attempt::Failed {
                status,
                error,
                retry_after,
            } => {
                tracing::warn!(endpoint = %endpoint.id, %webhook_id, event = %notice.id, attempt, ?status, %error, "webhook attempt failed");
                let state = DeliveryState::Failed {
                    attempts: attempt,
                    last_error: error.clone(),
                };
                self.ledger.record(&webhook_id, &endpoint.id, state).await?;
                Ok(DeliveryOutcome::Failed { error, retry_after })
            }
            Attempt::Refused(refused) => {
                tracing::warn!(endpoint = %endpoint.id, %webhook_id, %refused, "webhook target refused");
                let state = DeliveryState::Failed {
                    attempts: attempt,
                    last_error: format!("target refused: {refused}"),
                };
                self.ledger.record(&webhook_id, &endpoint.id, state).await?;
                Ok(DeliveryOutcome::Refused(refused))
            }
        }
    }

    /// Backoff with full jitter for this attempt, but never sooner than any failing
    /// receiver's `Retry-After` (capped).
    fn retry_delay(&self, attempt: u32, failing: &[&(Arc<Endpoint>, DeliveryOutcome)]) -> Duration {
        let jittered = self.retry.backoff.delay(attempt, &mut rand::rng());
        failing
            .iter()
            .filter_map(|(_, outcome)| match outcome {
                DeliveryOutcome::Failed { retry_after, .. } => *retry_after,
                _ => None,
            })
            .map(|asked| asked.min(self.retry.retry_after_max))
            .fold(jittered, Duration::max)
    }

    async fn dead_letter(
        &self,
        delivery: &Delivery,
        notice: &Notice,
        endpoint: &Endpoint,
        reason: FailureReason,
        text: &str,
    ) -> Result<(), RuntimeError> {
        let webhook_id = webhook_id(&notice.id, &endpoint.id);
        tracing::warn!(endpoint = %endpoint.id, %webhook_id, ?reason, error = %text, "webhook dead-lettered");
        self.publisher
            .dead_letter(&DeadLetter {
                stage: Stage::Notifier,
                // The event's own subject, whatever the transport: a replay re-announces it.
                subject: lifecycle_subject(notice.job, notice.kind),
                stream: None,
                sequence: None,
                deliveries: delivery.attempt,
                reason,
                message: format!(
                    "webhook endpoint {} ({}), webhook-id {webhook_id}: {text}",
                    endpoint.id, endpoint.url
                ),
                payload: notice.body.clone(),
            })
            .await?;
        Ok(())
    }
}

fn runtime_error(error: RuntimeError) -> HandlerError {
    HandlerError::transient(FailureReason::Internal, error.to_string())
}

/// A transient error asking the loop to redeliver the event after `delay`.
fn retry_in(delay: Duration, message: String) -> HandlerError {
    HandlerError {
        class: ErrorClass::Transient {
            retry_after: Some(delay),
        },
        reason: FailureReason::MaxDeliveriesExceeded,
        message,
        job: None,
    }
}

impl Handler for NotifierHandler {
    const STAGE: Stage = Stage::Notifier;

    async fn handle(&self, delivery: &Delivery) -> Result<(), HandlerError> {
        self.notify(delivery).await.map(|_| ())
    }
}

/// Uploads of recent jobs, so `progress` events do not each cost a KV read. Bounded; the
/// oldest entries go first.
#[derive(Debug, Default)]
struct SourceCache {
    inner: Mutex<(HashMap<JobId, ObjectRef>, VecDeque<JobId>)>,
}

impl SourceCache {
    fn get(&self, job: JobId) -> Option<ObjectRef> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.0.get(&job).cloned()
    }

    fn insert(&self, job: JobId, source: ObjectRef) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let (map, order) = &mut *inner;
        if map.insert(job, source).is_none() {
            order.push_back(job);
            while order.len() > SOURCE_CACHE_CAPACITY {
                if let Some(oldest) = order.pop_front() {
                    map.remove(&oldest);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_source_cache_forgets_the_oldest_first() {
        let cache = SourceCache::default();
        let jobs: Vec<JobId> = (0..=SOURCE_CACHE_CAPACITY)
            .map(|i| JobId::for_object("b", &format!("k{i}"), "e"))
            .collect();
        for (i, job) in jobs.iter().enumerate() {
            cache.insert(*job, ObjectRef::new("b", format!("k{i}")));
        }
        assert_eq!(cache.get(jobs[0]), None);
        assert_eq!(cache.get(jobs[1]), Some(ObjectRef::new("b", "k1")));
        assert_eq!(
            cache.get(jobs[SOURCE_CACHE_CAPACITY]),
            Some(ObjectRef::new("b", format!("k{SOURCE_CACHE_CAPACITY}")))
        );
    }
}
