//! The JetStream pull loop that drives a [`Handler`].
//!
//! One message at a time: pull a batch of 1 → handle it while sending in-progress acks every
//! third of AckWait → settle it:
//!
//! | outcome | acknowledgement | also |
//! |---|---|---|
//! | handled | `+ACK` (double-acked) | |
//! | transient error, attempts left | `-NAK` with backoff delay | |
//! | transient error, last attempt | `+TERM` | dead letter `max_deliveries_exceeded`, `failed` event |
//! | permanent error | `+TERM` | dead letter with the reason, `failed` event |
//! | handling timeout ran out | as a transient error | "took longer than …" |
//! | shutdown grace ran out | `-NAK` | redelivered to another worker |
//!
//! | handler stalled (watchdog) | `-NAK` | the loop stops; the process exits |
//!
//! A message that is never settled (its worker crashed or hung on each attempt) must still end
//! as a dead letter, even when no consumer is connected at the moment it runs out of attempts.
//! So the server delivers each message once more than it may be handled
//! ([`Topology::server_max_deliver`]): whoever pulls that extra delivery — the next worker to
//! connect, however much later — dead-letters it without handling it. The server's
//! max-deliveries advisory remains a second net for the rare case where that delivery is not
//! settled either.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, consumer::PullConsumer, stream::RetentionPolicy};
use darkroom_events::subjects::headers;
use darkroom_events::{FailureReason, JobFailed};
use futures::StreamExt;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::handler::{Delivery, Handler, HandlerError, JobContext};
use crate::publish::{DeadLetter, Publisher};
use crate::telemetry::{TraceParent, metric};
use crate::topology::Topology;
use crate::{Result, RuntimeError};

/// How the loop pulls and settles messages.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsumerSettings {
    /// Stream to pull from.
    pub stream: String,
    /// Durable consumer on it.
    pub consumer: String,
    /// The consumer's AckWait; in-progress acks go out every third of it.
    pub ack_wait: Duration,
    /// Handling attempts of each message ([`Topology::attempts`]); the server delivers once
    /// more ([`Topology::server_max_deliver`]) so that an unsettled message is dead-lettered.
    pub max_deliver: u32,
    /// How long one pull request waits for a message.
    pub fetch_expires: Duration,
    /// On shutdown, how long the message in hand may still take before it is nak'ed.
    pub shutdown_grace: Duration,
    /// Nak delays by attempt (1st failure → first entry, …; the last repeats).
    pub retry_backoff: Vec<Duration>,
    /// Longest one message may be handled before it is given up and settled as a transient
    /// error (`None`: no limit). Without it a call that never returns would keep the message
    /// in-progress-acked for good.
    pub handling_timeout: Option<Duration>,
    /// The topology whose streams, buckets and bounds the loop's gauges sample
    /// ([`crate::monitor`]).
    pub topology: Topology,
}

impl ConsumerSettings {
    /// Settings matching the consumer `consumer` on `stream` as `topology` declares it.
    pub fn new(topology: &Topology, stream: &str, consumer: &str) -> Self {
        let max_deliver = topology.attempts(consumer);
        ConsumerSettings {
            stream: stream.to_owned(),
            consumer: consumer.to_owned(),
            ack_wait: topology.ack_wait,
            max_deliver: u32::try_from(max_deliver).unwrap_or(u32::MAX),
            fetch_expires: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(30),
            retry_backoff: [1, 5, 15, 30, 60].map(Duration::from_secs).to_vec(),
            handling_timeout: None,
            topology: topology.clone(),
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let index = (attempt.max(1) as usize - 1).min(self.retry_backoff.len().saturating_sub(1));
        self.retry_backoff
            .get(index)
            .copied()
            .unwrap_or(Duration::from_secs(1))
    }
}

/// Runs `handler` over the consumer until `shutdown` fires.
pub async fn run<H: Handler>(
    handler: Arc<H>,
    publisher: Publisher,
    settings: ConsumerSettings,
    shutdown: CancellationToken,
) -> Result<()> {
    let js = publisher.jetstream().clone();
    let consumer: PullConsumer = js
        .get_consumer_from_stream(&settings.consumer, &settings.stream)
        .await
        .map_err(|e| {
            RuntimeError::jetstream(
                format!("open consumer {}/{}", settings.stream, settings.consumer),
                e,
            )
        })?;
    let monitor = tokio::spawn(crate::monitor::run(
        js.clone(),
        settings.topology.clone(),
        settings.stream.clone(),
        settings.consumer.clone(),
        shutdown.clone(),
    ));
    let advisories = tokio::spawn(watch_max_deliveries(
        handler.clone(),
        publisher.clone(),
        settings.clone(),
        shutdown.clone(),
    ));
    tracing::info!(stream = %settings.stream, consumer = %settings.consumer, stage = %H::STAGE, "consuming");

    while !shutdown.is_cancelled() {
        if let Some(why) = handler.stalled() {
            advisories.abort();
            monitor.abort();
            tracing::error!(stage = %H::STAGE, %why, "stalled; consumer stopped");
            return Err(RuntimeError::Stalled(why));
        }
        let pulled = tokio::select! {
            _ = shutdown.cancelled() => break,
            pulled = consumer.batch().max_messages(1).expires(settings.fetch_expires).messages() => pulled,
        };
        let mut batch = match pulled {
            Ok(batch) => batch,
            Err(error) => {
                tracing::warn!(%error, "pull failed; retrying in 1 s");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => None,
                next = batch.next() => next,
            };
            match next {
                None => break,
                Some(Ok(message)) => {
                    process(&*handler, &publisher, &settings, &shutdown, message).await;
                }
                Some(Err(error)) => tracing::debug!(%error, "pull request ended"),
            }
        }
    }
    advisories.abort();
    monitor.abort();
    tracing::info!(stage = %H::STAGE, "consumer stopped");
    Ok(())
}

async fn process<H: Handler>(
    handler: &H,
    publisher: &Publisher,
    settings: &ConsumerSettings,
    shutdown: &CancellationToken,
    message: jetstream::Message,
) {
    let (attempt, sequence) = match message.info() {
        Ok(info) => (
            u32::try_from(info.delivered).unwrap_or(u32::MAX),
            info.stream_sequence,
        ),
        Err(error) => {
            tracing::warn!(%error, subject = %message.subject, "not a JetStream message; dropping");
            let _ = message.ack_with(AckKind::Term).await;
            return;
        }
    };
    let traceparent = message
        .headers
        .as_ref()
        .and_then(|h| h.get(headers::TRACEPARENT))
        .and_then(|v| v.as_str().parse::<TraceParent>().ok())
        .map(|t| t.child());
    let delivery = Delivery {
        subject: message.subject.to_string(),
        payload: message.payload.clone(),
        attempt,
        max_attempts: settings.max_deliver,
        traceparent,
    };
    let trace_id = traceparent.map(|t| t.trace_id_hex()).unwrap_or_default();
    let span = tracing::info_span!("message", stage = %H::STAGE, subject = %delivery.subject, sequence, attempt, trace_id);
    async {
        if attempt > settings.max_deliver {
            let label =
                dead_letter_unsettled(handler, publisher, settings, &message, &delivery, sequence)
                    .await;
            metrics::counter!(metric::MESSAGES, "stage" => H::STAGE.as_str(), "outcome" => label)
                .increment(1);
            return;
        }
        let started = Instant::now();
        let outcome = with_heartbeats(
            within(settings.handling_timeout, handler.handle(&delivery)),
            &message,
            settings.ack_wait / 3,
            shutdown,
            settings.shutdown_grace,
            || handler.stalled().is_some(),
        )
        .await;
        metrics::histogram!(metric::HANDLER_SECONDS, "stage" => H::STAGE.as_str())
            .record(started.elapsed().as_secs_f64());
        let label = match outcome {
            Heartbeats::Finished(Ok(())) => {
                if let Err(error) = message.double_ack().await {
                    tracing::warn!(%error, "ack not confirmed; the message may be redelivered");
                }
                "ok"
            }
            Heartbeats::Finished(Err(error)) => {
                settle_failure(
                    handler, publisher, settings, &message, &delivery, sequence, error,
                )
                .await
            }
            Heartbeats::GraceOver => {
                tracing::warn!("shutdown grace ran out; handing the message back");
                let _ = message.ack_with(AckKind::Nak(None)).await;
                "shutdown"
            }
            Heartbeats::Stalled => {
                tracing::error!("stalled; handing the message back for another consumer");
                let _ = message.ack_with(AckKind::Nak(None)).await;
                "stalled"
            }
        };
        metrics::counter!(metric::MESSAGES, "stage" => H::STAGE.as_str(), "outcome" => label)
            .increment(1);
    }
    .instrument(span)
    .await;
}

async fn settle_failure<H: Handler>(
    handler: &H,
    publisher: &Publisher,
    settings: &ConsumerSettings,
    message: &jetstream::Message,
    delivery: &Delivery,
    sequence: u64,
    error: HandlerError,
) -> &'static str {
    if !error.is_permanent() && !delivery.is_last_attempt() {
        let delay = match error.class {
            crate::ErrorClass::Transient {
                retry_after: Some(delay),
            } => delay,
            _ => settings.backoff(delivery.attempt),
        };
        tracing::warn!(error = %error.message, reason = ?error.reason, ?delay, "transient failure; will retry");
        let _ = message.ack_with(AckKind::Nak(Some(delay))).await;
        return "retried";
    }
    let (reason, text, label) = if error.is_permanent() {
        (error.reason, error.message.clone(), "permanent")
    } else {
        (
            FailureReason::MaxDeliveriesExceeded,
            format!(
                "gave up after {} deliveries: {}",
                delivery.attempt, error.message
            ),
            "dead_lettered",
        )
    };
    tracing::warn!(reason = ?reason, error = %text, "giving up on the message");
    let job = error.job.clone().or_else(|| handler.job_of(delivery));
    let origin = Some((settings.stream.clone(), sequence));
    let retry_in = settings.backoff(delivery.attempt);
    let letter = (origin, reason, text.as_str(), job);
    if terminate_with_dead_letter::<H>(publisher, message, delivery, letter, retry_in).await {
        label
    } else {
        "retried"
    }
}

/// What a dead letter says: where the message came from, why it failed, for people, its job.
type Letter<'a> = (
    Option<(String, u64)>,
    FailureReason,
    &'a str,
    Option<JobContext>,
);

/// Dead-letters `delivery` (with `failed` when it has a job) and terminates its message: `true`.
/// When the dead letter cannot be published the message is handed back after `retry_in`
/// instead, since without its dead letter it would be lost: `false`.
async fn terminate_with_dead_letter<H: Handler>(
    publisher: &Publisher,
    message: &jetstream::Message,
    delivery: &Delivery,
    (origin, reason, text, job): Letter<'_>,
    retry_in: Duration,
) -> bool {
    match give_up(publisher, H::STAGE, delivery, origin, reason, text, job).await {
        Ok(()) => {
            let _ = message.ack_with(AckKind::Term).await;
            true
        }
        Err(error) => {
            tracing::error!(%error, "cannot dead-letter; handing the message back");
            let _ = message.ack_with(AckKind::Nak(Some(retry_in))).await;
            false
        }
    }
}

/// The extra delivery of a message whose every attempt went unsettled (the worker crashed or
/// hung each time): dead-lettered and terminated without being handled.
async fn dead_letter_unsettled<H: Handler>(
    handler: &H,
    publisher: &Publisher,
    settings: &ConsumerSettings,
    message: &jetstream::Message,
    delivery: &Delivery,
    sequence: u64,
) -> &'static str {
    let attempts = settings.max_deliver;
    let text = format!(
        "delivered {attempts} times without being settled (the worker crashed or hung each time)"
    );
    tracing::warn!(%text, "dead-lettering without handling");
    let attempted = Delivery {
        attempt: attempts,
        ..delivery.clone()
    };
    let origin = Some((settings.stream.clone(), sequence));
    let job = handler.job_of(delivery);
    let reason = FailureReason::MaxDeliveriesExceeded;
    let letter = (origin, reason, text.as_str(), job.clone());
    // Handed back on failure: the server's advisory is the last net for this delivery.
    let retry_in = settings.backoff(attempts);
    if !terminate_with_dead_letter::<H>(publisher, message, &attempted, letter, retry_in).await {
        return "retried";
    }
    let mut error = HandlerError::transient(reason, text);
    error.job = job;
    handler.abandoned(&attempted, &error).await;
    "dead_lettered"
}

/// Dead-letters a delivery and, when it belongs to a job, publishes the job's `failed` event.
pub async fn give_up(
    publisher: &Publisher,
    stage: darkroom_events::Stage,
    delivery: &Delivery,
    origin: Option<(String, u64)>,
    reason: FailureReason,
    message: &str,
    job: Option<JobContext>,
) -> Result<()> {
    let (stream, sequence) = match origin {
        Some((stream, sequence)) => (Some(stream), Some(sequence)),
        None => (None, None),
    };
    publisher
        .dead_letter(&DeadLetter {
            stage,
            subject: delivery.subject.clone(),
            stream,
            sequence,
            deliveries: delivery.attempt,
            reason,
            message: message.to_owned(),
            payload: delivery.payload.clone(),
        })
        .await?;
    if let Some(job) = job {
        publisher
            .lifecycle(
                JobFailed {
                    job_id: job.job_id,
                    stage,
                    reason,
                    message: message.to_owned(),
                    attempts: delivery.attempt,
                    source: job.source,
                },
                delivery.traceparent,
            )
            .await?;
    }
    Ok(())
}

/// `work`'s result, or a transient error once `limit` has passed.
async fn within(
    limit: Option<Duration>,
    work: impl Future<Output = Result<(), HandlerError>>,
) -> Result<(), HandlerError> {
    let Some(limit) = limit else {
        return work.await;
    };
    match tokio::time::timeout(limit, work).await {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!(?limit, "handling took too long; giving the message up");
            Err(HandlerError::transient(
                FailureReason::Timeout,
                format!(
                    "handling took longer than {}s (DARKROOM_HANDLING_TIMEOUT_SECS)",
                    limit.as_secs_f64()
                ),
            ))
        }
    }
}

/// How [`with_heartbeats`] ended.
enum Heartbeats<T> {
    /// The work finished with this.
    Finished(T),
    /// Shutdown fired and the grace after it ran out first.
    GraceOver,
    /// The handler reported itself stalled: no in-progress ack was sent after that.
    Stalled,
}

/// Polls `work` to completion, sending an in-progress ack every `every` while `stalled` says
/// no. After `shutdown` fires the work gets `grace` more time.
async fn with_heartbeats<F: Future>(
    work: F,
    message: &jetstream::Message,
    every: Duration,
    shutdown: &CancellationToken,
    grace: Duration,
    stalled: impl Fn() -> bool,
) -> Heartbeats<F::Output> {
    let every = every.max(Duration::from_millis(100));
    tokio::pin!(work);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let deadline = tokio::time::sleep(Duration::MAX / 4);
    tokio::pin!(deadline);
    let mut draining = false;
    loop {
        tokio::select! {
            biased;
            output = &mut work => return Heartbeats::Finished(output),
            _ = ticker.tick() => {
                if stalled() {
                    return Heartbeats::Stalled;
                }
                if let Err(error) = message.ack_with(AckKind::Progress).await {
                    tracing::warn!(%error, "in-progress ack failed");
                }
            }
            _ = shutdown.cancelled(), if !draining => {
                draining = true;
                deadline.as_mut().reset(tokio::time::Instant::now() + grace);
            }
            _ = &mut deadline, if draining => return Heartbeats::GraceOver,
        }
    }
}

/// `$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<stream>.<consumer>` payload (the part we use).
#[derive(Debug, Deserialize)]
struct MaxDeliveriesAdvisory {
    stream: String,
    stream_seq: u64,
    deliveries: u32,
}

/// Dead-letters messages the server gave up redelivering because no worker ever settled them.
async fn watch_max_deliveries<H: Handler>(
    handler: Arc<H>,
    publisher: Publisher,
    settings: ConsumerSettings,
    shutdown: CancellationToken,
) {
    let subject = format!(
        "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.{}",
        settings.stream, settings.consumer
    );
    let client = publisher.jetstream().client();
    // A queue group: with several workers, one of them handles each advisory.
    let mut advisories = match client
        .queue_subscribe(subject.clone(), format!("darkroom-{}", settings.consumer))
        .await
    {
        Ok(subscriber) => subscriber,
        Err(error) => {
            tracing::error!(%error, %subject, "cannot watch max-deliveries advisories");
            return;
        }
    };
    loop {
        let advisory = tokio::select! {
            _ = shutdown.cancelled() => return,
            next = advisories.next() => match next { Some(m) => m, None => return },
        };
        let Ok(advisory) = serde_json::from_slice::<MaxDeliveriesAdvisory>(&advisory.payload)
        else {
            tracing::warn!("unreadable max-deliveries advisory");
            continue;
        };
        if let Err(error) = dead_letter_abandoned(&*handler, &publisher, &advisory).await {
            tracing::error!(%error, sequence = advisory.stream_seq, "cannot dead-letter an abandoned message");
        }
    }
}

async fn dead_letter_abandoned<H: Handler>(
    handler: &H,
    publisher: &Publisher,
    advisory: &MaxDeliveriesAdvisory,
) -> Result<()> {
    let js = publisher.jetstream();
    let stream = js
        .get_stream(&advisory.stream)
        .await
        .map_err(|e| RuntimeError::jetstream(format!("open stream {}", advisory.stream), e))?;
    let stored = stream
        .get_raw_message(advisory.stream_seq)
        .await
        .map_err(|e| RuntimeError::jetstream(format!("read message {}", advisory.stream_seq), e))?;
    let delivery = Delivery {
        subject: stored.subject.to_string(),
        payload: stored.payload.clone(),
        attempt: advisory.deliveries,
        max_attempts: advisory.deliveries,
        traceparent: stored
            .headers
            .get(headers::TRACEPARENT)
            .and_then(|v| v.as_str().parse().ok()),
    };
    let message = format!(
        "delivered {} times without being settled (the worker crashed or hung each time)",
        advisory.deliveries
    );
    tracing::warn!(sequence = advisory.stream_seq, "{message}; dead-lettering");
    give_up(
        publisher,
        H::STAGE,
        &delivery,
        Some((advisory.stream.clone(), advisory.stream_seq)),
        FailureReason::MaxDeliveriesExceeded,
        &message,
        handler.job_of(&delivery),
    )
    .await?;
    // A work queue would keep the message forever; it lives on in the dead-letter stream.
    if stream.cached_info().config.retention == RetentionPolicy::WorkQueue {
        stream
            .delete_message(advisory.stream_seq)
            .await
            .map_err(|e| RuntimeError::jetstream("delete dead-lettered message", e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_then_stays() {
        let settings = ConsumerSettings::new(&Topology::default(), "S", "c");
        assert_eq!(settings.backoff(1), Duration::from_secs(1));
        assert_eq!(settings.backoff(2), Duration::from_secs(5));
        assert_eq!(settings.backoff(50), Duration::from_secs(60));
        assert_eq!(settings.backoff(0), Duration::from_secs(1));
    }

    #[test]
    fn each_consumer_gets_its_own_max_deliver() {
        use darkroom_events::subjects::{self, consumers};
        let topology = Topology {
            max_deliver: 3,
            notifier_max_deliver: 9,
            ..Topology::default()
        };
        let notifier =
            ConsumerSettings::new(&topology, subjects::EVENTS_STREAM, consumers::NOTIFIER);
        assert_eq!(notifier.max_deliver, 9);
        let preprocess =
            ConsumerSettings::new(&topology, subjects::UPLOADS_STREAM, consumers::PREPROCESS);
        assert_eq!(preprocess.max_deliver, 3);
    }
}
