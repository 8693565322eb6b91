//! Wiring: connect to NATS and S3, ensure the topology, load the model, and only then consume
//! the jobs stream.

use std::sync::Arc;

use darkroom_events::subjects;
use darkroom_shared::consumer::{self, ConsumerSettings};
use darkroom_shared::jobs::JobStore;
use darkroom_shared::publish::Publisher;
use tokio_util::sync::CancellationToken;

use crate::config::WorkerConfig;
use crate::engine::Engine;
use crate::handler::{InferenceHandler, SOURCE};

/// Connects, loads the model and consumes the jobs stream (durable consumer `inference`, one
/// job at a time) until `shutdown` fires. Nothing is pulled before the model is loaded, so a
/// worker that is still loading (or failed to load) never holds a job.
///
/// # Errors
/// NATS unreachable, JetStream refusing the topology, or a model that does not load.
pub async fn serve(config: WorkerConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let nats = darkroom_shared::nats::connect(&config.runtime, "darkroom-inference").await?;
    let js = async_nats::jetstream::new(nats);
    let topology = config.runtime.topology();
    topology.ensure(&js).await?;
    let jobs = JobStore::open(&js).await?;
    let s3 = darkroom_shared::s3::client(&config.runtime).await;

    tracing::info!(model = ?config.model, device = %config.device, dtype = %config.dtype, "loading the model");
    let load_config = config.clone();
    let load = tokio::task::spawn_blocking(move || Engine::start(&load_config));
    let engine = tokio::select! {
        loaded = load => loaded??,
        _ = shutdown.cancelled() => {
            tracing::info!("stopped while loading the model");
            return Ok(());
        }
    };
    let model = engine.model();
    tracing::info!(
        model = %model.name,
        device = %model.device,
        dtype = %model.dtype,
        seconds = model.load_seconds,
        "model loaded"
    );

    let handler = InferenceHandler::new(
        Arc::new(engine),
        s3,
        Publisher::new(js, SOURCE),
        jobs,
        config,
    );
    let publisher = handler.publisher().clone();
    let settings = ConsumerSettings::new(
        &topology,
        subjects::JOBS_STREAM,
        subjects::consumers::INFERENCE,
    );
    consumer::run(Arc::new(handler), publisher, settings, shutdown).await?;
    Ok(())
}
