//! `tch::nn` layer builders shared by every model component.
//!
//! Parameters start at zero (a fill: no random generator, no cost beyond the allocation) or,
//! for norms, at tch's constant defaults: the checkpoint provides every value, and drawing
//! random initial values for 3.5 B parameters only to overwrite them would dominate a CPU load.

use tch::nn;

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

/// An affine GroupNorm.
pub(crate) fn group_norm(path: nn::Path, groups: i64, channels: i64, eps: f64) -> nn::GroupNorm {
    nn::group_norm(
        path,
        groups,
        channels,
        nn::GroupNormConfig {
            eps,
            ..Default::default()
        },
    )
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
