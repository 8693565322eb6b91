//! The worker's settings: plain data with documented defaults, read like every Darkroom
//! function's (defaults, then the TOML file named by `DARKROOM_CONFIG`, then `DARKROOM_*`
//! environment variables; see `darkroom_shared::config`).

use std::path::PathBuf;
use std::time::Duration;

use darkroom_inference::kernels::KernelChoice;
use darkroom_shared::RuntimeConfig;
use serde::{Deserialize, Serialize};

/// The inference worker's settings. Each field `x` is read from `DARKROOM_X`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct WorkerConfig {
    /// Settings every function shares (NATS, S3, bucket, logs, metrics).
    #[serde(flatten)]
    pub runtime: RuntimeConfig,
    /// The SDXL base model: a diffusers folder or a single-file checkpoint
    /// (`sd_xl_base_1.0.safetensors`). Required; nothing is ever downloaded.
    pub model: Option<PathBuf>,
    /// For a single-file checkpoint that is not SDXL base-shaped: a diffusers folder whose
    /// configs and tokenizers describe it (default none).
    pub model_config_dir: Option<PathBuf>,
    /// `cpu`, `cuda`, `cuda:N`, or `auto` (default): the first GPU when this build and machine
    /// have one, else the CPU.
    pub device: String,
    /// `f32`, `f16`, `bf16`, or `auto` (default): f16 on a GPU, f32 on the CPU.
    pub dtype: String,
    /// Folder of LoRA files jobs name (`render.loras[].name`; default `models/loras`).
    pub lora_dir: PathBuf,
    /// Folder of ControlNet folders jobs name (`render.controlnets[].model`; default
    /// `models/controlnets`).
    pub controlnet_dir: PathBuf,
    /// Folder of `.cube` LUTs jobs name (`render.tone.lut`; default `models/luts`).
    pub lut_dir: PathBuf,
    /// A depth estimator (a transformers Depth Anything folder, e.g. Depth-Anything-V2-Small)
    /// for the depth maps of depth ControlNets, drawn here from the prepared input. Unset
    /// (default): jobs with a depth ControlNet fail with `model_error`.
    pub depth_model: Option<PathBuf>,
    /// A pose estimator (the OpenPose body model as safetensors: a file, or a folder holding
    /// `body_pose_model.safetensors`) for the pose maps of pose ControlNets, drawn here from
    /// the prepared input. Unset (default): jobs with a pose ControlNet fail with `model_error`.
    pub pose_model: Option<PathBuf>,
    /// LoRA factors kept loaded between jobs, in MiB (default 2048).
    pub lora_cache_mib: usize,
    /// ControlNets kept loaded between jobs (default 2; each SDXL ControlNet is ~2.5 GB in f16).
    pub controlnet_cache: usize,
    /// The worker's name in `started`/`completed` events and job records (default: the host
    /// name).
    pub worker_name: Option<String>,
    /// Least time between two `progress` events of a job, in milliseconds (default 500: at
    /// most 2 per second).
    pub progress_interval_ms: u64,
    /// Largest prepared input or control image read from S3, in bytes (default 64 MiB).
    pub max_input_bytes: usize,
    /// Replay denoising steps as recorded CUDA graphs (default true; GPU builds only).
    pub cuda_graphs: bool,
    /// The kernels of the UNet's norms and gates on CUDA: `stock` (default: libtorch's),
    /// `fused` (Darkroom's fused GroupNorm+SiLU, GEGLU and add+LayerNorm) or `fused-nhwc`
    /// (those, with channels-last convolutions). Not yet measured on a GPU (BENCHMARKS.md);
    /// anything but `stock` needs a CUDA device.
    pub kernels: KernelChoice,
    /// Seconds a render may go without progress (a phase or a denoising step) before the
    /// watchdog gives up on this process (default 600; 0: no watchdog). It then stops renewing
    /// the job and hands it back, turns `/readyz` to 503 and exits non-zero, so its supervisor
    /// restarts it and the job renders on another worker. Set it well above the slowest
    /// step or adapter load of your presets (a full-size step on a CPU takes seconds).
    pub watchdog_secs: u64,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            runtime: RuntimeConfig::default(),
            model: None,
            model_config_dir: None,
            device: "auto".to_owned(),
            dtype: "auto".to_owned(),
            lora_dir: PathBuf::from("models/loras"),
            controlnet_dir: PathBuf::from("models/controlnets"),
            lut_dir: PathBuf::from("models/luts"),
            depth_model: None,
            pose_model: None,
            lora_cache_mib: 2048,
            controlnet_cache: 2,
            worker_name: None,
            progress_interval_ms: 500,
            max_input_bytes: 64 << 20,
            cuda_graphs: true,
            kernels: KernelChoice::Stock,
            watchdog_secs: 600,
        }
    }
}

impl WorkerConfig {
    /// The worker's name: [`Self::worker_name`], else the host name, else `inference`.
    pub fn worker_name(&self) -> String {
        if let Some(name) = &self.worker_name {
            return name.clone();
        }
        std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
            .map(|name| name.trim().to_owned())
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| "inference".to_owned())
    }

    /// [`Self::watchdog_secs`] as a duration; `None` when the watchdog is off.
    pub fn watchdog_limit(&self) -> Option<Duration> {
        (self.watchdog_secs > 0).then(|| Duration::from_secs(self.watchdog_secs))
    }

    /// [`Self::progress_interval_ms`] as a duration.
    pub fn progress_interval(&self) -> Duration {
        Duration::from_millis(self.progress_interval_ms)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn environment_overrides_by_field_name() {
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env("DARKROOM_MODEL", "/models/sdxl");
            jail.set_env("DARKROOM_DEVICE", "cuda:1");
            jail.set_env("DARKROOM_CONTROLNET_CACHE", "4");
            jail.set_env("DARKROOM_KERNELS", "fused-nhwc");
            let config: WorkerConfig = darkroom_shared::config::load().unwrap();
            assert_eq!(config.kernels, KernelChoice::FusedNhwc);
            assert_eq!(config.model, Some(PathBuf::from("/models/sdxl")));
            assert_eq!(config.device, "cuda:1");
            assert_eq!(config.controlnet_cache, 4);
            assert_eq!(config.dtype, "auto");
            assert_eq!(config.progress_interval(), Duration::from_millis(500));
            Ok(())
        });
    }

    #[test]
    fn a_configured_name_wins() {
        let config = WorkerConfig {
            worker_name: Some("gpu-7".to_owned()),
            ..WorkerConfig::default()
        };
        assert_eq!(config.worker_name(), "gpu-7");
        assert!(!WorkerConfig::default().worker_name().is_empty());
    }
}
