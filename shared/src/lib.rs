//! The small runtime every Darkroom function stands on.
//!
//! - [`config`]: settings from the environment (`DARKROOM_*`) and an optional TOML file;
//! - [`nats`] and [`topology`]: the connection and every stream, consumer and KV bucket,
//!   ensured idempotently; [`nats_tls`]: the connection's TLS settings, checked at start;
//! - [`s3`]: an S3 client for AWS or any endpoint (path style), and [`fetch`]: objects read
//!   without trusting their size;
//! - [`handler`]: what a function implements, and how its errors map to acknowledgements;
//! - [`consumer`]: the JetStream pull loop that drives a handler;
//! - [`lambda`]: the same handler on AWS Lambda;
//! - [`publish`]: lifecycle events and dead letters;
//! - [`jobs`]: job records in the jobs KV bucket; [`kv`]: typed JSON values in KV buckets; [`png`]: metadata-free PNGs;
//! - [`preset`]: studio presets (plain TOML), built-in and from an operator's directory;
//! - [`workers`]: what each running inference worker can render;
//! - [`telemetry`]: logs, W3C trace context and Prometheus metrics; [`health`]: liveness and
//!   readiness endpoints.

pub mod config;
pub mod consumer;
pub mod fetch;
pub mod handler;
pub mod health;
pub mod jobs;
pub mod kv;
pub mod lambda;
pub mod monitor;
pub mod nats;
pub mod nats_tls;
pub mod png;
pub mod preset;
pub mod publish;
pub mod receipt;
pub mod s3;
pub mod shutdown;
pub mod telemetry;
pub mod topology;
pub mod workers;

pub use config::RuntimeConfig;
pub use handler::{Delivery, ErrorClass, Handler, HandlerError, JobContext};

/// An error and its causes in one line, `a: b: c`, leaving out a cause whose text the line
/// already holds (many errors repeat their source's message).
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Errors of the runtime itself (as opposed to a handler's errors, see [`HandlerError`]).
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// Configuration could not be read or is invalid.
    #[error("configuration: {}", config::describe(.0))]
    Config(#[from] Box<figment::Error>),
    /// Connecting to NATS failed.
    #[error("cannot connect to NATS at {url}: {message}")]
    Connect {
        /// The server URL.
        url: String,
        /// What the client said.
        message: String,
    },
    /// The configured NKey seed cannot be used (missing or unreadable file, a file others may
    /// read, not a user seed, or given two ways).
    #[error("NATS NKey seed from {origin}: {problem}")]
    NkeySeed {
        /// Where the seed was to come from: the file's path, or `DARKROOM_NATS_NKEY_SEED`.
        origin: String,
        /// What is wrong with it.
        problem: nats::NkeyProblem,
    },
    /// A configured NATS TLS file cannot be used (missing, unreadable, not PEM of the right
    /// kind, a key that is not its certificate's, a certificate without its key).
    #[error("NATS TLS: {setting}={path}: {problem}")]
    NatsTls {
        /// The setting that names the file (`DARKROOM_NATS_TLS_CA_FILE`, …).
        setting: &'static str,
        /// The file.
        path: String,
        /// What is wrong with it.
        problem: nats_tls::TlsProblem,
    },
    /// A JetStream request (stream, consumer, KV, publish) failed.
    #[error("JetStream {operation}: {message}")]
    JetStream {
        /// What was being done.
        operation: String,
        /// What the server or client said.
        message: String,
    },
    /// A job record in the KV bucket is not valid JSON of the expected shape.
    #[error("job record {key}: {source}")]
    CorruptRecord {
        /// The KV key.
        key: String,
        /// The decoding error.
        source: serde_json::Error,
    },
    /// The S3 server refused or failed a request.
    #[error("S3: {0}")]
    Storage(String),
    /// Metrics or telemetry could not be set up.
    #[error("telemetry: {0}")]
    Telemetry(String),
    /// A stream or KV bucket is at its size bound and refuses new messages
    /// ([`topology::StorageBounds`]): nothing was dropped; the caller retries later.
    #[error(
        "JetStream {operation}: the stream is full (its max_bytes or max_msgs bound): {message}"
    )]
    StoreFull {
        /// What was being done.
        operation: String,
        /// What the server said.
        message: String,
    },
    /// The handler stopped making progress (the inference worker's watchdog): the message in
    /// hand was handed back and the loop stopped, so a supervisor restarts the process.
    #[error("stalled: {0}")]
    Stalled(String),
}

impl RuntimeError {
    /// Wraps a JetStream client error with what was being done: [`RuntimeError::StoreFull`]
    /// when the server refused it because a stream is at its bound (counted in
    /// `darkroom_store_full_total`), else [`RuntimeError::JetStream`].
    pub fn jetstream(operation: impl Into<String>, error: impl std::fmt::Display) -> Self {
        let operation = operation.into();
        let message = error.to_string();
        if is_store_full(&message) {
            metrics::counter!(telemetry::metric::STORE_FULL).increment(1);
            tracing::error!(%operation, %message, "JetStream store bound reached; refused");
            return RuntimeError::StoreFull { operation, message };
        }
        RuntimeError::JetStream { operation, message }
    }
}

/// Whether a JetStream error says a stream refused a message for its size bounds (discard
/// new): "maximum bytes exceeded", "maximum messages exceeded", or the store's own limit.
fn is_store_full(message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    [
        "maximum bytes exceeded",
        "maximum messages exceeded",
        "insufficient resources",
    ]
    .iter()
    .any(|needle| message.contains(needle))
}

/// Result alias for this crate.
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::error_chain;

    #[derive(Debug, thiserror::Error)]
    #[error("request failed")]
    struct Adds(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("request failed: connection refused")]
    struct Repeats(#[source] std::io::Error);

    #[test]
    fn a_chain_names_each_cause_once() {
        let refused = || std::io::Error::other("connection refused");
        assert_eq!(
            error_chain(&Adds(refused())),
            "request failed: connection refused"
        );
        assert_eq!(
            error_chain(&Repeats(refused())),
            "request failed: connection refused"
        );
    }
}
