//! The UNet's spatial transformer, after diffusers' `models/transformers/transformer_2d.py`
//! (`Transformer2DModel`, continuous input), `models/attention.py` (`BasicTransformerBlock`,
//! `FeedForward`), `models/activations.py` (`GEGLU`) and `models/attention_processor.py`
//! (`Attention` with the default `AttnProcessor2_0`, i.e. scaled dot-product attention).
//! The block is the one of "High-Resolution Image Synthesis with Latent Diffusion Models"
//! (Rombach et al., 2022, <https://arxiv.org/abs/2112.10752>).

use crate::memo::TensorMemo;
use crate::{kernels, layers};
use tch::Tensor;
use tch::nn::{self, Module};

use crate::Result;

/// Multi-head attention: diffusers' `Attention` as `BasicTransformerBlock` builds it
/// (`to_q`/`to_k`/`to_v` without bias, `to_out.0` with bias).
///
/// The input projections run as one matrix product: self-attention multiplies by `[q; k; v]`
/// stacked, cross-attention by `[k; v]` (the queries come from another source). The stack is
/// one tensor and `to_q.weight`, `to_k.weight`, `to_v.weight` are registered in the var store
/// as views of its rows, so loading and LoRA fusing (both write into those variables in place)
/// fill the stack directly and nothing is stored twice.
///
/// Cross-attention can remember the keys and values of a text-state tensor
/// ([`Attention::remember_context`]): the text is the same at every denoising step, so its
/// projection is computed once per image instead of once per step.
#[derive(Debug)]
pub struct Attention {
    queries: StackedProjection,
    keys_values: Option<StackedProjection>,
    to_out: nn::Linear,
    heads: i64,
    inner: i64,
    /// `[b, m, 2·inner]` keys, then values, by text-state tensor.
    remembered: TensorMemo,
}

/// [`Attention::remember_context`] in each of `layers`, without gradients.
pub(crate) fn remember_context_in<'a>(
    layers: impl Iterator<Item = &'a Attention>,
    context: &Tensor,
) {
    let _no_grad = tch::no_grad_guard();
    for attention in layers {
        attention.remember_context(context);
    }
}

/// [`Attention::forget_context`] in each of `layers`.
pub(crate) fn forget_context_in<'a>(layers: impl Iterator<Item = &'a Attention>, context: &Tensor) {
    for attention in layers {
        attention.forget_context(context);
    }
}

/// Linear maps without bias whose weights are row blocks of one matrix.
#[derive(Debug)]
struct StackedProjection {
    stack: Tensor,
    /// The registered weights, views of `stack` while nothing has replaced their storage.
    parts: Vec<Tensor>,
}

impl StackedProjection {
    /// A zero `[names.len()·out, in_dim]` stack whose row blocks are registered as the `weight`
    /// of each named linear layer under `path`.
    fn new(path: &nn::Path, names: &[&str], out: i64, in_dim: i64) -> StackedProjection {
        let rows = out * names.len() as i64;
        let stack = Tensor::zeros([rows, in_dim], (path.kind(), path.device()));
        let parts = (0_i64..)
            .zip(names)
            .map(|(index, name)| {
                (path / *name).add("weight", stack.narrow(0, index * out, out), false)
            })
            .collect();
        StackedProjection { stack, parts }
    }

    /// `xs` through every part: `[.., parts·out]`, the parts' outputs side by side.
    fn forward(&self, xs: &Tensor) -> Tensor {
        if self.is_stacked() {
            xs.linear(&self.stack, None::<Tensor>)
        } else {
            let outputs: Vec<Tensor> = self
                .parts
                .iter()
                .map(|part| xs.linear(part, None::<Tensor>))
                .collect();
            Tensor::cat(&outputs, -1)
        }
    }

    /// Whether the parts still share the stack's memory. Casting or moving a var store after
    /// building (`VarStore::set_kind`, tch's `VarStore::load` of a file in another dtype) gives
    /// each variable storage of its own; the layer then multiplies part by part, correct and
    /// slower. Build in the run dtype and load with [`crate::loader`] to keep the stack.
    fn is_stacked(&self) -> bool {
        let element = self.stack.kind().elt_size_in_bytes();
        let base = self.stack.data_ptr() as usize;
        let mut offset = 0;
        self.parts.iter().all(|part| {
            let shared = part.data_ptr() as usize == base + offset
                && part.kind() == self.stack.kind()
                && part.device() == self.stack.device();
            offset += part.numel() * element;
            shared
        })
    }
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
        let (queries, keys_values) = match cross_attention_dim {
            None => (
                StackedProjection::new(&path, &["to_q", "to_k", "to_v"], inner, query_dim),
                None,
            ),
            Some(context_dim) => (
                StackedProjection::new(&path, &["to_q"], inner, query_dim),
                Some(StackedProjection::new(
                    &path,
                    &["to_k", "to_v"],
                    inner,
                    context_dim,
                )),
            ),
        };
        Ok(Self {
            queries,
            keys_values,
            to_out: layers::linear(&path / "to_out" / 0, inner, query_dim, true),
            heads,
            inner,
            remembered: TensorMemo::default(),
        })
    }

    /// Computes the keys and values of `context` now, for every later [`Attention::forward`]
    /// over this same tensor. If it is already remembered, the stored keys and values are
    /// overwritten in place (their memory stays where a recorded CUDA graph reads it): do that
    /// whenever the tensor's contents or this layer's weights (a LoRA fused) have changed.
    /// Self-attention has nothing to remember.
    pub fn remember_context(&self, context: &Tensor) {
        if let Some(projection) = &self.keys_values {
            self.remembered.store(context, projection.forward(context));
        }
    }

    /// Drops what [`Attention::remember_context`] stored for `context`.
    pub fn forget_context(&self, context: &Tensor) {
        self.remembered.forget(context);
    }

    /// The keys and values of `context`: remembered, or computed now.
    fn context_keys_values(&self, projection: &StackedProjection, context: &Tensor) -> Tensor {
        self.remembered
            .get(context)
            .unwrap_or_else(|| projection.forward(context))
    }

    /// `xs`: `[b, n, query_dim]`; `context`: `[b, m, cross_attention_dim]` for cross-attention
    /// (`None`: attend over `xs`; self-attention ignores it). Returns `[b, n, query_dim]`.
    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Tensor {
        let batch = xs.size()[0];
        let inner = self.inner;
        let projected = self.queries.forward(xs);
        let (query, key, value) = match &self.keys_values {
            None => (
                projected.narrow(-1, 0, inner),
                projected.narrow(-1, inner, inner),
                projected.narrow(-1, 2 * inner, inner),
            ),
            Some(keys_values) => {
                let kv = self.context_keys_values(keys_values, context.unwrap_or(xs));
                (
                    projected,
                    kv.narrow(-1, 0, inner),
                    kv.narrow(-1, inner, inner),
                )
            }
        };
        let head_dim = inner / self.heads;
        // Views of the projections' columns: each head's values stay contiguous (stride 1),
        // which is what the fused attention kernels ask for.
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
        self.out.forward(&kernels::geglu(&self.proj.forward(xs)))
    }
}

/// Self-attention, cross-attention and feed-forward, each pre-normed and residual:
/// diffusers' `BasicTransformerBlock` with `norm_type="layer_norm"`.
#[derive(Debug)]
pub struct BasicTransformerBlock {
    norm1: layers::LayerNorm,
    attn1: Attention,
    cross: Option<(layers::LayerNorm, Attention)>,
    norm3: layers::LayerNorm,
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
                layers::LayerNorm::new(&path / "norm2", dim, eps),
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
            norm1: layers::LayerNorm::new(&path / "norm1", dim, eps),
            attn1: Attention::new(
                &path / "attn1",
                dim,
                None,
                num_attention_heads,
                attention_head_dim,
            )?,
            cross,
            norm3: layers::LayerNorm::new(&path / "norm3", dim, eps),
            ff: FeedForward::new(&path / "ff", dim)?,
        })
    }

    /// The cross-attention (`attn2`), if the block has one.
    pub fn cross_attention(&self) -> Option<&Attention> {
        self.cross.as_ref().map(|(_, attention)| attention)
    }

    /// `xs`: `[b, n, dim]` tokens; `context`: `[b, m, cross_attention_dim]` text states.
    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Tensor {
        let (update, residual) = self.forward_unsummed(None, xs, context);
        update + residual
    }

    /// [`Self::forward`] of `update + xs` (`xs` alone without an update), returning the
    /// feed-forward's output and the residual stream it is to be added to: each residual
    /// addition is left to the next LayerNorm, which does both in one fused kernel — the next
    /// block's `norm1` for the last one ([`Transformer2DModel`] chains its blocks so).
    pub fn forward_unsummed(
        &self,
        update: Option<&Tensor>,
        xs: &Tensor,
        context: Option<&Tensor>,
    ) -> (Tensor, Tensor) {
        let (xs, normed) = match update {
            Some(update) => self.norm1.add_forward(update, xs),
            None => (xs.shallow_clone(), self.norm1.forward(xs)),
        };
        let attended = self.attn1.forward(&normed, None);
        let (xs, normed) = match &self.cross {
            Some((norm2, attn2)) => {
                let (xs, normed) = norm2.add_forward(&attended, &xs);
                let attended = attn2.forward(&normed, context);
                self.norm3.add_forward(&attended, &xs)
            }
            None => self.norm3.add_forward(&attended, &xs),
        };
        (self.ff.forward(&normed), xs)
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
    norm: layers::GroupNorm,
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
            norm: layers::GroupNorm::new(&path / "norm", c.norm_num_groups, c.in_channels, 1e-6),
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

    /// The cross-attention layers of its transformer blocks.
    pub fn cross_attentions(&self) -> impl Iterator<Item = &Attention> {
        self.transformer_blocks
            .iter()
            .filter_map(BasicTransformerBlock::cross_attention)
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
        let mut update = None;
        for block in &self.transformer_blocks {
            let (next, residual) = block.forward_unsummed(update.as_ref(), &tokens, context);
            (update, tokens) = (Some(next), residual);
        }
        if let Some(update) = update {
            tokens = update + tokens;
        }
        // `[b, h·w, c]` tokens seen as a `[b, c, h, w]` map (a view with channels-last strides).
        let to_map = |t: &Tensor| {
            let channels = t.size()[2];
            t.reshape([batch, height, width, channels])
                .permute([0, 3, 1, 2])
        };
        match &self.proj_out {
            // The residual addition reads the view directly: no separate transposing copy. `xs`
            // comes first so that the sum has its (contiguous) layout.
            Projection::Linear(proj) => xs + to_map(&proj.forward(&tokens)),
            Projection::Conv(proj) => xs + proj.forward(&to_map(&tokens).contiguous()),
        }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tch::{Device, Kind};

    /// Fills every variable of `vs` with seeded normals, in place (as the loader does).
    fn randomize(vs: &nn::VarStore) {
        tch::manual_seed(7);
        let mut variables: Vec<_> = vs.variables().into_iter().collect();
        variables.sort_by(|a, b| a.0.cmp(&b.0));
        tch::no_grad(|| {
            for (_, mut var) in variables {
                let values = Tensor::randn(var.size(), (var.kind(), var.device())) * 0.1;
                var.copy_(&values);
            }
        });
    }

    /// The attention written out with one matrix per projection, from the registered weights.
    fn reference(
        vs: &nn::VarStore,
        xs: &Tensor,
        context: &Tensor,
        heads: i64,
        prefix: &str,
    ) -> Tensor {
        let vars = vs.variables();
        let weight = |name: &str| &vars[&format!("{prefix}.{name}")];
        let (b, n, _) = xs.size3().unwrap();
        let m = context.size()[1];
        let q = xs.matmul(&weight("to_q.weight").tr());
        let k = context.matmul(&weight("to_k.weight").tr());
        let v = context.matmul(&weight("to_v.weight").tr());
        let inner = q.size()[2];
        let d = inner / heads;
        let q = q.view([b, n, heads, d]).permute([0, 2, 1, 3]);
        let k = k.view([b, m, heads, d]).permute([0, 2, 3, 1]);
        let v = v.view([b, m, heads, d]).permute([0, 2, 1, 3]);
        let scores = (q.matmul(&k) / (d as f64).sqrt()).softmax(-1, q.kind());
        let out = scores
            .matmul(&v)
            .permute([0, 2, 1, 3])
            .reshape([b, n, inner]);
        out.matmul(&weight("to_out.0.weight").tr()) + weight("to_out.0.bias")
    }

    #[test]
    fn stacked_projections_match_one_matrix_per_projection() {
        for cross in [None, Some(24)] {
            let vs = nn::VarStore::new(Device::Cpu);
            let attention = Attention::new(vs.root() / "attn", 16, cross, 2, 8).unwrap();
            randomize(&vs);
            let xs = Tensor::randn([2, 5, 16], (Kind::Float, Device::Cpu));
            let context = Tensor::randn([2, 3, cross.unwrap_or(16)], (Kind::Float, Device::Cpu));
            let expected = reference(
                &vs,
                &xs,
                if cross.is_some() { &context } else { &xs },
                2,
                "attn",
            );
            assert!(attention.queries.is_stacked());
            let actual = attention.forward(&xs, Some(&context));
            let error = (&actual - &expected).abs().max().double_value(&[]);
            assert!(error < 1e-5, "cross {cross:?}: max difference {error}");
        }
    }

    #[test]
    fn a_store_cast_after_building_still_gives_the_same_result() {
        for cross in [None, Some(24)] {
            let mut vs = nn::VarStore::new(Device::Cpu);
            let attention = Attention::new(vs.root() / "attn", 16, cross, 2, 8).unwrap();
            randomize(&vs);
            let xs = Tensor::randn([2, 5, 16], (Kind::Float, Device::Cpu));
            let context = Tensor::randn([2, 3, cross.unwrap_or(16)], (Kind::Float, Device::Cpu));
            let stacked = attention.forward(&xs, Some(&context));
            vs.double();
            assert!(!attention.queries.is_stacked());
            let parts = attention.forward(
                &xs.to_kind(Kind::Double),
                Some(&context.to_kind(Kind::Double)),
            );
            assert_eq!(parts.kind(), Kind::Double);
            let error = (parts - stacked.to_kind(Kind::Double))
                .abs()
                .max()
                .double_value(&[]);
            assert!(error < 1e-5, "cross {cross:?}: max difference {error}");
        }
    }

    #[test]
    fn remembered_keys_and_values_give_the_same_result_and_follow_in_place_changes() {
        let vs = nn::VarStore::new(Device::Cpu);
        let attention = Attention::new(vs.root() / "attn", 16, Some(24), 2, 8).unwrap();
        randomize(&vs);
        let xs = Tensor::randn([2, 5, 16], (Kind::Float, Device::Cpu));
        let mut context = Tensor::randn([2, 3, 24], (Kind::Float, Device::Cpu));
        let computed = attention.forward(&xs, Some(&context));
        attention.remember_context(&context);
        let remembered =
            |context: &Tensor| attention.remembered.get(context).map(|kv| kv.data_ptr());
        let stored = remembered(&context).expect("remembered");
        assert_eq!(attention.forward(&xs, Some(&context)), computed);

        // New text in the same buffer: remembered again, in place.
        let other = Tensor::randn([2, 3, 24], (Kind::Float, Device::Cpu));
        context.copy_(&other);
        attention.remember_context(&context);
        assert_eq!(remembered(&context), Some(stored));
        let expected = reference(&vs, &xs, &other, 2, "attn");
        let error = (attention.forward(&xs, Some(&context)) - expected)
            .abs()
            .max()
            .double_value(&[]);
        assert!(error < 1e-5, "max difference {error}");

        // Another tensor with the same values is not the remembered one; forgetting empties.
        attention.forget_context(&context.copy());
        assert_eq!(remembered(&context), Some(stored));
        attention.forget_context(&context);
        assert_eq!(remembered(&context), None);
    }

    /// The residual sum takes the input's layout, although the projection's output is a
    /// channels-last view: the next GroupNorm (and the fused kernels) want a contiguous map.
    #[test]
    fn a_transformer_returns_a_contiguous_map_with_either_projection() {
        for use_linear_projection in [true, false] {
            let vs = nn::VarStore::new(Device::Cpu);
            let config = Transformer2DModelConfig {
                num_attention_heads: 2,
                attention_head_dim: 8,
                in_channels: 16,
                num_layers: 1,
                cross_attention_dim: Some(24),
                norm_num_groups: 4,
                use_linear_projection,
            };
            let transformer = Transformer2DModel::new(vs.root() / "t", &config).unwrap();
            randomize(&vs);
            let xs = Tensor::randn([2, 16, 3, 5], (Kind::Float, Device::Cpu));
            let context = Tensor::randn([2, 7, 24], (Kind::Float, Device::Cpu));
            let out = transformer.forward(&xs, Some(&context));
            assert_eq!(out.size(), [2, 16, 3, 5]);
            assert!(
                out.is_contiguous(),
                "linear projection: {use_linear_projection}"
            );
        }
    }

    #[test]
    fn self_attention_remembers_nothing() {
        let vs = nn::VarStore::new(Device::Cpu);
        let attention = Attention::new(vs.root() / "attn", 16, None, 2, 8).unwrap();
        let xs = Tensor::randn([2, 5, 16], (Kind::Float, Device::Cpu));
        attention.remember_context(&xs);
        assert!(attention.remembered.get(&xs).is_none());
    }
}
