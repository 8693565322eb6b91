//! The blocks the VAE's encoder and decoder are made of, as diffusers builds them for
//! `AutoencoderKL`: no time embedding, GroupNorm with eps 1e-6, SiLU, output scale 1. The
//! resnets and resamplers are the UNet's ([`crate::unet::resnet`]), as in diffusers.
//!
//! Upstream: `diffusers/models/resnet.py` (`ResnetBlock2D`), `downsampling.py` (`Downsample2D`),
//! `upsampling.py` (`Upsample2D`), `attention_processor.py` (`Attention` with `AttnProcessor2_0`)
//! and `unets/unet_2d_blocks.py` (`UNetMidBlock2D`, `DownEncoderBlock2D`, `UpDecoderBlock2D`).

use tch::Tensor;
use tch::nn::{self, Module};

use crate::Result;
use crate::layers;
use crate::unet::resnet::{Downsample2D, ResnetBlock2D, ResnetBlock2DConfig, Upsample2D};
use crate::unet::{Activation, ResnetTimeScaleShift};

/// The eps of every GroupNorm in the VAE (`resnet_eps=1e-6` in `vae.py`).
const NORM_EPS: f64 = 1e-6;

pub(crate) fn group_norm(path: nn::Path, groups: i64, channels: i64) -> layers::GroupNorm {
    layers::GroupNorm::new(path, groups, channels, NORM_EPS)
}

/// A 3×3 convolution with padding 1 (size-preserving at stride 1).
pub(crate) fn conv3x3(path: nn::Path, in_channels: i64, out_channels: i64) -> nn::Conv2D {
    layers::conv2d(path, in_channels, out_channels, 3, 1, 1)
}

/// `ResnetBlock2D` with `temb_channels=None`, as the VAE builds it (GroupNorm eps 1e-6, SiLU).
fn resnet(
    path: nn::Path,
    in_channels: i64,
    out_channels: i64,
    groups: i64,
) -> Result<ResnetBlock2D> {
    ResnetBlock2D::new(
        path,
        &ResnetBlock2DConfig {
            in_channels,
            out_channels,
            temb_channels: None,
            groups,
            groups_out: None,
            eps: 1e-6,
            act: Activation::Silu,
            time_embedding_norm: ResnetTimeScaleShift::Default,
            output_scale_factor: 1.0,
        },
    )
}

/// The mid block's `Attention`: one head over all spatial positions, GroupNorm first, q/k/v and
/// `to_out.0` linear with bias, residual connection, `rescale_output_factor` 1.
#[derive(Debug)]
pub(crate) struct SpatialAttention {
    group_norm: layers::GroupNorm,
    to_q: nn::Linear,
    to_k: nn::Linear,
    to_v: nn::Linear,
    to_out: nn::Linear,
}

impl SpatialAttention {
    pub(crate) fn new(path: nn::Path, channels: i64, groups: i64) -> Self {
        let linear = |name: &str| layers::linear(&path / name, channels, channels, true);
        Self {
            group_norm: group_norm(&path / "group_norm", groups, channels),
            to_q: linear("to_q"),
            to_k: linear("to_k"),
            to_v: linear("to_v"),
            to_out: layers::linear(&path / "to_out" / "0", channels, channels, true),
        }
    }

    pub(crate) fn forward(&self, xs: &Tensor) -> Tensor {
        let size = xs.size();
        let (batch, channels, height, width) = (size[0], size[1], size[2], size[3]);
        // GroupNorm over (B, C, H·W) equals GroupNorm over (B, C, H, W): same groups, same stats.
        let tokens = self
            .group_norm
            .forward(xs)
            .view([batch, channels, height * width])
            .transpose(1, 2);
        // (B, tokens, C) → (B, heads = 1, tokens, C) for SDPA; its default scale is 1/√C.
        let query = self.to_q.forward(&tokens).unsqueeze(1);
        let key = self.to_k.forward(&tokens).unsqueeze(1);
        let value = self.to_v.forward(&tokens).unsqueeze(1);
        let attended = Tensor::scaled_dot_product_attention(
            &query,
            &key,
            &value,
            None::<&Tensor>,
            0.0,
            false,
            None,
            false,
        )
        .squeeze_dim(1);
        let out = self
            .to_out
            .forward(&attended)
            .transpose(1, 2)
            .reshape([batch, channels, height, width]);
        out + xs
    }
}

/// `UNetMidBlock2D` with one layer: resnet, (attention), resnet.
#[derive(Debug)]
pub(crate) struct UNetMidBlock2D {
    first: ResnetBlock2D,
    attention: Option<SpatialAttention>,
    second: ResnetBlock2D,
}

impl UNetMidBlock2D {
    pub(crate) fn new(
        path: nn::Path,
        channels: i64,
        groups: i64,
        add_attention: bool,
    ) -> Result<Self> {
        let resnets = &path / "resnets";
        Ok(Self {
            first: resnet(&resnets / "0", channels, channels, groups)?,
            attention: add_attention
                .then(|| SpatialAttention::new(&path / "attentions" / "0", channels, groups)),
            second: resnet(&resnets / "1", channels, channels, groups)?,
        })
    }

    pub(crate) fn forward(&self, xs: &Tensor) -> Tensor {
        let mut hidden = self.first.forward(xs, None);
        if let Some(attention) = &self.attention {
            hidden = attention.forward(&hidden);
        }
        self.second.forward(&hidden, None)
    }
}

/// `DownEncoderBlock2D`: resnets, then an optional [`Downsample2D`].
#[derive(Debug)]
pub(crate) struct DownEncoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Downsample2D>,
}

impl DownEncoderBlock2D {
    pub(crate) fn new(
        path: nn::Path,
        in_channels: i64,
        out_channels: i64,
        num_layers: usize,
        groups: i64,
        add_downsample: bool,
    ) -> Result<Self> {
        let resnets = (0..num_layers)
            .map(|i| {
                let input = if i == 0 { in_channels } else { out_channels };
                resnet(&path / "resnets" / i, input, out_channels, groups)
            })
            .collect::<Result<_>>()?;
        // padding 0: diffusers pads right and bottom by one (the original LDM's downsampling).
        let downsampler = add_downsample
            .then(|| Downsample2D::new(&path / "downsamplers" / "0", out_channels, out_channels, 0))
            .transpose()?;
        Ok(Self {
            resnets,
            downsampler,
        })
    }

    pub(crate) fn forward(&self, xs: &Tensor) -> Tensor {
        let mut hidden = xs.shallow_clone();
        for resnet in &self.resnets {
            hidden = resnet.forward(&hidden, None);
        }
        match &self.downsampler {
            Some(downsampler) => downsampler.forward(&hidden),
            None => hidden,
        }
    }
}

/// `UpDecoderBlock2D`: resnets, then an optional [`Upsample2D`].
#[derive(Debug)]
pub(crate) struct UpDecoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Upsample2D>,
}

impl UpDecoderBlock2D {
    pub(crate) fn new(
        path: nn::Path,
        in_channels: i64,
        out_channels: i64,
        num_layers: usize,
        groups: i64,
        add_upsample: bool,
    ) -> Result<Self> {
        let resnets = (0..num_layers)
            .map(|i| {
                let input = if i == 0 { in_channels } else { out_channels };
                resnet(&path / "resnets" / i, input, out_channels, groups)
            })
            .collect::<Result<_>>()?;
        let upsampler = add_upsample
            .then(|| Upsample2D::new(&path / "upsamplers" / "0", out_channels, out_channels))
            .transpose()?;
        Ok(Self { resnets, upsampler })
    }

    pub(crate) fn forward(&self, xs: &Tensor) -> Tensor {
        let mut hidden = xs.shallow_clone();
        for resnet in &self.resnets {
            hidden = resnet.forward(&hidden, None);
        }
        match &self.upsampler {
            Some(upsampler) => upsampler.forward(&hidden, None),
            None => hidden,
        }
    }
}
