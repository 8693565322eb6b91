//! `tch::nn` layer builders shared by every model component, and the GroupNorm they share.
//!
//! Parameters start at zero (a fill: no random generator, no cost beyond the allocation) or,
//! for norms, at tch's constant defaults: the checkpoint provides every value, and drawing
//! random initial values for 3.5 B parameters only to overwrite them would dominate a CPU load.

use tch::{Tensor, nn};

use crate::kernels;

const ZERO: nn::Init = nn::Init::Const(0.0);

/// A linear layer `in_dim → out_dim`, with or without bias.
pub(crate) fn linear(path: nn::Path, in_dim: i64, out_dim: i64, bias: bool) -> nn::Linear {
    nn::linear(
        path,
        in_dim,
        out_dim,
        nn::LinearConfig {
            ws_init: ZERO,
            bs_init: Some(ZERO),
            bias,
        },
    )
}

/// A square-kernel 2-D convolution with bias.
pub(crate) fn conv2d(
    path: nn::Path,
    in_dim: i64,
    out_dim: i64,
    kernel: i64,
    stride: i64,
    padding: i64,
) -> nn::Conv2D {
    nn::conv2d(
        path,
        in_dim,
        out_dim,
        kernel,
        nn::ConvConfig {
            stride,
            padding,
            ws_init: ZERO,
            bs_init: ZERO,
            ..Default::default()
        },
    )
}

/// A square-kernel 2-D convolution without bias.
pub(crate) fn conv2d_no_bias(
    path: nn::Path,
    in_dim: i64,
    out_dim: i64,
    kernel: i64,
    padding: i64,
) -> nn::Conv2D {
    nn::conv2d(
        path,
        in_dim,
        out_dim,
        kernel,
        nn::ConvConfig {
            padding,
            bias: false,
            ws_init: ZERO,
            ..Default::default()
        },
    )
}

/// A square-kernel 2-D transposed convolution with bias, no padding.
pub(crate) fn conv_transpose2d(
    path: nn::Path,
    in_dim: i64,
    out_dim: i64,
    kernel: i64,
    stride: i64,
) -> nn::ConvTranspose2D {
    nn::conv_transpose2d(
        path,
        in_dim,
        out_dim,
        kernel,
        nn::ConvTransposeConfig {
            stride,
            ws_init: ZERO,
            bs_init: ZERO,
            ..Default::default()
        },
    )
}

/// An affine GroupNorm (diffusers' `nn.GroupNorm` parameters `weight` and `bias`), which can
/// also add a per-channel shift first and apply SiLU after: the residual blocks' sequence, which
/// [`crate::kernels`] runs fused on CUDA when asked.
#[derive(Debug)]
pub(crate) struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: i64,
    eps: f64,
}

impl GroupNorm {
    /// `weight` (ones) and `bias` (zeros) of `channels` values under `path`.
    pub(crate) fn new(path: nn::Path, groups: i64, channels: i64, eps: f64) -> Self {
        Self {
            weight: path.var("weight", &[channels], nn::Init::Const(1.0)),
            bias: path.var("bias", &[channels], ZERO),
            groups,
            eps,
        }
    }

    /// `[n, c, ...]` normalised per sample and group of channels, then scaled and shifted.
    pub(crate) fn forward(&self, xs: &Tensor) -> Tensor {
        self.forward_with(xs, None, false)
    }

    /// `silu(norm(xs))`.
    pub(crate) fn forward_silu(&self, xs: &Tensor) -> Tensor {
        self.forward_with(xs, None, true)
    }

    /// `act(norm(xs + shift))` with `shift` `[n, c]` added to each channel; `act` is SiLU when
    /// `silu`, else the identity.
    pub(crate) fn forward_with(&self, xs: &Tensor, shift: Option<&Tensor>, silu: bool) -> Tensor {
        let affine = (&self.weight, &self.bias);
        kernels::group_norm(xs, shift, affine, self.groups, self.eps, silu)
    }
}

/// An affine LayerNorm over the last dimension (diffusers' `nn.LayerNorm` parameters), which can
/// also take the residual addition before it: the transformer blocks' sequence, which
/// [`crate::kernels`] runs fused on CUDA when asked.
#[derive(Debug)]
pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// `weight` (ones) and `bias` (zeros) of `dim` values under `path`.
    pub(crate) fn new(path: nn::Path, dim: i64, eps: f64) -> Self {
        Self {
            weight: path.var("weight", &[dim], nn::Init::Const(1.0)),
            bias: path.var("bias", &[dim], ZERO),
            eps,
        }
    }

    /// Normalised over the last dimension, then scaled and shifted.
    pub(crate) fn forward(&self, xs: &Tensor) -> Tensor {
        let width = xs.size().last().copied().unwrap_or(1);
        xs.layer_norm(
            [width],
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )
    }

    /// `(a + b, norm(a + b))`.
    pub(crate) fn add_forward(&self, a: &Tensor, b: &Tensor) -> (Tensor, Tensor) {
        kernels::add_layer_norm(a, b, (&self.weight, &self.bias), self.eps)
    }
}

/// An affine LayerNorm over the last dimension.
pub(crate) fn layer_norm(path: nn::Path, dim: i64, eps: f64) -> nn::LayerNorm {
    nn::layer_norm(
        path,
        vec![dim],
        nn::LayerNormConfig {
            eps,
            ..Default::default()
        },
    )
}

/// An embedding table of `count` rows of `dim` values.
pub(crate) fn embedding(path: nn::Path, count: i64, dim: i64) -> nn::Embedding {
    nn::embedding(
        path,
        count,
        dim,
        nn::EmbeddingConfig {
            ws_init: ZERO,
            ..Default::default()
        },
    )
}
