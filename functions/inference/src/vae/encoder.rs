//! The VAE encoder: image → the parameters (mean, log-variance) of the latent distribution.
//!
//! Upstream: `Encoder` in `diffusers/models/autoencoders/vae.py`, with `double_z=True`.

use crate::{Result, layers};
use tch::Tensor;
use tch::nn::{self, Module};

use super::blocks::{DownEncoderBlock2D, UNetMidBlock2D, conv3x3, group_norm};
use super::config::VaeConfig;

/// conv_in → DownEncoderBlock2D per level (downsampling on all but the last) → mid block →
/// GroupNorm → SiLU → conv_out to `2 × latent_channels`.
#[derive(Debug)]
pub(crate) struct Encoder {
    conv_in: nn::Conv2D,
    down_blocks: Vec<DownEncoderBlock2D>,
    mid_block: UNetMidBlock2D,
    conv_norm_out: layers::GroupNorm,
    conv_out: nn::Conv2D,
}

impl Encoder {
    /// Builds the encoder on `path` (`encoder` in the checkpoint); `config` must be validated.
    pub(crate) fn new(path: nn::Path, config: &VaeConfig) -> Result<Self> {
        let channels = &config.block_out_channels;
        let groups = config.norm_num_groups;
        let levels = channels.len();
        let last = channels[levels - 1];
        let mut output_channels = channels[0];
        let down_blocks = (0..levels)
            .map(|i| {
                let input_channels = output_channels;
                output_channels = channels[i];
                DownEncoderBlock2D::new(
                    &path / "down_blocks" / i,
                    input_channels,
                    output_channels,
                    config.layers_per_block,
                    groups,
                    i + 1 < levels,
                )
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            conv_in: conv3x3(&path / "conv_in", config.in_channels, channels[0]),
            down_blocks,
            mid_block: UNetMidBlock2D::new(
                &path / "mid_block",
                last,
                groups,
                config.mid_block_add_attention,
            )?,
            conv_norm_out: group_norm(&path / "conv_norm_out", groups, last),
            conv_out: conv3x3(&path / "conv_out", last, 2 * config.latent_channels),
        })
    }

    pub(crate) fn forward(&self, images: &Tensor) -> Tensor {
        let mut hidden = self.conv_in.forward(images);
        for block in &self.down_blocks {
            hidden = block.forward(&hidden);
        }
        let hidden = self.mid_block.forward(&hidden);
        self.conv_out
            .forward(&self.conv_norm_out.forward_silu(&hidden))
    }
}
