//! The function's settings: plain data with documented defaults, read like every Darkroom
//! function's (defaults, then the TOML file named by `DARKROOM_CONFIG`, then `DARKROOM_*`
//! environment variables; see `darkroom_shared::config`).

use std::path::PathBuf;

use darkroom_shared::RuntimeConfig;
use serde::{Deserialize, Serialize};

use crate::{CannyOptions, Limits};

/// Preprocess's settings. Each field `preprocess_x` is read from `DARKROOM_PREPROCESS_X`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PreprocessConfig {
    /// Settings every function shares (NATS, S3, bucket, logs, metrics).
    #[serde(flatten)]
    pub runtime: RuntimeConfig,
    /// Key prefix of uploads; objects elsewhere (Darkroom's own `work/` and `outputs/`,
    /// which some S3 servers also announce) are skipped (default `inbox/`).
    pub preprocess_inbox_prefix: String,
    /// A directory of operator presets (`*.toml`) that add to and override the built-ins
    /// (default none: built-ins only).
    pub preprocess_preset_dir: Option<PathBuf>,
    /// Preset for uploads that name none, neither by key (`inbox/<preset>/<file>`) nor by
    /// `x-amz-meta-preset` (default none: such uploads fail with `unknown_preset`).
    pub preprocess_default_preset: Option<String>,
    /// What a preset's `{subject}` becomes when the upload sets no `x-amz-meta-subject`
    /// (default `the subject of the photo`).
    pub preprocess_default_subject: String,
    /// Largest upload fetched, in bytes (default 40 MiB); larger ones fail with
    /// `limit_exceeded` from the HEAD, before any download.
    pub preprocess_max_bytes: usize,
    /// Largest width × height decoded, read from the header (default 50 000 000).
    pub preprocess_max_pixels: u64,
    /// Largest width or height decoded (default 16 384).
    pub preprocess_max_side: u32,
    /// Largest single allocation a decoder may make, in bytes (default 512 MiB).
    pub preprocess_max_alloc: u64,
    /// Canny lower hysteresis threshold (default 100, as SDXL canny ControlNets were trained).
    pub preprocess_canny_low: f64,
    /// Canny upper hysteresis threshold (default 200).
    pub preprocess_canny_high: f64,
    /// Canny with the L2 gradient norm instead of L1 (default false, as in training).
    pub preprocess_canny_l2_gradient: bool,
}

impl Default for PreprocessConfig {
    fn default() -> Self {
        let limits = Limits::default();
        let canny = CannyOptions::default();
        PreprocessConfig {
            runtime: RuntimeConfig::default(),
            preprocess_inbox_prefix: "inbox/".to_owned(),
            preprocess_preset_dir: None,
            preprocess_default_preset: None,
            preprocess_default_subject: "the subject of the photo".to_owned(),
            preprocess_max_bytes: limits.max_bytes,
            preprocess_max_pixels: limits.max_pixels,
            preprocess_max_side: limits.max_side,
            preprocess_max_alloc: limits.max_alloc,
            preprocess_canny_low: canny.low,
            preprocess_canny_high: canny.high,
            preprocess_canny_l2_gradient: canny.l2_gradient,
        }
    }
}

impl PreprocessConfig {
    /// The decoder limits these settings describe.
    pub fn limits(&self) -> Limits {
        Limits {
            max_bytes: self.preprocess_max_bytes,
            max_pixels: self.preprocess_max_pixels,
            max_side: self.preprocess_max_side,
            max_alloc: self.preprocess_max_alloc,
        }
    }

    /// The canny parameters these settings describe.
    pub fn canny(&self) -> CannyOptions {
        CannyOptions {
            low: self.preprocess_canny_low,
            high: self.preprocess_canny_high,
            l2_gradient: self.preprocess_canny_l2_gradient,
        }
    }

    /// The built-in presets plus those in [`Self::preprocess_preset_dir`].
    ///
    /// # Errors
    /// A preset that does not parse or validate, or a directory that cannot be read.
    pub fn presets(
        &self,
    ) -> Result<darkroom_shared::preset::PresetLibrary, darkroom_shared::preset::PresetError> {
        let library = darkroom_shared::preset::PresetLibrary::builtin()?;
        match &self.preprocess_preset_dir {
            Some(dir) => library.with_dir(dir),
            None => Ok(library),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_pipelines_own() {
        let config = PreprocessConfig::default();
        assert_eq!(config.limits(), Limits::default());
        assert_eq!(config.canny(), CannyOptions::default());
        assert_eq!(config.preprocess_inbox_prefix, "inbox/");
        assert_eq!(config.preprocess_default_preset, None);
        assert_eq!(config.runtime, RuntimeConfig::default());
    }

    #[test]
    fn environment_overrides_by_field_name() {
        figment::Jail::expect_with(|jail| {
            // local-dev/env.sh exports DARKROOM_* variables: start clean.
            jail.clear_env();
            jail.set_env("DARKROOM_PREPROCESS_MAX_BYTES", "1000");
            jail.set_env("DARKROOM_PREPROCESS_DEFAULT_PRESET", "desk-setup");
            jail.set_env("DARKROOM_PREPROCESS_CANNY_LOW", "50");
            jail.set_env("DARKROOM_BUCKET", "photos");
            let config: PreprocessConfig = darkroom_shared::config::load().unwrap();
            assert_eq!(config.limits().max_bytes, 1000);
            assert_eq!(
                config.preprocess_default_preset.as_deref(),
                Some("desk-setup")
            );
            assert_eq!(config.canny().low, 50.0);
            assert_eq!(config.canny().high, 200.0);
            assert_eq!(config.runtime.bucket, "photos");
            Ok(())
        });
    }

    #[test]
    fn a_preset_directory_adds_presets() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("house.toml"),
            "name = \"house\"\nprompt = \"a {subject}\"\n",
        )
        .unwrap();
        let config = PreprocessConfig {
            preprocess_preset_dir: Some(dir.path().to_owned()),
            ..PreprocessConfig::default()
        };
        let presets = config.presets().unwrap();
        assert!(presets.get("house").is_ok());
        assert!(presets.get("profile-warm").is_ok());
    }
}
