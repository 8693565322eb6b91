//! Logs, W3C trace context and Prometheus metrics.

use std::fmt;
use std::io::IsTerminal;
use std::str::FromStr;

use metrics_exporter_prometheus::PrometheusBuilder;
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, RuntimeConfig};
use crate::{Result, RuntimeError};

/// Metric names, shared by every function.
pub mod metric {
    /// Counter of handled messages, labels `stage` and `outcome`
    /// (`ok`, `permanent`, `retried`, `dead_lettered`, `shutdown`, `stalled`).
    pub const MESSAGES: &str = "darkroom_messages_total";
    /// Histogram of handler time in seconds, label `stage`.
    pub const HANDLER_SECONDS: &str = "darkroom_handler_seconds";
    /// Counter of dead letters published, labels `stage` and `reason`.
    pub const DEAD_LETTERS: &str = "darkroom_dead_letters_total";
    /// Counter of watchdog stalls (the inference worker's engine made no progress for
    /// `DARKROOM_WATCHDOG_SECS`; the process exits right after).
    pub const WATCHDOG_STALLS: &str = "darkroom_watchdog_stalls_total";
    /// Counter of JetStream writes refused because a stream or bucket is at its size bound.
    pub const STORE_FULL: &str = "darkroom_store_full_total";
    /// Gauge of the bytes a stream (or a KV bucket's stream, `KV_<bucket>`) holds, label
    /// `stream`.
    pub const STREAM_BYTES: &str = "darkroom_stream_bytes";
    /// Gauge of the messages a stream holds, label `stream`.
    pub const STREAM_MESSAGES: &str = "darkroom_stream_messages";
    /// Gauge of a stream's `max_bytes` bound, label `stream`.
    pub const STREAM_MAX_BYTES: &str = "darkroom_stream_max_bytes";
    /// Gauge of messages not yet delivered to a consumer (queue lag), label `consumer`.
    pub const CONSUMER_PENDING: &str = "darkroom_consumer_pending";
    /// Gauge of messages delivered and not yet acknowledged, label `consumer`.
    pub const CONSUMER_ACK_PENDING: &str = "darkroom_consumer_ack_pending";
    /// Gauge of messages redelivered at least once, label `consumer`.
    pub const CONSUMER_REDELIVERED: &str = "darkroom_consumer_redelivered";
    /// Gauge: 1 while the inference worker takes jobs (model loaded, consuming), else 0.
    pub const WORKER_READY: &str = "darkroom_worker_ready";
    /// Histogram of the seconds one denoising step took, per rendered job (denoise time over
    /// steps).
    pub const RENDER_STEP_SECONDS: &str = "darkroom_render_step_seconds";
}

/// Installs the global `tracing` subscriber: text or JSON lines on stderr, filtered by
/// `RUST_LOG` when set, else by the configured filter. Safe to call twice.
pub fn init_logging(config: &RuntimeConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log_filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    // A second init (tests, Lambda warm starts) finds a subscriber already set; that is fine.
    let _ = match config.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Buckets of every `*_seconds` histogram: from a 5 ms webhook to a 5 min render, so the
/// dashboard can aggregate quantiles across processes (`histogram_quantile`).
pub const SECONDS_BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// Serves Prometheus metrics on `config.metrics_addr` (`GET /metrics`) when one is set, and
/// registers the shared counters at zero so that dashboards and alert rules find them before
/// the first event (a dead letter, a stall, a refused write) happens.
pub fn init_metrics(config: &RuntimeConfig) -> Result<()> {
    if let Some(addr) = config.metrics_addr {
        PrometheusBuilder::new()
            .with_http_listener(addr)
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Suffix("_seconds".to_owned()),
                &SECONDS_BUCKETS,
            )
            .map_err(|e| RuntimeError::Telemetry(format!("histogram buckets: {e}")))?
            .install()
            .map_err(|e| RuntimeError::Telemetry(format!("metrics on {addr}: {e}")))?;
        for name in [
            metric::MESSAGES,
            metric::DEAD_LETTERS,
            metric::STORE_FULL,
            metric::WATCHDOG_STALLS,
        ] {
            metrics::counter!(name).increment(0);
        }
    }
    Ok(())
}

/// A W3C `traceparent` (<https://www.w3.org/TR/trace-context/#traceparent-header>), carried in
/// NATS headers and CloudEvents so one job's logs share a trace id across functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// 16-byte trace id, never zero.
    pub trace_id: u128,
    /// 8-byte id of the parent span, never zero.
    pub parent_id: u64,
    /// Whether the trace is sampled.
    pub sampled: bool,
}

impl TraceParent {
    /// Starts a new trace.
    pub fn new_root() -> Self {
        TraceParent {
            trace_id: rand::random::<u128>().max(1),
            parent_id: rand::random::<u64>().max(1),
            sampled: true,
        }
    }

    /// The same trace, seen from a new span.
    pub fn child(&self) -> Self {
        TraceParent {
            parent_id: rand::random::<u64>().max(1),
            ..*self
        }
    }

    /// The trace id as 32 hex digits, as logs show it.
    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id,
            self.parent_id,
            u8::from(self.sampled)
        )
    }
}

/// A `traceparent` value that does not follow the W3C format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid traceparent {0:?}")]
pub struct InvalidTraceParent(pub String);

impl FromStr for TraceParent {
    type Err = InvalidTraceParent;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let invalid = || InvalidTraceParent(s.to_owned());
        let parts: Vec<&str> = s.trim().split('-').collect();
        let [version, trace, parent, flags] = parts.as_slice() else {
            return Err(invalid());
        };
        let is_hex = |part: &str, len: usize| {
            part.len() == len && part.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        };
        if !is_hex(version, 2)
            || *version == "ff"
            || !is_hex(trace, 32)
            || !is_hex(parent, 16)
            || !is_hex(flags, 2)
        {
            return Err(invalid());
        }
        let trace_id = u128::from_str_radix(trace, 16).map_err(|_| invalid())?;
        let parent_id = u64::from_str_radix(parent, 16).map_err(|_| invalid())?;
        let flags = u8::from_str_radix(flags, 16).map_err(|_| invalid())?;
        if trace_id == 0 || parent_id == 0 {
            return Err(invalid());
        }
        Ok(TraceParent {
            trace_id,
            parent_id,
            sampled: flags & 1 == 1,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips() {
        let text = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parsed: TraceParent = text.parse().unwrap();
        assert!(parsed.sampled);
        assert_eq!(parsed.to_string(), text);
        let child = parsed.child();
        assert_eq!(child.trace_id, parsed.trace_id);
        assert_ne!(child.parent_id, parsed.parent_id);
    }

    #[test]
    fn malformed_traceparents_are_rejected() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        ] {
            assert!(bad.parse::<TraceParent>().is_err(), "{bad}");
        }
    }
}
