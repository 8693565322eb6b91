//! Wiring: connect to NATS and S3, ensure the topology, and run the handler on the shared
//! JetStream loop ([`serve`]) or under the shared Lambda adapter ([`lambda`]).

use std::sync::Arc;

use darkroom_events::subjects;
use darkroom_shared::consumer;
use darkroom_shared::jobs::JobStore;
use darkroom_shared::lambda::LambdaError;
use darkroom_shared::publish::Publisher;
use tokio_util::sync::CancellationToken;

use crate::config::PreprocessConfig;
use crate::handler::{PreprocessHandler, SOURCE};

/// Connects to NATS and S3, ensures every stream, consumer and the KV bucket exist, loads
/// the presets, and returns the handler.
///
/// # Errors
/// NATS unreachable, JetStream refusing the topology, or a broken preset directory.
pub async fn connect(config: &PreprocessConfig) -> anyhow::Result<PreprocessHandler> {
    let presets = config.presets()?;
    let nats = darkroom_shared::nats::connect(&config.runtime, "darkroom-preprocess").await?;
    let js = async_nats::jetstream::new(nats);
    config.runtime.prepare_topology(&js).await?;
    let jobs = JobStore::open(&js).await?;
    let s3 = darkroom_shared::s3::client(&config.runtime).await;
    Ok(PreprocessHandler::new(
        s3,
        Publisher::new(js, SOURCE),
        jobs,
        presets,
        config.clone(),
    ))
}

/// Consumes the uploads stream (durable consumer `preprocess`) until `shutdown` fires.
///
/// # Errors
/// See [`connect`]; then only a consumer that cannot be opened.
pub async fn serve(config: PreprocessConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let handler = connect(&config).await?;
    let publisher = handler.publisher().clone();
    let settings = config
        .runtime
        .consumer_settings(subjects::UPLOADS_STREAM, subjects::consumers::PREPROCESS);
    consumer::run(Arc::new(handler), publisher, settings, shutdown).await?;
    Ok(())
}

/// Serves the handler as an AWS Lambda function (S3 → Lambda, or S3 → SQS → Lambda) until
/// the runtime stops it.
///
/// # Errors
/// See [`connect`]; then whatever the Lambda runtime reports.
pub async fn lambda(config: PreprocessConfig) -> Result<(), LambdaError> {
    let handler = connect(&config).await?;
    let publisher = handler.publisher().clone();
    darkroom_shared::lambda::run(handler, Some(publisher)).await
}
