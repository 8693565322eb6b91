//! Darkroom notifier: tells whoever subscribed what became of their photo.
//!
//! Every lifecycle event (`queued`, `started`, `progress`, `completed`, `failed`) on the events
//! stream is
//!
//! - **fanned out** on NATS subjects a user can subscribe to, per job and per bucket and
//!   folder (`darkroom_events::subjects::notify_job_subject`,
//!   `notify_object_subject`, `notify_prefix_filter`), each message once;
//! - **delivered** to the webhook endpoints an operator registered, signed per the Standard
//!   Webhooks spec, retried with backoff and jitter, honouring `Retry-After`, disabled by
//!   `410 Gone`, dead-lettered after the last attempt, and never sent to an address the
//!   network policy refuses.
//!
//! Modules, in the order an event meets them:
//!
//! - [`notice`]: the CloudEvent read, whatever the transport;
//! - [`handler`]: the shared `Handler` (NATS loop and Lambda alike): fan-out, deliveries,
//!   retries and dead letters;
//! - [`ledger`]: what was done, in KV, so redeliveries change nothing;
//! - [`endpoint`]: the registered endpoints (TOML) and their filters;
//! - [`network`]: the SSRF policy and the checking resolver;
//! - [`signature`]: Standard Webhooks signing, and the reference verifier;
//! - [`webhook`]: one HTTP attempt; [`retry`]: backoff and `Retry-After`; [`breaker`]: an
//!   endpoint that keeps failing is cut off for a while;
//! - [`config`], [`service`]: settings and wiring.
//!
//! The crate's `README.md` has the operator's and the receiver's view.

pub mod breaker;
pub mod config;
pub mod endpoint;
pub mod handler;
pub mod ledger;
pub mod network;
pub mod notice;
pub mod retry;
pub mod service;
pub mod signature;
pub mod webhook;

pub use handler::{DeliveryOutcome, NotifierHandler, Report, RetryPolicy};
pub use signature::{WebhookSecret, verify};

/// Metric names of the notifier (besides the shared `darkroom_messages_total` and friends).
pub mod metric {
    /// Counter of events fanned out, label `kind`.
    pub const NOTIFICATIONS: &str = "darkroom_notifications_total";
    /// Counter of webhook attempts, labels `endpoint` and `outcome`
    /// (`delivered`, `gone`, `failed`, `refused`, and `breaker_open` for an attempt not made).
    pub const WEBHOOK_ATTEMPTS: &str = "darkroom_webhook_attempts_total";
    /// Histogram of webhook request time in seconds (sent → answered or failed), label
    /// `endpoint`.
    pub const WEBHOOK_SECONDS: &str = "darkroom_webhook_seconds";
    /// Gauge, label `endpoint`: 1 while the endpoint's circuit breaker is open (its attempts
    /// are deferred), 0 once it closes.
    pub const BREAKER_OPEN: &str = "darkroom_webhook_breaker_open";
}
