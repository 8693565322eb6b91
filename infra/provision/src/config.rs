//! The tool's settings: [`RuntimeConfig`] (the same settings, file and `DARKROOM_*` variables
//! the functions read, so both want the same topology) plus the bucket's lifecycle rule.

use std::path::Path;

use darkroom_shared::RuntimeConfig;
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::ProvisionError;

/// `darkroom-infra`'s settings. Each field `x` is read from `DARKROOM_X`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProvisionConfig {
    /// What every function reads: NATS, S3, bucket, replicas, AckWait, MaxDeliver, max ages.
    #[serde(flatten)]
    pub runtime: RuntimeConfig,
    /// Key prefix of Darkroom's intermediate objects, expired by the lifecycle rule
    /// (default `work/`).
    pub work_prefix: String,
    /// Days after which objects under [`Self::work_prefix`] expire (default 7).
    pub work_expiry_days: u32,
}

impl Default for ProvisionConfig {
    fn default() -> Self {
        ProvisionConfig {
            runtime: RuntimeConfig::default(),
            work_prefix: "work/".to_owned(),
            work_expiry_days: 7,
        }
    }
}

impl ProvisionConfig {
    /// Loads the defaults, then `file` (or, without one, the file named by `DARKROOM_CONFIG`),
    /// then `DARKROOM_*` variables.
    pub fn load(file: Option<&Path>) -> Result<Self, ProvisionError> {
        let mut figment = Figment::from(Serialized::defaults(ProvisionConfig::default()));
        let file = file
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os(darkroom_shared::config::CONFIG_FILE_VAR).map(Into::into));
        if let Some(path) = file {
            figment = figment.merge(Toml::file_exact(path));
        }
        figment
            .merge(Env::prefixed(darkroom_shared::config::ENV_PREFIX).ignore(&["config"]))
            .extract()
            .map_err(|e| ProvisionError::Config(Box::new(e)))
    }
}
