//! Timestep embeddings of the UNet, after diffusers' `models/embeddings.py` (`Timesteps`,
//! `TimestepEmbedding`, `get_timestep_embedding`): the sinusoidal features of
//! "Denoising Diffusion Probabilistic Models" (Ho et al., 2020, <https://arxiv.org/abs/2006.11239>)
//! followed by a two-layer MLP.

use crate::layers;
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use super::Activation;
use crate::Result;

/// Sinusoidal features of (possibly fractional) timesteps: diffusers' `Timesteps`.
///
/// Holds no weights. The frequency table is computed once, with the same libtorch operations
/// diffusers runs on every call, so the features match it bit for bit.
#[derive(Debug)]
pub struct Timesteps {
    num_channels: i64,
    flip_sin_to_cos: bool,
    /// `exp(-ln(10000) * i / (half - downscale_freq_shift))` for `i < half`, f32.
    frequencies: Tensor,
}

impl Timesteps {
    /// Builds the embedding of `num_channels` features on `device`.
    pub fn new(
        num_channels: i64,
        flip_sin_to_cos: bool,
        downscale_freq_shift: f64,
        device: tch::Device,
    ) -> Self {
        let half = num_channels / 2;
        let max_period = 10000f64;
        let exponent = Tensor::arange(half, (Kind::Float, device)) * (-max_period.ln());
        let exponent = exponent / (half as f64 - downscale_freq_shift);
        Self {
            num_channels,
            flip_sin_to_cos,
            frequencies: exponent.exp(),
        }
    }

    /// Number of features per timestep.
    pub fn num_channels(&self) -> i64 {
        self.num_channels
    }

    /// `timesteps`: shape `[n]`, any numeric kind. Returns `[n, num_channels]` in f32, whatever
    /// the model's precision (as diffusers does; callers cast).
    pub fn forward(&self, timesteps: &Tensor) -> Tensor {
        let half = self.num_channels / 2;
        let angles = timesteps.to_kind(Kind::Float).unsqueeze(1) * self.frequencies.unsqueeze(0);
        let (first, second) = if self.flip_sin_to_cos {
            (angles.cos(), angles.sin())
        } else {
            (angles.sin(), angles.cos())
        };
        let embedding = Tensor::cat(&[first, second], -1);
        if self.num_channels % 2 == 1 {
            embedding.constant_pad_nd([0, 1, 0, 0])
        } else {
            debug_assert_eq!(embedding.size().last().copied(), Some(2 * half));
            embedding
        }
    }
}

/// Two linear layers with an activation between: diffusers' `TimestepEmbedding` (without the
/// optional `cond_proj` and post-activation, which SDXL does not use).
#[derive(Debug)]
pub struct TimestepEmbedding {
    linear_1: nn::Linear,
    act: Activation,
    linear_2: nn::Linear,
}

impl TimestepEmbedding {
    /// `linear_1`: `in_channels → time_embed_dim`, `linear_2`: `time_embed_dim → time_embed_dim`.
    pub fn new(
        path: nn::Path,
        in_channels: i64,
        time_embed_dim: i64,
        act: Activation,
    ) -> Result<Self> {
        Ok(Self {
            linear_1: layers::linear(&path / "linear_1", in_channels, time_embed_dim, true),
            act,
            linear_2: layers::linear(&path / "linear_2", time_embed_dim, time_embed_dim, true),
        })
    }

    /// `[n, in_channels]` → `[n, time_embed_dim]`.
    pub fn forward(&self, sample: &Tensor) -> Tensor {
        let hidden = self.act.forward(&self.linear_1.forward(sample));
        self.linear_2.forward(&hidden)
    }
}
