//! Wiring: connect to NATS and S3, ensure the topology, load the model, and only then consume
//! the jobs stream.

use std::sync::Arc;

use darkroom_events::subjects;
use darkroom_shared::consumer::{self, ConsumerSettings};
use darkroom_shared::health::{self, Readiness};
use darkroom_shared::jobs::JobStore;
use darkroom_shared::publish::Publisher;
use darkroom_shared::workers::{self, WorkerInventory, WorkerRegistry};
use tokio_util::sync::CancellationToken;

use crate::assets::AssetDirs;
use crate::config::WorkerConfig;
use crate::engine::Engine;
use crate::engine::LoadedModel;
use crate::handler::{InferenceHandler, SOURCE};
use crate::watchdog::Watchdog;

/// Connects, loads the model and consumes the jobs stream (durable consumer `inference`, one
/// job at a time) until `shutdown` fires. Nothing is pulled before the model is loaded, so a
/// worker that is still loading (or failed to load) never holds a job.
///
/// # Errors
/// NATS unreachable, JetStream refusing the topology, or a model that does not load.
pub async fn serve(config: WorkerConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let readiness = Readiness::default();
    set_ready(&readiness, false);
    if let Some(addr) = config.runtime.health_addr {
        let bound = health::serve(addr, readiness.clone(), shutdown.clone()).await?;
        tracing::info!(%bound, "health endpoint: /healthz, /readyz (ready once the model is loaded)");
    }
    let nats = darkroom_shared::nats::connect(&config.runtime, "darkroom-inference").await?;
    let js = async_nats::jetstream::new(nats);
    config.runtime.prepare_topology(&js).await?;
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
    let model = engine.model().clone();
    tracing::info!(
        model = %model.name,
        device = %model.device,
        dtype = %model.dtype,
        seconds = model.load_seconds,
        "model loaded"
    );

    let registry = WorkerRegistry::open(&js).await?;
    let inventory = tokio::spawn(keep_inventory(
        registry.clone(),
        config.worker_name(),
        model.clone(),
        AssetDirs::from_config(&config),
        shutdown.clone(),
    ));

    let settings = ConsumerSettings {
        // A render runs on a blocking thread: giving its message up would not stop it, and the
        // next job would render beside it.
        handling_timeout: None,
        ..config
            .runtime
            .consumer_settings(subjects::JOBS_STREAM, subjects::consumers::INFERENCE)
    };
    let stall_watch = config.watchdog_limit().map(|limit| {
        tokio::spawn(watch_for_stall(
            engine.watchdog().clone(),
            limit,
            readiness.clone(),
        ))
    });
    let handler = InferenceHandler::new(
        Arc::new(engine),
        s3,
        Publisher::new(js, SOURCE),
        jobs,
        config,
    );
    let publisher = handler.publisher().clone();
    let worker = handler.worker().to_owned();
    set_ready(&readiness, true);
    let consumed = consumer::run(Arc::new(handler), publisher, settings, shutdown).await;
    set_ready(&readiness, false);
    inventory.abort();
    if let Some(task) = stall_watch {
        task.abort();
    }
    if let Err(error) = registry.remove(&worker).await {
        tracing::warn!(%error, "cannot remove this worker's inventory (it expires by itself)");
    }
    consumed?;
    Ok(())
}

/// `/readyz` and the `darkroom_worker_ready` gauge together.
fn set_ready(readiness: &Readiness, ready: bool) {
    readiness.set(ready);
    metrics::gauge!(darkroom_shared::telemetry::metric::WORKER_READY).set(if ready {
        1.0
    } else {
        0.0
    });
}

/// Waits for the engine to stall, then reports this worker not ready (the consumer loop, which
/// asks the handler, hands the job back and stops; the process then exits).
async fn watch_for_stall(watchdog: Watchdog, limit: std::time::Duration, readiness: Readiness) {
    let silent = watchdog.wait_for_stall(limit).await;
    set_ready(&readiness, false);
    metrics::counter!(darkroom_shared::telemetry::metric::WATCHDOG_STALLS).increment(1);
    tracing::error!(
        silent_secs = silent.as_secs(),
        limit_secs = limit.as_secs(),
        "watchdog: the engine made no progress; handing the job back and exiting"
    );
}

/// Writes this worker's inventory now and every [`workers::REFRESH`] until `shutdown`, so
/// preprocess knows what it can render (files added to the folders show up at the next
/// refresh).
async fn keep_inventory(
    registry: WorkerRegistry,
    worker: String,
    model: LoadedModel,
    assets: AssetDirs,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(workers::REFRESH);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let listing = assets.clone();
        let Ok((loras, controlnets, luts)) =
            tokio::task::spawn_blocking(move || listing.inventory()).await
        else {
            continue;
        };
        let inventory = WorkerInventory {
            worker: worker.clone(),
            model: model.name.clone(),
            loras,
            controlnets,
            luts,
            depth_model: model.depth_model.clone(),
            pose_model: model.pose_model.clone(),
            updated_at: chrono::Utc::now(),
        };
        if let Err(error) = registry.put(&inventory).await {
            tracing::warn!(%error, "cannot publish this worker's inventory");
        }
    }
}
