//! The DINOv2 vision transformer as Depth Anything's backbone, after transformers'
//! `models/dinov2/modeling_dinov2.py` (`Dinov2Backbone`) and "DINOv2: Learning Robust Visual
//! Features without Supervision" (Oquab et al., 2023, <https://arxiv.org/abs/2304.07193>).

use serde::Deserialize;
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use crate::layers;
use crate::{EngineError, Result};

const COMPONENT: &str = "depth backbone";

/// transformers' `Dinov2Config`, the fields the backbone reads (defaults: transformers').
#[derive(Debug, Clone, Deserialize)]
pub struct Dinov2Config {
    /// Token width.
    #[serde(default = "default_hidden_size")]
    pub hidden_size: i64,
    /// Transformer layers.
    #[serde(default = "default_layers")]
    pub num_hidden_layers: i64,
    /// Attention heads.
    #[serde(default = "default_layers")]
    pub num_attention_heads: i64,
    /// MLP width as a multiple of `hidden_size`.
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    /// The MLP's activation (only `gelu`).
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// The square training size the position embeddings were learnt for.
    #[serde(default = "default_image_size")]
    pub image_size: i64,
    /// Side of a patch in pixels.
    #[serde(default = "default_patch")]
    pub patch_size: i64,
    /// Input channels.
    #[serde(default = "default_channels")]
    pub num_channels: i64,
    /// Biases on the query, key and value projections.
    #[serde(default = "yes")]
    pub qkv_bias: bool,
    /// A SwiGLU MLP (DINOv2 giant) instead of fc1 → GELU → fc2 (not supported).
    #[serde(default)]
    pub use_swiglu_ffn: bool,
    /// A learnt mask token is stored (unused at inference, loaded so the file matches).
    #[serde(default = "yes")]
    pub use_mask_token: bool,
    /// Stages whose output the backbone returns (`0` is the embeddings, `i` layer `i`'s output).
    #[serde(default)]
    pub out_indices: Vec<i64>,
    /// The final LayerNorm applied to each returned stage.
    #[serde(default = "yes")]
    pub apply_layernorm: bool,
}

fn default_hidden_size() -> i64 {
    768
}
fn default_layers() -> i64 {
    12
}
fn default_mlp_ratio() -> f64 {
    4.0
}
fn default_act() -> String {
    "gelu".to_owned()
}
fn default_eps() -> f64 {
    1e-6
}
fn default_image_size() -> i64 {
    224
}
fn default_patch() -> i64 {
    14
}
fn default_channels() -> i64 {
    3
}
fn yes() -> bool {
    true
}

fn invalid(message: String) -> EngineError {
    EngineError::InvalidConfig {
        component: COMPONENT,
        message,
    }
}

impl Dinov2Config {
    /// Refuses what this backbone does not build.
    pub fn validate(&self) -> Result<()> {
        if self.use_swiglu_ffn {
            return Err(invalid(
                "use_swiglu_ffn (DINOv2 giant) is not supported".to_owned(),
            ));
        }
        if self.hidden_act != "gelu" {
            return Err(invalid(format!(
                "hidden_act {:?} is not supported (only gelu)",
                self.hidden_act
            )));
        }
        if self.num_attention_heads <= 0 || self.hidden_size % self.num_attention_heads != 0 {
            return Err(invalid(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if self.patch_size <= 0 || self.image_size < self.patch_size {
            return Err(invalid(format!(
                "patch_size {} and image_size {} do not make a patch grid",
                self.patch_size, self.image_size
            )));
        }
        if self.out_indices.is_empty()
            || self
                .out_indices
                .iter()
                .any(|&i| i < 0 || i > self.num_hidden_layers)
        {
            return Err(invalid(format!(
                "out_indices {:?} must name stages 0..={}",
                self.out_indices, self.num_hidden_layers
            )));
        }
        Ok(())
    }
}

/// Multi-head self-attention with biased projections (`attention.attention.{query,key,value}`,
/// `attention.output.dense`).
#[derive(Debug)]
struct SelfAttention {
    query: nn::Linear,
    key: nn::Linear,
    value: nn::Linear,
    output: nn::Linear,
    heads: i64,
}

impl SelfAttention {
    fn new(path: nn::Path, c: &Dinov2Config) -> Self {
        let d = c.hidden_size;
        let inner = &path / "attention";
        SelfAttention {
            query: layers::linear(&inner / "query", d, d, c.qkv_bias),
            key: layers::linear(&inner / "key", d, d, c.qkv_bias),
            value: layers::linear(&inner / "value", d, d, c.qkv_bias),
            output: layers::linear(&path / "output" / "dense", d, d, true),
            heads: c.num_attention_heads,
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let (batch, tokens, width) = xs.size3().unwrap_or((0, 0, 0));
        let head_dim = width / self.heads;
        let split = |t: Tensor| {
            t.view([batch, tokens, self.heads, head_dim])
                .transpose(1, 2)
        };
        let attended = Tensor::scaled_dot_product_attention(
            &split(self.query.forward(xs)),
            &split(self.key.forward(xs)),
            &split(self.value.forward(xs)),
            None::<Tensor>,
            0.0,
            false,
            None,
            false,
        );
        self.output
            .forward(&attended.transpose(1, 2).reshape([batch, tokens, width]))
    }
}

/// One pre-norm transformer layer with layer scale: `x + γ₁·attn(norm1 x)`, then
/// `x + γ₂·mlp(norm2 x)`.
#[derive(Debug)]
struct Layer {
    norm1: nn::LayerNorm,
    attention: SelfAttention,
    layer_scale1: Tensor,
    norm2: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    layer_scale2: Tensor,
}

impl Layer {
    fn new(path: nn::Path, c: &Dinov2Config) -> Self {
        let d = c.hidden_size;
        let hidden = (d as f64 * c.mlp_ratio) as i64;
        let scale = |name: &str| (&path / name).var("lambda1", &[d], nn::Init::Const(0.0));
        Layer {
            norm1: layers::layer_norm(&path / "norm1", d, c.layer_norm_eps),
            attention: SelfAttention::new(&path / "attention", c),
            layer_scale1: scale("layer_scale1"),
            norm2: layers::layer_norm(&path / "norm2", d, c.layer_norm_eps),
            fc1: layers::linear(&path / "mlp" / "fc1", d, hidden, true),
            fc2: layers::linear(&path / "mlp" / "fc2", hidden, d, true),
            layer_scale2: scale("layer_scale2"),
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let xs = self.attention.forward(&self.norm1.forward(xs)) * &self.layer_scale1 + xs;
        let mlp = self
            .fc2
            .forward(&self.fc1.forward(&self.norm2.forward(&xs)).gelu("none"));
        mlp * &self.layer_scale2 + xs
    }
}

/// transformers' `Dinov2Backbone` (parameters under `backbone.`): patch and position
/// embeddings with a class token, the layers, and the final LayerNorm on each returned stage.
#[derive(Debug)]
pub struct Dinov2Backbone {
    config: Dinov2Config,
    cls_token: Tensor,
    position_embeddings: Tensor,
    patch_embeddings: nn::Conv2D,
    layers: Vec<Layer>,
    layernorm: nn::LayerNorm,
}

impl Dinov2Backbone {
    /// Builds the parameters under `path` (`backbone`).
    pub fn new(path: nn::Path, config: &Dinov2Config) -> Result<Self> {
        config.validate()?;
        let c = config;
        let d = c.hidden_size;
        let embeddings = &path / "embeddings";
        let grid = c.image_size / c.patch_size;
        let zero = nn::Init::Const(0.0);
        let cls_token = embeddings.var("cls_token", &[1, 1, d], zero);
        if c.use_mask_token {
            // Stored in every checkpoint, used only for masked pre-training.
            let _mask_token = embeddings.var("mask_token", &[1, d], zero);
        }
        let position_embeddings =
            embeddings.var("position_embeddings", &[1, grid * grid + 1, d], zero);
        let patch_embeddings = layers::conv2d(
            &embeddings / "patch_embeddings" / "projection",
            c.num_channels,
            d,
            c.patch_size,
            c.patch_size,
            0,
        );
        let layers = (0..c.num_hidden_layers)
            .map(|i| Layer::new(&path / "encoder" / "layer" / i, c))
            .collect();
        Ok(Dinov2Backbone {
            config: config.clone(),
            cls_token,
            position_embeddings,
            patch_embeddings,
            layers,
            layernorm: layers::layer_norm(&path / "layernorm", d, c.layer_norm_eps),
        })
    }

    /// The position embeddings for a `rows × cols` patch grid: as learnt when the grid is the
    /// training one, else the patch part resized bicubically (in f32, corners not aligned).
    fn positions(&self, rows: i64, cols: i64) -> Tensor {
        let stored = self.position_embeddings.size()[1] - 1;
        if rows * cols == stored && rows == cols {
            return self.position_embeddings.shallow_clone();
        }
        let d = self.config.hidden_size;
        let side = (stored as f64).sqrt() as i64;
        let class = self.position_embeddings.narrow(1, 0, 1);
        let patches = self
            .position_embeddings
            .narrow(1, 1, stored)
            .reshape([1, side, side, d])
            .permute([0, 3, 1, 2]);
        let kind = patches.kind();
        let resized = patches
            .to_kind(Kind::Float)
            .upsample_bicubic2d([rows, cols], false, None, None)
            .to_kind(kind)
            .permute([0, 2, 3, 1])
            .reshape([1, rows * cols, d]);
        Tensor::cat(&[class, resized], 1)
    }

    /// `pixels` `[b, 3, H, W]` (sides multiples of the patch size) → the returned stages, each
    /// `[b, 1 + rows·cols, hidden]` (class token first), after the final LayerNorm.
    pub fn forward(&self, pixels: &Tensor) -> Vec<Tensor> {
        let (batch, _, height, width) = pixels.size4().unwrap_or((0, 0, 0, 0));
        let (rows, cols) = (
            height / self.config.patch_size,
            width / self.config.patch_size,
        );
        let patches = self
            .patch_embeddings
            .forward(pixels)
            .flatten(2, 3)
            .transpose(1, 2);
        let class = self.cls_token.expand([batch, -1, -1], false);
        let mut hidden = Tensor::cat(&[class, patches], 1) + self.positions(rows, cols);
        let mut stages = Vec::with_capacity(self.config.out_indices.len());
        let mut keep = |index: i64, hidden: &Tensor| {
            if self.config.out_indices.contains(&index) {
                stages.push(if self.config.apply_layernorm {
                    self.layernorm.forward(hidden)
                } else {
                    hidden.shallow_clone()
                });
            }
        };
        keep(0, &hidden);
        for (index, layer) in (1..).zip(&self.layers) {
            hidden = layer.forward(&hidden);
            keep(index, &hidden);
        }
        stages
    }
}
