//! The VAE decoder: latents (unscaled) → image in about [-1, 1].
//!
//! Upstream: `Decoder` in `diffusers/models/autoencoders/vae.py`, with `norm_type="group"`.

use crate::{Result, layers};
use tch::Tensor;
use tch::nn::{self, Module};

use super::blocks::{UNetMidBlock2D, UpDecoderBlock2D, conv3x3, group_norm};
use super::config::VaeConfig;

/// conv_in → mid block → UpDecoderBlock2D per level, coarsest first, each with
/// `layers_per_block + 1` resnets (upsampling on all but the last) → GroupNorm → SiLU → conv_out.
#[derive(Debug)]
pub(crate) struct Decoder {
    conv_in: nn::Conv2D,
    mid_block: UNetMidBlock2D,
    up_blocks: Vec<UpDecoderBlock2D>,
    conv_norm_out: layers::GroupNorm,
    conv_out: nn::Conv2D,
}

impl Decoder {
    /// Builds the decoder on `path` (`decoder` in the checkpoint); `config` must be validated.
    pub(crate) fn new(path: nn::Path, config: &VaeConfig) -> Result<Self> {
        let reversed: Vec<i64> = config.block_out_channels.iter().rev().copied().collect();
        let groups = config.norm_num_groups;
        let levels = reversed.len();
        let coarsest = reversed[0];
        let finest = reversed[levels - 1];
        let mut output_channels = coarsest;
        let up_blocks = (0..levels)
            .map(|i| {
                let input_channels = output_channels;
                output_channels = reversed[i];
                UpDecoderBlock2D::new(
                    &path / "up_blocks" / i,
                    input_channels,
                    output_channels,
                    config.layers_per_block + 1,
                    groups,
                    i + 1 < levels,
                )
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            conv_in: conv3x3(&path / "conv_in", config.latent_channels, coarsest),
            mid_block: UNetMidBlock2D::new(
                &path / "mid_block",
                coarsest,
                groups,
                config.mid_block_add_attention,
            )?,
            up_blocks,
            conv_norm_out: group_norm(&path / "conv_norm_out", groups, finest),
            conv_out: conv3x3(&path / "conv_out", finest, config.out_channels),
        })
    }

    pub(crate) fn forward(&self, latents: &Tensor) -> Tensor {
        let hidden = self.conv_in.forward(latents);
        let mut hidden = self.mid_block.forward(&hidden);
        for block in &self.up_blocks {
            hidden = block.forward(&hidden);
        }
        self.conv_out
            .forward(&self.conv_norm_out.forward_silu(&hidden))
    }

    /// The kind and device of the decoder's weights.
    pub(crate) fn weights(&self) -> &Tensor {
        &self.conv_in.ws
    }
}
