//! Residual blocks and resamplers of the UNet, after diffusers' `models/resnet.py`
//! (`ResnetBlock2D`), `models/downsampling.py` (`Downsample2D`) and `models/upsampling.py`
//! (`Upsample2D`).

use crate::layers;
use tch::Tensor;
use tch::nn::{self, Module};

use super::{Activation, ResnetTimeScaleShift};
use crate::Result;

/// Settings of a [`ResnetBlock2D`].
#[derive(Debug, Clone)]
pub struct ResnetBlock2DConfig {
    /// Input channels.
    pub in_channels: i64,
    /// Output channels.
    pub out_channels: i64,
    /// Width of the time embedding, or `None` for a block without `time_emb_proj` (as the VAE's).
    pub temb_channels: Option<i64>,
    /// Groups of `norm1`.
    pub groups: i64,
    /// Groups of `norm2` (diffusers' `groups_out`, defaulting to `groups`).
    pub groups_out: Option<i64>,
    /// Epsilon of both group norms.
    pub eps: f64,
    /// Nonlinearity (diffusers' `non_linearity`).
    pub act: Activation,
    /// How the time embedding enters (diffusers' `time_embedding_norm`).
    pub time_embedding_norm: ResnetTimeScaleShift,
    /// The output is divided by this.
    pub output_scale_factor: f64,
}

/// A pre-norm residual block conditioned on the time embedding: diffusers' `ResnetBlock2D`.
#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: layers::GroupNorm,
    conv1: nn::Conv2D,
    time_emb_proj: Option<nn::Linear>,
    norm2: layers::GroupNorm,
    conv2: nn::Conv2D,
    conv_shortcut: Option<nn::Conv2D>,
    act: Activation,
    time_embedding_norm: ResnetTimeScaleShift,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    /// Builds the block's layers under `path` with diffusers' parameter names.
    pub fn new(path: nn::Path, config: &ResnetBlock2DConfig) -> Result<Self> {
        let c = config;
        let groups_out = c.groups_out.unwrap_or(c.groups);
        super::check_groups(c.in_channels, c.groups)?;
        super::check_groups(c.out_channels, groups_out)?;
        let time_emb_proj = c.temb_channels.map(|temb| {
            let out = match c.time_embedding_norm {
                ResnetTimeScaleShift::Default => c.out_channels,
                ResnetTimeScaleShift::ScaleShift => 2 * c.out_channels,
            };
            layers::linear(&path / "time_emb_proj", temb, out, true)
        });
        let conv_shortcut = (c.in_channels != c.out_channels).then(|| {
            layers::conv2d(
                &path / "conv_shortcut",
                c.in_channels,
                c.out_channels,
                1,
                1,
                0,
            )
        });
        Ok(Self {
            norm1: layers::GroupNorm::new(&path / "norm1", c.groups, c.in_channels, c.eps),
            conv1: layers::conv2d(&path / "conv1", c.in_channels, c.out_channels, 3, 1, 1),
            time_emb_proj,
            norm2: layers::GroupNorm::new(&path / "norm2", groups_out, c.out_channels, c.eps),
            conv2: layers::conv2d(&path / "conv2", c.out_channels, c.out_channels, 3, 1, 1),
            conv_shortcut,
            act: c.act,
            time_embedding_norm: c.time_embedding_norm,
            output_scale_factor: c.output_scale_factor,
        })
    }

    /// `act(norm(xs + shift))`, `shift` `[b, c]` per channel: one fused pass for SiLU.
    fn norm_act(&self, norm: &layers::GroupNorm, xs: &Tensor, shift: Option<&Tensor>) -> Tensor {
        match self.act {
            Activation::Silu => norm.forward_with(xs, shift, true),
        }
    }

    /// `xs`: `[b, in, h, w]`; `temb`: `[b, temb_channels]` (the raw time embedding: the
    /// activation is applied here, as diffusers does). Returns `[b, out, h, w]`.
    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Tensor {
        let hidden = self.conv1.forward(&self.norm_act(&self.norm1, xs, None));
        // `[b, out]` or, scale-shift, `[b, 2 × out]`.
        let temb = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => Some(proj.forward(&self.act.forward(temb))),
            _ => None,
        };
        let hidden = match (self.time_embedding_norm, temb) {
            (ResnetTimeScaleShift::Default, temb) => {
                self.norm_act(&self.norm2, &hidden, temb.as_ref())
            }
            (ResnetTimeScaleShift::ScaleShift, Some(temb)) => {
                let chunks = temb.unsqueeze(-1).unsqueeze(-1).chunk(2, 1);
                let normed = self.norm2.forward(&hidden);
                self.act
                    .forward(&(normed * (&chunks[0] + 1.0) + &chunks[1]))
            }
            (ResnetTimeScaleShift::ScaleShift, None) => self.norm_act(&self.norm2, &hidden, None),
        };
        let hidden = self.conv2.forward(&hidden);
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs),
            None => xs.shallow_clone(),
        };
        let out = shortcut + hidden;
        if self.output_scale_factor == 1.0 {
            out
        } else {
            out / self.output_scale_factor
        }
    }
}

/// Strided 3×3 convolution halving the resolution: diffusers' `Downsample2D` with
/// `use_conv=True` (parameters under `conv`).
#[derive(Debug)]
pub struct Downsample2D {
    conv: nn::Conv2D,
    pad_right_bottom: bool,
}

impl Downsample2D {
    /// `padding` is diffusers' `downsample_padding` (1 for SDXL); with 0 the input is first
    /// padded by one on the right and bottom, as diffusers does.
    pub fn new(path: nn::Path, channels: i64, out_channels: i64, padding: i64) -> Result<Self> {
        Ok(Self {
            conv: layers::conv2d(&path / "conv", channels, out_channels, 3, 2, padding),
            pad_right_bottom: padding == 0,
        })
    }

    /// `[b, c, h, w]` → `[b, out, ⌈h/2⌉, ⌈w/2⌉]` (with padding 1).
    pub fn forward(&self, xs: &Tensor) -> Tensor {
        if self.pad_right_bottom {
            self.conv.forward(&xs.constant_pad_nd([0, 1, 0, 1]))
        } else {
            self.conv.forward(xs)
        }
    }
}

/// Nearest-neighbour doubling followed by a 3×3 convolution: diffusers' `Upsample2D` with
/// `use_conv=True` (parameters under `conv`).
#[derive(Debug)]
pub struct Upsample2D {
    conv: nn::Conv2D,
}

impl Upsample2D {
    /// Builds the convolution `channels → out_channels`.
    pub fn new(path: nn::Path, channels: i64, out_channels: i64) -> Result<Self> {
        Ok(Self {
            conv: layers::conv2d(&path / "conv", channels, out_channels, 3, 1, 1),
        })
    }

    /// Doubles `[b, c, h, w]`, or resizes it to `output_size` when given: the UNet passes the
    /// size of the matching skip connection when the latent is not a multiple of the overall
    /// upsampling factor (diffusers' `forward_upsample_size`).
    pub fn forward(&self, xs: &Tensor, output_size: Option<[i64; 2]>) -> Tensor {
        let upsampled = match output_size {
            Some(size) => xs.upsample_nearest2d(size, None, None),
            None => {
                let size = xs.size();
                let (h, w) = (size[size.len() - 2], size[size.len() - 1]);
                xs.upsample_nearest2d([2 * h, 2 * w], 2.0, 2.0)
            }
        };
        self.conv.forward(&upsampled)
    }
}
