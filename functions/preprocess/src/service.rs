//! Wiring: connect to NATS and S3, ensure the topology, and run the handler on the shared
//! JetStream loop ([`serve`]) or under the shared Lambda adapter ([`lambda`]).

use std::sync::Arc;

use darkroom_events::subjects;
use darkroom_shared::consumer;
use darkroom_shared::jobs::JobStore;
use darkroom_shared::lambda::LambdaError;
use darkroom_shared::preset::PresetLibrary;
use darkroom_shared::publish::Publisher;
use tokio_util::sync::CancellationToken;

use crate::config::PreprocessConfig;
use crate::handler::{PreprocessHandler, SOURCE};

/// Connects to NATS and S3, ensures every stream, consumer and the KV bucket exist, loads
/// the presets, and returns the handler.
///
/// Presets the pipeline cannot serve (a pose ControlNet: nothing draws pose maps)
/// stop it before it connects, naming each: better a deployment that does not start than
/// uploads that can only fail.
///
/// # Errors
/// A preset it cannot serve, NATS unreachable, JetStream refusing the topology, or a broken
/// preset directory.
pub async fn connect(config: &PreprocessConfig) -> anyhow::Result<PreprocessHandler> {
    let presets = config.presets()?;
    check_presets(&presets, config)?;
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

/// Every preset of `presets` that the pipeline cannot serve, as one error (none: `Ok`).
///
/// # Errors
/// Lists each such preset and why.
pub fn check_presets(presets: &PresetLibrary, config: &PreprocessConfig) -> anyhow::Result<()> {
    let problems: Vec<String> = presets
        .names()
        .filter_map(|name| {
            let preset = presets.get(name).ok()?;
            crate::job::prepare_options(preset, config)
                .err()
                .map(|error| error.to_string())
        })
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        anyhow::bail!(
            "presets this pipeline cannot serve: {}",
            problems.join("; ")
        )
    }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn every_built_in_preset_can_be_served() {
        let config = PreprocessConfig::default();
        check_presets(&config.presets().unwrap(), &config).unwrap();
    }

    #[test]
    fn a_preset_asking_for_a_pose_map_stops_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let desk = include_str!("../../../shared/presets/desk-setup.toml");
        assert!(desk.contains("kind = \"canny\""));
        let deep = desk
            .replace("name = \"desk-setup\"", "name = \"deep\"")
            .replace("kind = \"canny\"", "kind = \"pose\"");
        std::fs::write(dir.path().join("deep.toml"), deep).unwrap();
        let config = PreprocessConfig {
            preprocess_preset_dir: Some(dir.path().to_path_buf()),
            ..PreprocessConfig::default()
        };
        let error = check_presets(&config.presets().unwrap(), &config).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("preset deep needs a pose control map"),
            "{error}"
        );
    }
}
