//! The blocks the VAE's encoder and decoder are made of, as diffusers builds them for
//! `AutoencoderKL`: no time embedding, GroupNorm with eps 1e-6, SiLU, output scale 1.
//!
//! Upstream: `diffusers/models/resnet.py` (`ResnetBlock2D`), `downsampling.py` (`Downsample2D`),
//! `upsampling.py` (`Upsample2D`), `attention_processor.py` (`Attention` with `AttnProcessor2_0`)
//! and `unets/unet_2d_blocks.py` (`UNetMidBlock2D`, `DownEncoderBlock2D`, `UpDecoderBlock2D`).

use tch::Tensor;
use tch::nn::{self, Module};

/// The eps of every GroupNorm in the VAE (`resnet_eps=1e-6` in `vae.py`).
const NORM_EPS: f64 = 1e-6;

pub(crate) fn group_norm(path: nn::Path, groups: i64, channels: i64) -> nn::GroupNorm {
    let config = nn::GroupNormConfig {
        eps: NORM_EPS,
        ..Default::default()
    };
    nn::group_norm(path, groups, channels, config)
}

/// A 3×3 convolution with padding 1 (size-preserving at stride 1).
pub(crate) fn conv3x3(path: nn::Path, in_channels: i64, out_channels: i64) -> nn::Conv2D {
    let config = nn::ConvConfig {
        padding: 1,
        ..Default::default()
    };
    nn::conv2d(path, in_channels, out_channels, 3, config)
}

/// A 1×1 convolution.
pub(crate) fn conv1x1(path: nn::Path, in_channels: i64, out_channels: i64) -> nn::Conv2D {
    nn::conv2d(path, in_channels, out_channels, 1, Default::default())
}

/// `ResnetBlock2D` with `temb_channels=None`: norm1 → SiLU → conv1 → norm2 → SiLU → conv2, plus
/// the input (through a 1×1 `conv_shortcut` when the channel count changes).
#[derive(Debug)]
pub(crate) struct ResnetBlock2D {
    norm1: nn::GroupNorm,
    conv1: nn::Conv2D,
    norm2: nn::GroupNorm,
    conv2: nn::Conv2D,
    conv_shortcut: Option<nn::Conv2D>,
}

impl ResnetBlock2D {
    pub(crate) fn new(path: nn::Path, in_channels: i64, out_channels: i64, groups: i64) -> Self {
        let conv_shortcut = (in_channels != out_channels)
            .then(|| conv1x1(&path / "conv_shortcut", in_channels, out_channels));
        Self {
            norm1: group_norm(&path / "norm1", groups, in_channels),
            conv1: conv3x3(&path / "conv1", in_channels, out_channels),
            norm2: group_norm(&path / "norm2", groups, out_channels),
            conv2: conv3x3(&path / "conv2", out_channels, out_channels),
            conv_shortcut,
        }
    }

    pub(crate) fn forward(&self, xs: &Tensor) -> Tensor {
        let hidden = self.conv1.forward(&self.norm1.forward(xs).silu());
        let hidden = self.conv2.forward(&self.norm2.forward(&hidden).silu());
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs),
            None => xs.shallow_clone(),
        };
        shortcut + hidden
    }
}

/// `Downsample2D(use_conv=True, padding=0)`: diffusers pads right and bottom by one, then
/// convolves 3×3 with stride 2 and no padding (the original LDM's asymmetric downsampling).
#[derive(Debug)]
pub(crate) struct Downsample2D {
    conv: nn::Conv2D,
}

impl Downsample2D {
    pub(crate) fn new(path: nn::Path, channels: i64) -> Self {
        let config = nn::ConvConfig {
            stride: 2,
            padding: 0,
            ..Default::default()
        };
        Self {
            conv: nn::conv2d(&path / "conv", channels, channels, 3, config),
        }
    }

    pub(crate) fn forward(&self, xs: &Tensor) -> Tensor {
        // F.pad(x, (0, 1, 0, 1)): (left, right, top, bottom).
        self.conv.forward(&xs.constant_pad_nd([0, 1, 0, 1]))
    }
}

/// `Upsample2D(use_conv=True)`: nearest-neighbour ×2, then a 3×3 convolution.
#[derive(Debug)]
pub(crate) struct Upsample2D {
    conv: nn::Conv2D,
}

impl Upsample2D {
    pub(crate) fn new(path: nn::Path, channels: i64) -> Self {
        Self {
            conv: conv3x3(&path / "conv", channels, channels),
        }
    }

    pub(crate) fn forward(&self, xs: &Tensor) -> Tensor {
        let size = xs.size();
        let (height, width) = (size[2], size[3]);
        // F.interpolate(scale_factor=2.0, mode="nearest") passes the scale on to the kernel.
        let upsampled = xs.upsample_nearest2d([2 * height, 2 * width], 2.0, 2.0);
        self.conv.forward(&upsampled)
    }
}

/// The mid block's `Attention`: one head over all spatial positions, GroupNorm first, q/k/v and
/// `to_out.0` linear with bias, residual connection, `rescale_output_factor` 1.
#[derive(Debug)]
pub(crate) struct SpatialAttention {
    group_norm: nn::GroupNorm,
    to_q: nn::Linear,
    to_k: nn::Linear,
    to_v: nn::Linear,
    to_out: nn::Linear,
}

impl SpatialAttention {
    pub(crate) fn new(path: nn::Path, channels: i64, groups: i64) -> Self {
        let linear = |name: &str| nn::linear(&path / name, channels, channels, Default::default());
        Self {
            group_norm: group_norm(&path / "group_norm", groups, channels),
            to_q: linear("to_q"),
            to_k: linear("to_k"),
            to_v: linear("to_v"),
            to_out: nn::linear(
                &path / "to_out" / "0",
                channels,
                channels,
                Default::default(),
            ),
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
    pub(crate) fn new(path: nn::Path, channels: i64, groups: i64, add_attention: bool) -> Self {
        let resnets = &path / "resnets";
        Self {
            first: ResnetBlock2D::new(&resnets / "0", channels, channels, groups),
            attention: add_attention
                .then(|| SpatialAttention::new(&path / "attentions" / "0", channels, groups)),
            second: ResnetBlock2D::new(&resnets / "1", channels, channels, groups),
        }
    }

    pub(crate) fn forward(&self, xs: &Tensor) -> Tensor {
        let mut hidden = self.first.forward(xs);
        if let Some(attention) = &self.attention {
            hidden = attention.forward(&hidden);
        }
        self.second.forward(&hidden)
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
    ) -> Self {
        let resnets = (0..num_layers)
            .map(|i| {
                let input = if i == 0 { in_channels } else { out_channels };
                ResnetBlock2D::new(&path / "resnets" / i, input, out_channels, groups)
            })
            .collect();
        let downsampler =
            add_downsample.then(|| Downsample2D::new(&path / "downsamplers" / "0", out_channels));
        Self {
            resnets,
            downsampler,
        }
    }

    pub(crate) fn forward(&self, xs: &Tensor) -> Tensor {
        let mut hidden = xs.shallow_clone();
        for resnet in &self.resnets {
            hidden = resnet.forward(&hidden);
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
    ) -> Self {
        let resnets = (0..num_layers)
            .map(|i| {
                let input = if i == 0 { in_channels } else { out_channels };
                ResnetBlock2D::new(&path / "resnets" / i, input, out_channels, groups)
            })
            .collect();
        let upsampler =
            add_upsample.then(|| Upsample2D::new(&path / "upsamplers" / "0", out_channels));
        Self { resnets, upsampler }
    }

    pub(crate) fn forward(&self, xs: &Tensor) -> Tensor {
        let mut hidden = xs.shallow_clone();
        for resnet in &self.resnets {
            hidden = resnet.forward(&hidden);
        }
        match &self.upsampler {
            Some(upsampler) => upsampler.forward(&hidden),
            None => hidden,
        }
    }
}
