//! Wiring: connect to NATS, ensure the topology, load the endpoints, and run the handler on
//! the shared JetStream loop ([`serve`]) or under the shared Lambda adapter ([`lambda`]).

use std::sync::Arc;

use darkroom_events::subjects;
use darkroom_shared::consumer;
use darkroom_shared::jobs::JobStore;
use darkroom_shared::lambda::LambdaError;
use darkroom_shared::publish::Publisher;
use tokio_util::sync::CancellationToken;

use crate::config::NotifierConfig;
use crate::handler::{NotifierHandler, RetryPolicy, SOURCE};
use crate::ledger::Ledger;
use crate::webhook::WebhookSender;

/// Loads the endpoints, connects to NATS, ensures every stream, consumer and KV bucket
/// exist, and returns the handler.
///
/// # Errors
/// An invalid endpoint file, NATS unreachable, or JetStream refusing the topology.
pub async fn connect(config: &NotifierConfig) -> anyhow::Result<NotifierHandler> {
    let registry = config.registry()?;
    for endpoint in registry.endpoints() {
        if let Err(refused) = endpoint.policy.check_url(&endpoint.url) {
            tracing::warn!(endpoint = %endpoint.id, %refused, "every delivery to this endpoint will be refused");
        }
    }
    tracing::info!(
        endpoints = registry.endpoints().len(),
        "webhook endpoints loaded"
    );
    // Every endpoint's series from the start, so dashboards and alerts see it at zero.
    for endpoint in registry.endpoints() {
        metrics::gauge!(crate::metric::BREAKER_OPEN, "endpoint" => endpoint.id.clone()).set(0.0);
        for outcome in ["delivered", "failed"] {
            metrics::counter!(crate::metric::WEBHOOK_ATTEMPTS, "endpoint" => endpoint.id.clone(), "outcome" => outcome)
                .increment(0);
        }
    }
    let sender = WebhookSender::new(&registry, config.limits())?;
    let nats = darkroom_shared::nats::connect(&config.runtime, "darkroom-notifier").await?;
    let js = async_nats::jetstream::new(nats);
    config.runtime.prepare_topology(&js).await?;
    let jobs = JobStore::open(&js).await?;
    let ledger = Ledger::open(&js).await?;
    Ok(NotifierHandler::new(
        Publisher::new(js, SOURCE),
        ledger,
        jobs,
        registry,
        sender,
        RetryPolicy::from_config(config),
    ))
}

/// Consumes the events stream (durable consumer `notifier`) with
/// `notifier_concurrency` pullers until `shutdown` fires.
///
/// # Errors
/// See [`connect`]; then only a consumer that cannot be opened.
pub async fn serve(config: NotifierConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let handler = Arc::new(connect(&config).await?);
    let settings = config
        .runtime
        .consumer_settings(subjects::EVENTS_STREAM, subjects::consumers::NOTIFIER);
    let pullers: Vec<_> = (0..config.notifier_concurrency.max(1))
        .map(|_| {
            tokio::spawn(consumer::run(
                handler.clone(),
                handler.publisher().clone(),
                settings.clone(),
                shutdown.clone(),
            ))
        })
        .collect();
    for puller in futures::future::join_all(pullers).await {
        puller??;
    }
    Ok(())
}

/// Serves the handler as an AWS Lambda function (the lifecycle CloudEvent as the payload, or
/// SQS records carrying it) until the runtime stops it.
///
/// # Errors
/// See [`connect`]; then whatever the Lambda runtime reports.
pub async fn lambda(config: NotifierConfig) -> Result<(), LambdaError> {
    let handler = connect(&config).await?;
    let publisher = handler.publisher().clone();
    darkroom_shared::lambda::run(handler, Some(publisher)).await
}
