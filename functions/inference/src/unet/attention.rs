//! The UNet's spatial transformer, after diffusers' `models/transformers/transformer_2d.py`
//! (`Transformer2DModel`, continuous input), `models/attention.py` (`BasicTransformerBlock`,
//! `FeedForward`), `models/activations.py` (`GEGLU`) and `models/attention_processor.py`
//! (`Attention` with the default `AttnProcessor2_0`, i.e. scaled dot-product attention).
//! The block is the one of "High-Resolution Image Synthesis with Latent Diffusion Models"
//! (Rombach et al., 2022, <https://arxiv.org/abs/2112.10752>).

use crate::layers;
use tch::Tensor;
use tch::nn::{self, Module};

use crate::Result;

/// Multi-head attention: diffusers' `Attention` as `BasicTransformerBlock` builds it
/// (`to_q`/`to_k`/`to_v` without bias, `to_out.0` with bias).
#[derive(Debug)]
pub struct Attention {
    to_q: nn::Linear,
    to_k: nn::Linear,
    to_v: nn::Linear,
    to_out: nn::Linear,
    heads: i64,
}

impl Attention {
    /// `query_dim`: width of the queries (and of the output); `cross_attention_dim`: width of
    /// the keys' source (`None` for self-attention); `heads × dim_head` is the inner width.
    pub fn new(
        path: nn::Path,
        query_dim: i64,
        cross_attention_dim: Option<i64>,
        heads: i64,
        dim_head: i64,
    ) -> Result<Self> {
        let inner = heads * dim_head;
        let kv_dim = cross_attention_dim.unwrap_or(query_dim);
        Ok(Self {
            to_q: layers::linear(&path / "to_q", query_dim, inner, false),
            to_k: layers::linear(&path / "to_k", kv_dim, inner, false),
            to_v: layers::linear(&path / "to_v", kv_dim, inner, false),
            to_out: layers::linear(&path / "to_out" / 0, inner, query_dim, true),
            heads,
        })
    }

    /// `xs`: `[b, n, query_dim]`; `context`: `[b, m, cross_attention_dim]`, or `None` to attend
    /// over `xs` itself. Returns `[b, n, query_dim]`.
    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Tensor {
        let context = context.unwrap_or(xs);
        let batch = xs.size()[0];
        let query = self.to_q.forward(xs);
        let key = self.to_k.forward(context);
        let value = self.to_v.forward(context);
        let inner = query.size()[2];
        let head_dim = inner / self.heads;
        let split = |t: Tensor| t.view([batch, -1, self.heads, head_dim]).transpose(1, 2);
        let attended = Tensor::scaled_dot_product_attention(
            &split(query),
            &split(key),
            &split(value),
            None::<Tensor>,
            0.0,
            false,
            None,
            false,
        );
        let merged = attended.transpose(1, 2).reshape([batch, -1, inner]);
        self.to_out.forward(&merged)
    }
}

/// Position-wise feed-forward with a GELU-gated linear unit: diffusers' `FeedForward` with
/// `activation_fn="geglu"` (`net.0.proj` projects to twice the inner width, `net.2` back).
#[derive(Debug)]
pub struct FeedForward {
    proj: nn::Linear,
    out: nn::Linear,
}

impl FeedForward {
    /// Inner width `4 × dim`, as diffusers' default `mult=4`.
    pub fn new(path: nn::Path, dim: i64) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            proj: layers::linear(&path / "net" / 0 / "proj", dim, 2 * inner, true),
            out: layers::linear(&path / "net" / 2, inner, dim, true),
        })
    }

    /// `[.., dim]` → `[.., dim]`.
    pub fn forward(&self, xs: &Tensor) -> Tensor {
        let projected = self.proj.forward(xs);
        let halves = projected.chunk(2, -1);
        let gated = &halves[0] * halves[1].gelu("none");
        self.out.forward(&gated)
    }
}

/// Self-attention, cross-attention and feed-forward, each pre-normed and residual:
/// diffusers' `BasicTransformerBlock` with `norm_type="layer_norm"`.
#[derive(Debug)]
pub struct BasicTransformerBlock {
    norm1: nn::LayerNorm,
    attn1: Attention,
    cross: Option<(nn::LayerNorm, Attention)>,
    norm3: nn::LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    /// Layer norms use diffusers' default epsilon 1e-5. Without `cross_attention_dim` the block
    /// has no `norm2`/`attn2`, as in diffusers.
    pub fn new(
        path: nn::Path,
        dim: i64,
        num_attention_heads: i64,
        attention_head_dim: i64,
        cross_attention_dim: Option<i64>,
    ) -> Result<Self> {
        let eps = 1e-5;
        let cross = match cross_attention_dim {
            Some(context_dim) => Some((
                layers::layer_norm(&path / "norm2", dim, eps),
                Attention::new(
                    &path / "attn2",
                    dim,
                    Some(context_dim),
                    num_attention_heads,
                    attention_head_dim,
                )?,
            )),
            None => None,
        };
        Ok(Self {
            norm1: layers::layer_norm(&path / "norm1", dim, eps),
            attn1: Attention::new(
                &path / "attn1",
                dim,
                None,
                num_attention_heads,
                attention_head_dim,
            )?,
            cross,
            norm3: layers::layer_norm(&path / "norm3", dim, eps),
            ff: FeedForward::new(&path / "ff", dim)?,
        })
    }

    /// `xs`: `[b, n, dim]` tokens; `context`: `[b, m, cross_attention_dim]` text states.
    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Tensor {
        let xs = self.attn1.forward(&self.norm1.forward(xs), None) + xs;
        let xs = match &self.cross {
            Some((norm2, attn2)) => attn2.forward(&norm2.forward(&xs), context) + xs,
            None => xs,
        };
        self.ff.forward(&self.norm3.forward(&xs)) + xs
    }
}

/// Settings of a [`Transformer2DModel`] inside a UNet block.
#[derive(Debug, Clone)]
pub struct Transformer2DModelConfig {
    /// Number of attention heads.
    pub num_attention_heads: i64,
    /// Width of each head (`in_channels / num_attention_heads` in the UNet's blocks).
    pub attention_head_dim: i64,
    /// Channels of the feature map (and of the output).
    pub in_channels: i64,
    /// Number of stacked [`BasicTransformerBlock`]s (`transformer_layers_per_block`).
    pub num_layers: i64,
    /// Width of the text states attended to (`None`: no cross-attention).
    pub cross_attention_dim: Option<i64>,
    /// Groups of the input group norm (epsilon is fixed at 1e-6, as in diffusers).
    pub norm_num_groups: i64,
    /// Linear `proj_in`/`proj_out` (SDXL) instead of 1×1 convolutions (SD 1.x).
    pub use_linear_projection: bool,
}

#[derive(Debug)]
enum Projection {
    Linear(nn::Linear),
    Conv(nn::Conv2D),
}

impl Projection {
    fn new(path: nn::Path, linear: bool, in_dim: i64, out_dim: i64) -> Self {
        if linear {
            Projection::Linear(layers::linear(path, in_dim, out_dim, true))
        } else {
            Projection::Conv(layers::conv2d(path, in_dim, out_dim, 1, 1, 0))
        }
    }
}

/// A feature map flattened to tokens, run through transformer blocks and added back:
/// diffusers' `Transformer2DModel` on continuous input.
#[derive(Debug)]
pub struct Transformer2DModel {
    norm: nn::GroupNorm,
    proj_in: Projection,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2DModel {
    /// Builds `norm`, `proj_in`, `transformer_blocks.N` and `proj_out` under `path`.
    pub fn new(path: nn::Path, config: &Transformer2DModelConfig) -> Result<Self> {
        let c = config;
        super::check_groups(c.in_channels, c.norm_num_groups)?;
        let inner = c.num_attention_heads * c.attention_head_dim;
        let transformer_blocks = (0..c.num_layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    &path / "transformer_blocks" / i,
                    inner,
                    c.num_attention_heads,
                    c.attention_head_dim,
                    c.cross_attention_dim,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: layers::group_norm(&path / "norm", c.norm_num_groups, c.in_channels, 1e-6),
            proj_in: Projection::new(
                &path / "proj_in",
                c.use_linear_projection,
                c.in_channels,
                inner,
            ),
            transformer_blocks,
            proj_out: Projection::new(
                &path / "proj_out",
                c.use_linear_projection,
                inner,
                c.in_channels,
            ),
        })
    }

    /// `xs`: `[b, c, h, w]`; `context`: `[b, m, cross_attention_dim]`. Returns `[b, c, h, w]`.
    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Tensor {
        let (batch, _, height, width) = dims4(xs);
        let normed = self.norm.forward(xs);
        let to_tokens = |t: &Tensor| {
            let channels = t.size()[1];
            t.permute([0, 2, 3, 1])
                .reshape([batch, height * width, channels])
        };
        let mut tokens = match &self.proj_in {
            Projection::Linear(proj) => proj.forward(&to_tokens(&normed)),
            Projection::Conv(proj) => to_tokens(&proj.forward(&normed)),
        };
        for block in &self.transformer_blocks {
            tokens = block.forward(&tokens, context);
        }
        let to_map = |t: &Tensor| {
            let channels = t.size()[2];
            t.reshape([batch, height, width, channels])
                .permute([0, 3, 1, 2])
                .contiguous()
        };
        let out = match &self.proj_out {
            Projection::Linear(proj) => to_map(&proj.forward(&tokens)),
            Projection::Conv(proj) => proj.forward(&to_map(&tokens)),
        };
        out + xs
    }
}

/// `(b, c, h, w)` of a 4-d tensor (panics otherwise, as libtorch would on the next op).
pub(crate) fn dims4(xs: &Tensor) -> (i64, i64, i64, i64) {
    let size = xs.size();
    assert_eq!(
        size.len(),
        4,
        "expected a [b, c, h, w] tensor, got {size:?}"
    );
    (size[0], size[1], size[2], size[3])
}
