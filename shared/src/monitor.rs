//! JetStream gauges for the operator's dashboard (`infra/grafana/`): every consumer loop samples
//! the streams and buckets of the topology and its own consumer every [`INTERVAL`], so queue lag,
//! dead-letter depth and store use against its bounds come from the functions' own `/metrics`.
//!
//! Several processes export the same stream's gauges; the dashboard takes their `max`.

use std::collections::HashSet;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream;
use tokio_util::sync::CancellationToken;

use crate::telemetry::metric;
use crate::topology::Topology;

/// How often the gauges are sampled.
pub const INTERVAL: Duration = Duration::from_secs(15);

/// Samples the topology's streams and KV buckets, and the consumer `consumer` of `stream`,
/// every [`INTERVAL`] until `shutdown` fires. A stream it cannot read is skipped (logged at
/// debug level): the gauges are for people, never a reason to stop.
pub async fn run(
    js: jetstream::Context,
    topology: Topology,
    stream: String,
    consumer: String,
    shutdown: CancellationToken,
) {
    // One sampler per consumer and process, however many pullers it runs (the notifier's).
    let Some(_sampling) = Sampling::start(&stream, &consumer) else {
        return;
    };
    let mut streams: Vec<(String, i64)> = topology
        .streams()
        .into_iter()
        .map(|c| (c.name, c.max_bytes))
        .collect();
    streams.extend(
        topology
            .key_values()
            .into_iter()
            .map(|c| (format!("KV_{}", c.bucket), c.max_bytes)),
    );
    let mut ticker = tokio::time::interval(INTERVAL);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        for (name, wanted_max) in &streams {
            sample_stream(&js, name, *wanted_max).await;
        }
        sample_consumer(&js, &stream, &consumer).await;
    }
}

async fn sample_stream(js: &jetstream::Context, name: &str, wanted_max: i64) {
    let info = match js.get_stream(name).await {
        Ok(mut stream) => match stream.info().await {
            Ok(info) => info.clone(),
            Err(error) => {
                tracing::debug!(%error, stream = name, "cannot sample the stream");
                return;
            }
        },
        Err(error) => {
            tracing::debug!(%error, stream = name, "cannot sample the stream");
            return;
        }
    };
    let label = name.to_owned();
    metrics::gauge!(metric::STREAM_BYTES, "stream" => label.clone()).set(info.state.bytes as f64);
    metrics::gauge!(metric::STREAM_MESSAGES, "stream" => label.clone())
        .set(info.state.messages as f64);
    // The server's bound when it has one, else the one this function wants.
    let bound = if info.config.max_bytes > 0 {
        info.config.max_bytes
    } else {
        wanted_max
    };
    metrics::gauge!(metric::STREAM_MAX_BYTES, "stream" => label).set(bound as f64);
}

async fn sample_consumer(js: &jetstream::Context, stream: &str, name: &str) {
    let info = match js.get_stream_no_info(stream).await {
        Ok(handle) => handle.consumer_info(name).await,
        Err(error) => {
            tracing::debug!(%error, stream, consumer = name, "cannot sample the consumer");
            return;
        }
    };
    let info = match info {
        Ok(info) => info,
        Err(error) => {
            tracing::debug!(%error, stream, consumer = name, "cannot sample the consumer");
            return;
        }
    };
    let label = name.to_owned();
    metrics::gauge!(metric::CONSUMER_PENDING, "consumer" => label.clone())
        .set(info.num_pending as f64);
    metrics::gauge!(metric::CONSUMER_ACK_PENDING, "consumer" => label.clone())
        .set(info.num_ack_pending as f64);
    metrics::gauge!(metric::CONSUMER_REDELIVERED, "consumer" => label)
        .set(info.num_redelivered as f64);
}

/// The consumers sampled in this process.
static SAMPLED: Mutex<Option<HashSet<(String, String)>>> = Mutex::new(None);

/// This process's sampler of one consumer, while it runs.
struct Sampling((String, String));

impl Sampling {
    /// `None` when the consumer is sampled already.
    fn start(stream: &str, consumer: &str) -> Option<Sampling> {
        let key = (stream.to_owned(), consumer.to_owned());
        let mut sampled = SAMPLED.lock().unwrap_or_else(PoisonError::into_inner);
        let fresh = sampled.get_or_insert_with(HashSet::new).insert(key.clone());
        drop(sampled);
        // Built only when fresh: a `Sampling` dropped here would remove the entry (and lock
        // the set again).
        fresh.then(|| Sampling(key))
    }
}

impl Drop for Sampling {
    fn drop(&mut self) {
        let mut sampled = SAMPLED.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(set) = sampled.as_mut() {
            set.remove(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_sampler_per_consumer_and_process() {
        let first = Sampling::start("S", "c");
        assert!(first.is_some());
        assert!(Sampling::start("S", "c").is_none());
        assert!(Sampling::start("S", "other").is_some());
        drop(first);
        assert!(Sampling::start("S", "c").is_some());
    }
}
