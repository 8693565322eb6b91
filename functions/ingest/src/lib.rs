//! Ingest: the S3-event adapter.
//!
//! S3 servers announce uploads in their own ways; Darkroom's uploads stream takes one: standard
//! S3 event records (`Records[]`). This function turns SeaweedFS filer webhooks and S3-records
//! webhooks into those records ([`webhook`]), publishes each object version once ([`relay`]),
//! and lists the inbox to catch what the S3 side dropped ([`reconcile`]).

/// Ingest's Prometheus metrics.
pub mod metric {
    /// Counter of announced objects, labels `source` (`webhook`, `reconciler`) and `outcome`
    /// (`published`, `duplicate`, `ignored`).
    pub const OBJECTS: &str = "darkroom_ingest_objects_total";
}

pub mod reconcile;
pub mod relay;
pub mod seaweedfs;
pub mod webhook;

use std::net::SocketAddr;
use std::time::Duration;

use darkroom_shared::RuntimeConfig;
use darkroom_shared::jobs::JobStore;
use darkroom_shared::publish::Publisher;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::relay::UploadRelay;
use crate::webhook::WebhookState;

/// Ingest's settings (`DARKROOM_*` variables or the config file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct IngestConfig {
    /// Settings every function shares.
    #[serde(flatten)]
    pub runtime: RuntimeConfig,
    /// Address the webhook listens on (`DARKROOM_INGEST_LISTEN`, default `127.0.0.1:8280`).
    pub ingest_listen: SocketAddr,
    /// Key prefix of uploads (`DARKROOM_INGEST_INBOX_PREFIX`, default `inbox/`).
    pub ingest_inbox_prefix: String,
    /// Seconds between reconciliation passes; 0 runs only the pass at start
    /// (`DARKROOM_INGEST_RECONCILE_INTERVAL_SECS`, default 60).
    pub ingest_reconcile_interval_secs: u64,
    /// Largest webhook body accepted, in bytes (default 1 MiB).
    pub ingest_max_body_bytes: usize,
    /// How far before the newest object of its previous sweep the reconciler examines again,
    /// in seconds (`DARKROOM_INGEST_RECONCILE_MARGIN_SECS`, default 900): room for clock skew
    /// and for uploads that become visible after their modification time.
    pub ingest_reconcile_margin_secs: u64,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            runtime: RuntimeConfig::default(),
            ingest_listen: SocketAddr::from(([127, 0, 0, 1], 8280)),
            ingest_inbox_prefix: "inbox/".to_owned(),
            ingest_reconcile_interval_secs: 60,
            ingest_max_body_bytes: 1 << 20,
            ingest_reconcile_margin_secs: 900,
        }
    }
}

/// Ingest's errors.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// A webhook body that is not what its route takes. Not retryable.
    #[error("bad payload: {0}")]
    BadPayload(String),
    /// The S3 server failed or is unreachable. Retryable.
    #[error("storage: {0}")]
    Storage(String),
    /// NATS or JetStream failed. Retryable.
    #[error(transparent)]
    Runtime(#[from] darkroom_shared::RuntimeError),
}

/// Result alias for this crate.
pub type Result<T, E = IngestError> = std::result::Result<T, E>;

/// Connects, ensures the topology, then serves the webhook on `config.ingest_listen` and runs
/// the reconciler until `shutdown` fires.
pub async fn run(config: IngestConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.ingest_listen).await?;
    serve(config, listener, shutdown).await
}

/// [`run`] on a listener the caller bound (tests bind port 0 and read the port first).
pub async fn serve(
    config: IngestConfig,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let relay = connect(&config).await?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, bucket = %config.runtime.bucket, "ingest webhook listening");
    let reconciler = tokio::spawn(reconcile_periodically(
        relay.clone(),
        config.runtime.bucket.clone(),
        Duration::from_secs(config.ingest_reconcile_interval_secs),
        chrono::TimeDelta::seconds(
            i64::try_from(config.ingest_reconcile_margin_secs).unwrap_or(i64::MAX / 1000),
        ),
        shutdown.clone(),
    ));
    let app = webhook::router(
        WebhookState {
            relay,
            bucket: config.runtime.bucket.clone(),
        },
        config.ingest_max_body_bytes,
    );
    let serve_shutdown = shutdown.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { serve_shutdown.cancelled().await })
        .await?;
    reconciler.abort();
    Ok(())
}

/// Connects to NATS and S3, ensures the topology, and returns the relay.
pub async fn connect(config: &IngestConfig) -> Result<UploadRelay> {
    let nats = darkroom_shared::nats::connect(&config.runtime, "darkroom-ingest").await?;
    let js = async_nats::jetstream::new(nats);
    config.runtime.prepare_topology(&js).await?;
    Ok(UploadRelay::new(
        Publisher::new(js.clone(), "/darkroom/ingest"),
        JobStore::open(&js).await?,
        darkroom_shared::s3::client(&config.runtime).await,
        config.ingest_inbox_prefix.clone(),
    ))
}

async fn reconcile_periodically(
    relay: UploadRelay,
    bucket: String,
    interval: Duration,
    margin: chrono::TimeDelta,
    shutdown: CancellationToken,
) {
    let mut watermark = reconcile::Watermark::default();
    loop {
        match reconcile::sweep(&relay, &bucket, &mut watermark, margin).await {
            Ok(report) => tracing::info!(
                listed = report.listed,
                examined = report.examined,
                published = report.published,
                "reconciled inbox"
            ),
            Err(error) => tracing::warn!(%error, "reconciliation failed; will try again"),
        }
        if interval.is_zero() {
            return;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
