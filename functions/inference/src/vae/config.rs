//! `AutoencoderKL`'s `config.json` (the `vae/` folder of a diffusers model).

use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::Kind;

use crate::{EngineError, Result};

/// The only down block the VAE encoder is built from.
pub const DOWN_ENCODER_BLOCK: &str = "DownEncoderBlock2D";
/// The only up block the VAE decoder is built from.
pub const UP_DECODER_BLOCK: &str = "UpDecoderBlock2D";

/// `sample_size` as diffusers writes it: one side, or `[height, width]`. Informational only (it
/// sizes diffusers' tiled decoding, which this engine does not do).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SampleSize {
    /// A square sample of this side.
    Square(i64),
    /// `[height, width]`.
    HeightWidth([i64; 2]),
}

/// `AutoencoderKL`'s configuration, deserialized from `vae/config.json`.
///
/// Missing fields take diffusers' `AutoencoderKL.__init__` defaults (those are SD-1.x-like, not
/// SDXL's: use [`VaeConfig::sdxl`] or the model's own `config.json`); unknown fields are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VaeConfig {
    /// Image channels the encoder reads (3).
    pub in_channels: i64,
    /// Image channels the decoder writes (3).
    pub out_channels: i64,
    /// One entry per level; only `"DownEncoderBlock2D"` exists for this model.
    pub down_block_types: Vec<String>,
    /// One entry per level; only `"UpDecoderBlock2D"` exists for this model.
    pub up_block_types: Vec<String>,
    /// Channels of each level, finest first.
    pub block_out_channels: Vec<i64>,
    /// Resnets per encoder level (the decoder has one more per level).
    pub layers_per_block: usize,
    /// Activation; only `"silu"` is supported.
    pub act_fn: String,
    /// Channels of the latent space (4).
    pub latent_channels: i64,
    /// Groups of every GroupNorm.
    pub norm_num_groups: i64,
    /// Training sample size (informational).
    pub sample_size: SampleSize,
    /// Latents are `z * scaling_factor` for the denoiser (SDXL 0.13025).
    pub scaling_factor: f64,
    /// Subtracted before scaling where set (SD3/Flux VAEs); `null` for SDXL.
    pub shift_factor: Option<f64>,
    /// Per-channel latent mean; with `latents_std`, replaces the plain scaling (`null` for SDXL).
    pub latents_mean: Option<Vec<f64>>,
    /// Per-channel latent standard deviation (`null` for SDXL).
    pub latents_std: Option<Vec<f64>>,
    /// Whether the VAE overflows in f16 and must run in f32 when the pipeline runs in f16.
    pub force_upcast: bool,
    /// Whether a 1×1 `quant_conv` follows the encoder.
    pub use_quant_conv: bool,
    /// Whether a 1×1 `post_quant_conv` precedes the decoder.
    pub use_post_quant_conv: bool,
    /// Whether the encoder's and decoder's mid blocks hold their attention layer.
    pub mid_block_add_attention: bool,
}

impl Default for VaeConfig {
    /// diffusers' `AutoencoderKL.__init__` defaults.
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec![DOWN_ENCODER_BLOCK.to_owned()],
            up_block_types: vec![UP_DECODER_BLOCK.to_owned()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".to_owned(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: SampleSize::Square(32),
            scaling_factor: 0.18215,
            shift_factor: None,
            latents_mean: None,
            latents_std: None,
            force_upcast: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

impl VaeConfig {
    /// SDXL 1.0's VAE: `stabilityai/stable-diffusion-xl-base-1.0/vae/config.json` (the same as
    /// `stabilityai/sdxl-vae`): four levels of 128, 256, 512, 512 channels, two resnets per level,
    /// 32 groups, 1024 px samples, `scaling_factor` 0.13025 and `force_upcast` true (it overflows
    /// in f16; `madebyollin/sdxl-vae-fp16-fix` is the same shape with `force_upcast` false).
    pub fn sdxl() -> Self {
        let levels = 4;
        Self {
            down_block_types: vec![DOWN_ENCODER_BLOCK.to_owned(); levels],
            up_block_types: vec![UP_DECODER_BLOCK.to_owned(); levels],
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            sample_size: SampleSize::Square(1024),
            scaling_factor: 0.13025,
            ..Self::default()
        }
    }

    /// Reads and checks a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| invalid(format!("read {}: {e}", path.display())))?;
        let config: Self = serde_json::from_str(&text)
            .map_err(|e| invalid(format!("parse {}: {e}", path.display())))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks that this engine can build the model the configuration describes.
    pub fn validate(&self) -> Result<()> {
        let levels = self.block_out_channels.len();
        if levels == 0 {
            return Err(invalid("block_out_channels is empty".to_owned()));
        }
        if self.down_block_types.len() != levels || self.up_block_types.len() != levels {
            return Err(invalid(format!(
                "{levels} block_out_channels but {} down and {} up block types",
                self.down_block_types.len(),
                self.up_block_types.len()
            )));
        }
        if let Some(other) = self
            .down_block_types
            .iter()
            .find(|t| *t != DOWN_ENCODER_BLOCK)
        {
            return Err(invalid(format!("unsupported down block type {other:?}")));
        }
        if let Some(other) = self.up_block_types.iter().find(|t| *t != UP_DECODER_BLOCK) {
            return Err(invalid(format!("unsupported up block type {other:?}")));
        }
        if self.act_fn != "silu" && self.act_fn != "swish" {
            return Err(invalid(format!("unsupported act_fn {:?}", self.act_fn)));
        }
        if self.layers_per_block == 0 {
            return Err(invalid("layers_per_block is 0".to_owned()));
        }
        if self.norm_num_groups <= 0 {
            return Err(invalid(format!(
                "norm_num_groups is {}",
                self.norm_num_groups
            )));
        }
        if let Some(channels) = self
            .block_out_channels
            .iter()
            .find(|c| **c <= 0 || **c % self.norm_num_groups != 0)
        {
            return Err(invalid(format!(
                "block_out_channels {channels} is not a positive multiple of norm_num_groups {}",
                self.norm_num_groups
            )));
        }
        if self.in_channels <= 0 || self.out_channels <= 0 || self.latent_channels <= 0 {
            return Err(invalid(format!(
                "channels must be positive (in {}, out {}, latent {})",
                self.in_channels, self.out_channels, self.latent_channels
            )));
        }
        if !self.scaling_factor.is_finite() || self.scaling_factor == 0.0 {
            return Err(invalid(format!(
                "scaling_factor is {}",
                self.scaling_factor
            )));
        }
        for (name, values) in [
            ("latents_mean", &self.latents_mean),
            ("latents_std", &self.latents_std),
        ] {
            if let Some(values) = values
                && i64::try_from(values.len()).ok() != Some(self.latent_channels)
            {
                return Err(invalid(format!(
                    "{name} has {} entries for {} latent channels",
                    values.len(),
                    self.latent_channels
                )));
            }
        }
        Ok(())
    }

    /// How many times smaller the latents are than the image: `2^(levels − 1)` (diffusers'
    /// `vae_scale_factor`, 8 for SDXL).
    pub fn vae_scale_factor(&self) -> i64 {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    /// The kind to run the VAE in while the denoiser runs in `denoiser_kind`.
    ///
    /// diffusers' SDXL pipelines move the VAE to f32 around encode and decode when it is in f16
    /// and `force_upcast` is set (`needs_upcasting` in `StableDiffusionXLPipeline.__call__`,
    /// `prepare_latents` in the img2img pipeline). This engine keeps the VAE in its own
    /// `VarStore`, so it simply loads it in this kind: f32 for an f16 denoiser and a
    /// `force_upcast` VAE, else the denoiser's kind (bf16 has f32's range and is not upcast).
    pub fn run_kind(&self, denoiser_kind: Kind) -> Kind {
        if denoiser_kind == Kind::Half && self.force_upcast {
            Kind::Float
        } else {
            denoiser_kind
        }
    }
}

fn invalid(message: String) -> EngineError {
    EngineError::InvalidConfig {
        component: "vae",
        message,
    }
}
