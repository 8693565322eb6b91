//! SDXL's denoising UNet: diffusers' `UNet2DConditionModel`
//! (`models/unets/unet_2d_condition.py`, diffusers 0.42) restricted to the block types SDXL
//! uses, with the `text_time` added conditioning of "SDXL: Improving Latent Diffusion Models for
//! High-Resolution Image Synthesis" (Podell et al., 2023, <https://arxiv.org/abs/2307.01952>).
//!
//! Parameters carry diffusers' state-dict names, so a [`tch::nn::VarStore`] the model was built
//! on loads `unet/diffusion_pytorch_model.safetensors` as is. Building does not touch the random
//! generator: every parameter starts at zero and is meant to be loaded.

pub mod attention;
pub mod embeddings;
pub mod resnet;
pub mod unet_2d_blocks;

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use crate::layers::{GroupNorm, conv2d};
use crate::{EngineError, Result};
use attention::{Attention, Transformer2DModel};
use embeddings::{TimestepEmbedding, Timesteps};
use unet_2d_blocks::{
    AttentionSettings, CrossAttnDownBlock2D, CrossAttnUpBlock2D, DownBlock, DownBlock2D,
    DownBlockConfig, MidBlockConfig, ResnetSettings, UNetMidBlock2DCrossAttn, UpBlock, UpBlock2D,
    UpBlockConfig,
};

const COMPONENT: &str = "unet";

/// A config value diffusers accepts either once for all blocks or once per block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    /// The same value for every block.
    All(T),
    /// One value per down block, in down-path order.
    Each(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    /// The value of every block, checking the list length against `blocks`.
    pub fn expand(&self, blocks: usize, field: &str) -> Result<Vec<T>> {
        match self {
            PerBlock::All(value) => Ok(vec![value.clone(); blocks]),
            PerBlock::Each(values) if values.len() == blocks => Ok(values.clone()),
            PerBlock::Each(values) => Err(invalid_config(format!(
                "{field} has {} entries for {blocks} down blocks",
                values.len()
            ))),
        }
    }
}

/// The UNet's `config.json`, as diffusers' `UNet2DConditionModel.__init__` takes it.
///
/// Fields keep diffusers' names and defaults; unknown fields are ignored. Everything SDXL's
/// checkpoints set is supported; values that would select block types or conditioning paths
/// SDXL does not use are refused with [`EngineError::InvalidConfig`] when the model is built.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UNetConfig {
    /// Training resolution of the latent (informational only).
    pub sample_size: Option<PerBlock<i64>>,
    /// Latent channels in.
    pub in_channels: i64,
    /// Channels out (the predicted noise).
    pub out_channels: i64,
    /// Maps the input from [0, 1] to [-1, 1] first.
    pub center_input_sample: bool,
    /// Order of the sinusoidal features: `cos, sin` when true.
    pub flip_sin_to_cos: bool,
    /// `downscale_freq_shift` of the sinusoidal features.
    pub freq_shift: f64,
    /// Down block types: `DownBlock2D` or `CrossAttnDownBlock2D`.
    pub down_block_types: Vec<String>,
    /// Middle block type: `UNetMidBlock2DCrossAttn` (the only one supported).
    pub mid_block_type: Option<String>,
    /// Up block types: `UpBlock2D` or `CrossAttnUpBlock2D`.
    pub up_block_types: Vec<String>,
    /// Cross-attention in place of self-attention (unsupported when true).
    pub only_cross_attention: PerBlock<bool>,
    /// Channels of each resolution level.
    pub block_out_channels: Vec<i64>,
    /// Resnets per down block (up blocks have one more).
    pub layers_per_block: PerBlock<i64>,
    /// Padding of the downsampling convolutions.
    pub downsample_padding: i64,
    /// Output scale of the middle block's resnets.
    pub mid_block_scale_factor: f64,
    /// Nonlinearity of resnets and time embedding (`silu`/`swish` supported).
    pub act_fn: String,
    /// Group-norm groups (`null` is unsupported).
    pub norm_num_groups: Option<i64>,
    /// Group-norm epsilon of resnets and the output norm.
    pub norm_eps: f64,
    /// Width of the text states attended to.
    pub cross_attention_dim: PerBlock<i64>,
    /// Transformer blocks per `Transformer2DModel`, per level (nested lists are unsupported).
    pub transformer_layers_per_block: PerBlock<i64>,
    /// Asymmetric transformer depths of the up path (unsupported when set).
    pub reverse_transformer_layers_per_block: Option<Vec<Vec<i64>>>,
    /// Projection of the text states (unsupported when set).
    pub encoder_hid_dim: Option<i64>,
    /// Kind of that projection (unsupported when set).
    pub encoder_hid_dim_type: Option<String>,
    /// Despite the name, the number of attention HEADS per level (diffusers' naming quirk,
    /// <https://github.com/huggingface/diffusers/issues/2011#issuecomment-1547958131>); see
    /// [`UNetConfig::attention_heads`].
    pub attention_head_dim: PerBlock<i64>,
    /// Heads per level, when a config spells them correctly (takes precedence).
    pub num_attention_heads: Option<PerBlock<i64>>,
    /// Two transformers per block (unsupported when true).
    pub dual_cross_attention: bool,
    /// Linear projections in and out of the transformers (SDXL) instead of 1×1 convolutions.
    pub use_linear_projection: bool,
    /// Class-label conditioning (unsupported when set).
    pub class_embed_type: Option<String>,
    /// Added conditioning: `text_time` (SDXL) or none.
    pub addition_embed_type: Option<String>,
    /// Sinusoidal features per added time id (256 for SDXL).
    pub addition_time_embed_dim: Option<i64>,
    /// Number of class embeddings (unsupported when set).
    pub num_class_embeds: Option<i64>,
    /// Attention computed in f32. Without effect here, as in diffusers: its default
    /// scaled-dot-product processor ignores it.
    pub upcast_attention: Option<bool>,
    /// How resnets take the time embedding: `default` (added) or `scale_shift`.
    pub resnet_time_scale_shift: String,
    /// Only read by resnet block types SDXL does not use.
    pub resnet_skip_time_act: bool,
    /// Only read by resnet block types SDXL does not use.
    pub resnet_out_scale_factor: f64,
    /// `positional` (sinusoidal; the only one supported).
    pub time_embedding_type: String,
    /// Width of the time embedding (default `4 × block_out_channels[0]`).
    pub time_embedding_dim: Option<i64>,
    /// Activation applied to the summed embeddings (`null` or `silu`).
    pub time_embedding_act_fn: Option<String>,
    /// Activation after the time MLP (unsupported when set).
    pub timestep_post_act: Option<String>,
    /// Guidance-embedding projection of LCM-style models (unsupported when set).
    pub time_cond_proj_dim: Option<i64>,
    /// Kernel of `conv_in`.
    pub conv_in_kernel: i64,
    /// Kernel of `conv_out`.
    pub conv_out_kernel: i64,
    /// Input width of `add_embedding`: pooled text width + 6 × `addition_time_embed_dim`.
    pub projection_class_embeddings_input_dim: Option<i64>,
    /// `default` (the only one supported; GLIGEN variants are not).
    pub attention_type: String,
    /// Concatenated class embeddings (unsupported when true).
    pub class_embeddings_concat: bool,
    /// Only read by middle block types SDXL does not use.
    pub mid_block_only_cross_attention: Option<bool>,
    /// Normalisation of the text states (unsupported when set).
    pub cross_attention_norm: Option<String>,
    /// Only read by the `text` added conditioning, which SDXL does not use.
    pub addition_embed_type_num_heads: i64,
}

impl Default for UNetConfig {
    /// diffusers' `UNet2DConditionModel` defaults (the SD 1.x layout).
    fn default() -> Self {
        Self {
            sample_size: None,
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: strings(&[
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]),
            mid_block_type: Some("UNetMidBlock2DCrossAttn".to_owned()),
            up_block_types: strings(&[
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ]),
            only_cross_attention: PerBlock::All(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: PerBlock::All(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            act_fn: "silu".to_owned(),
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: PerBlock::All(1280),
            transformer_layers_per_block: PerBlock::All(1),
            reverse_transformer_layers_per_block: None,
            encoder_hid_dim: None,
            encoder_hid_dim_type: None,
            attention_head_dim: PerBlock::All(8),
            num_attention_heads: None,
            dual_cross_attention: false,
            use_linear_projection: false,
            class_embed_type: None,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            num_class_embeds: None,
            upcast_attention: None,
            resnet_time_scale_shift: "default".to_owned(),
            resnet_skip_time_act: false,
            resnet_out_scale_factor: 1.0,
            time_embedding_type: "positional".to_owned(),
            time_embedding_dim: None,
            time_embedding_act_fn: None,
            timestep_post_act: None,
            time_cond_proj_dim: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            projection_class_embeddings_input_dim: None,
            attention_type: "default".to_owned(),
            class_embeddings_concat: false,
            mid_block_only_cross_attention: None,
            cross_attention_norm: None,
            addition_embed_type_num_heads: 64,
        }
    }
}

fn strings(values: &[&str]) -> Vec<String> {
    values.iter().map(|s| (*s).to_owned()).collect()
}

impl UNetConfig {
    /// SDXL 1.0 base: the values of `unet/config.json` in
    /// <https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0> (3 levels of
    /// 320/640/1280 channels, transformer depths 1/2/10 with 5/10/20 heads of 64 channels,
    /// 2048-wide text states from the two text encoders, `text_time` conditioning on the
    /// 1280-wide pooled embedding and six 256-feature time ids: 1280 + 6 × 256 = 2816).
    pub fn sdxl_base() -> Self {
        Self {
            sample_size: Some(PerBlock::All(128)),
            down_block_types: strings(&[
                "DownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
            ]),
            up_block_types: strings(&["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]),
            block_out_channels: vec![320, 640, 1280],
            layers_per_block: PerBlock::All(2),
            cross_attention_dim: PerBlock::All(2048),
            transformer_layers_per_block: PerBlock::Each(vec![1, 2, 10]),
            attention_head_dim: PerBlock::Each(vec![5, 10, 20]),
            use_linear_projection: true,
            addition_embed_type: Some("text_time".to_owned()),
            addition_time_embed_dim: Some(256),
            projection_class_embeddings_input_dim: Some(2816),
            norm_eps: 1e-5,
            ..Self::default()
        }
    }

    /// Parses a diffusers `unet/config.json`.
    pub fn from_json(json: &str) -> Result<Self> {
        serde_json::from_str(json).map_err(|e| invalid_config(format!("config.json: {e}")))
    }

    /// Attention heads per down level: `num_attention_heads` when the config sets it, else
    /// `attention_head_dim` — diffusers' `num_attention_heads or attention_head_dim`, because
    /// early configs stored head counts under the wrong name. (diffusers 0.42 itself still refuses
    /// configs that set `num_attention_heads`; none of SDXL's do.)
    pub fn attention_heads(&self) -> Result<Vec<i64>> {
        let blocks = self.down_block_types.len();
        match &self.num_attention_heads {
            Some(heads) => heads.expand(blocks, "num_attention_heads"),
            None => self.attention_head_dim.expand(blocks, "attention_head_dim"),
        }
    }

    /// Width of the time embedding the blocks receive.
    pub fn time_embed_dim(&self) -> i64 {
        self.time_embedding_dim
            .unwrap_or_else(|| self.block_out_channels.first().copied().unwrap_or(0) * 4)
    }

    /// Checks everything [`UNet2DConditionModel::new`] relies on; returns the per-level layout.
    pub(crate) fn layout(&self) -> Result<Layout> {
        let levels = self.down_block_types.len();
        if levels == 0 {
            return Err(invalid_config("down_block_types is empty".to_owned()));
        }
        if self.up_block_types.len() != levels || self.block_out_channels.len() != levels {
            return Err(invalid_config(format!(
                "{} down blocks, {} up blocks and {} block_out_channels must agree",
                levels,
                self.up_block_types.len(),
                self.block_out_channels.len()
            )));
        }
        let refuse = |cond: bool, what: &str| {
            if cond {
                Err(invalid_config(format!("{what} is not supported")))
            } else {
                Ok(())
            }
        };
        refuse(
            self.only_cross_attention
                .expand(levels, "only_cross_attention")?
                .contains(&true),
            "only_cross_attention",
        )?;
        refuse(self.dual_cross_attention, "dual_cross_attention")?;
        refuse(self.class_embed_type.is_some(), "class_embed_type")?;
        refuse(self.num_class_embeds.is_some(), "num_class_embeds")?;
        refuse(self.class_embeddings_concat, "class_embeddings_concat")?;
        refuse(
            self.encoder_hid_dim.is_some() || self.encoder_hid_dim_type.is_some(),
            "encoder_hid_dim / encoder_hid_dim_type",
        )?;
        refuse(self.timestep_post_act.is_some(), "timestep_post_act")?;
        refuse(self.time_cond_proj_dim.is_some(), "time_cond_proj_dim")?;
        refuse(self.cross_attention_norm.is_some(), "cross_attention_norm")?;
        refuse(
            self.reverse_transformer_layers_per_block.is_some(),
            "reverse_transformer_layers_per_block",
        )?;
        refuse(
            self.attention_type != "default",
            &format!("attention_type {:?}", self.attention_type),
        )?;
        refuse(
            self.time_embedding_type != "positional",
            &format!("time_embedding_type {:?}", self.time_embedding_type),
        )?;
        refuse(
            self.conv_in_kernel % 2 == 0 || self.conv_out_kernel % 2 == 0,
            "an even conv_in_kernel / conv_out_kernel",
        )?;
        let act = Activation::parse(&self.act_fn)?;
        let time_embed_act = self
            .time_embedding_act_fn
            .as_deref()
            .map(Activation::parse)
            .transpose()?;
        let time_scale_shift = match self.resnet_time_scale_shift.as_str() {
            "default" => ResnetTimeScaleShift::Default,
            "scale_shift" => ResnetTimeScaleShift::ScaleShift,
            other => {
                return Err(invalid_config(format!(
                    "resnet_time_scale_shift {other:?} is not supported"
                )));
            }
        };
        let groups = self
            .norm_num_groups
            .ok_or_else(|| invalid_config("norm_num_groups null is not supported".to_owned()))?;
        let added = match self.addition_embed_type.as_deref() {
            None => None,
            Some("text_time") => {
                let time_dim = self.addition_time_embed_dim.ok_or_else(|| {
                    invalid_config("text_time needs addition_time_embed_dim".to_owned())
                })?;
                let input_dim = self.projection_class_embeddings_input_dim.ok_or_else(|| {
                    invalid_config(
                        "text_time needs projection_class_embeddings_input_dim".to_owned(),
                    )
                })?;
                Some((time_dim, input_dim))
            }
            Some(other) => {
                return Err(invalid_config(format!(
                    "addition_embed_type {other:?} is not supported (only \"text_time\")"
                )));
            }
        };
        match self.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") => {}
            other => {
                return Err(invalid_config(format!(
                    "mid_block_type {other:?} is not supported (only \"UNetMidBlock2DCrossAttn\")"
                )));
            }
        }
        let down = self
            .down_block_types
            .iter()
            .map(|name| match name.strip_prefix("UNetRes").unwrap_or(name) {
                "DownBlock2D" => Ok(false),
                "CrossAttnDownBlock2D" => Ok(true),
                other => Err(invalid_config(format!(
                    "down block type {other:?} is not supported"
                ))),
            })
            .collect::<Result<Vec<_>>>()?;
        let up = self
            .up_block_types
            .iter()
            .map(|name| match name.strip_prefix("UNetRes").unwrap_or(name) {
                "UpBlock2D" => Ok(false),
                "CrossAttnUpBlock2D" => Ok(true),
                other => Err(invalid_config(format!(
                    "up block type {other:?} is not supported"
                ))),
            })
            .collect::<Result<Vec<_>>>()?;
        let heads = self.attention_heads()?;
        if let Some(bad) = heads.iter().find(|h| **h <= 0) {
            return Err(invalid_config(format!("{bad} attention heads")));
        }
        let cross_attention_dim = self
            .cross_attention_dim
            .expand(levels, "cross_attention_dim")?;
        let context_dim = cross_attention_dim[levels - 1];
        for (i, (&channels, &level_heads)) in self.block_out_channels.iter().zip(&heads).enumerate()
        {
            let attends = down[i] || up[levels - 1 - i] || i == levels - 1;
            if attends && channels % level_heads != 0 {
                return Err(invalid_config(format!(
                    "level {i}: {channels} channels do not split into {level_heads} heads"
                )));
            }
            // Every block attends to the same text states, so their widths must agree.
            if attends && cross_attention_dim[i] != context_dim {
                return Err(invalid_config(format!(
                    "level {i} attends to {}-wide text states, the middle block to {context_dim}",
                    cross_attention_dim[i]
                )));
            }
        }
        Ok(Layout {
            down,
            up,
            layers: self.layers_per_block.expand(levels, "layers_per_block")?,
            transformer_layers: self
                .transformer_layers_per_block
                .expand(levels, "transformer_layers_per_block")?,
            cross_attention_dim,
            heads,
            resnet: ResnetSettings {
                temb_channels: self.time_embed_dim(),
                groups,
                eps: self.norm_eps,
                act,
                time_scale_shift,
            },
            time_embed_act,
            added,
        })
    }
}

/// The validated, per-level view of a [`UNetConfig`].
pub(crate) struct Layout {
    /// Whether each down block (down-path order) has cross-attention.
    pub(crate) down: Vec<bool>,
    /// Whether each up block (up-path order) has cross-attention.
    pub(crate) up: Vec<bool>,
    /// Resnets per down block.
    pub(crate) layers: Vec<i64>,
    /// Transformer blocks per level.
    pub(crate) transformer_layers: Vec<i64>,
    /// Width of the text states per level.
    pub(crate) cross_attention_dim: Vec<i64>,
    /// Attention heads per level.
    pub(crate) heads: Vec<i64>,
    /// Settings every resnet shares.
    pub(crate) resnet: ResnetSettings,
    /// Activation after the summed embeddings.
    pub(crate) time_embed_act: Option<Activation>,
    /// `(addition_time_embed_dim, projection_class_embeddings_input_dim)` for `text_time`.
    pub(crate) added: Option<(i64, i64)>,
}

impl Layout {
    pub(crate) fn attention(&self, config: &UNetConfig, level: usize) -> AttentionSettings {
        AttentionSettings {
            num_attention_heads: self.heads[level],
            transformer_layers: self.transformer_layers[level],
            cross_attention_dim: self.cross_attention_dim[level],
            use_linear_projection: config.use_linear_projection,
        }
    }
}

/// Nonlinearities diffusers' `get_activation` names and this engine supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu` / `swish`: `x · σ(x)`.
    Silu,
}

impl Activation {
    /// Reads diffusers' name of the activation.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "silu" | "swish" => Ok(Activation::Silu),
            other => Err(invalid_config(format!(
                "activation {other:?} is not supported"
            ))),
        }
    }

    /// Applies the activation.
    pub fn forward(self, xs: &Tensor) -> Tensor {
        match self {
            Activation::Silu => xs.silu(),
        }
    }
}

/// How a resnet takes the time embedding (diffusers' `resnet_time_scale_shift`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResnetTimeScaleShift {
    /// Projected embedding added before `norm2` (SDXL).
    Default,
    /// Projected to a scale and a shift applied after `norm2`.
    ScaleShift,
}

/// The timestep(s) of one UNet call.
#[derive(Debug)]
pub enum Timestep<'a> {
    /// One timestep for the whole batch (as a float; a scheduler's fractional timesteps are kept).
    Value(f64),
    /// A tensor of shape `[]`, `[1]` or `[batch]`, any numeric kind, broadcast to the batch.
    /// Keeping it on the model's device avoids a host round trip.
    Tensor(&'a Tensor),
}

impl From<f64> for Timestep<'_> {
    fn from(value: f64) -> Self {
        Timestep::Value(value)
    }
}

impl<'a> From<&'a Tensor> for Timestep<'a> {
    fn from(value: &'a Tensor) -> Self {
        Timestep::Tensor(value)
    }
}

/// SDXL's `text_time` conditioning (diffusers' `added_cond_kwargs`).
#[derive(Debug)]
pub struct AddedConditioning<'a> {
    /// Pooled projection of the second text encoder, `[batch, 1280]` for SDXL.
    pub text_embeds: &'a Tensor,
    /// Micro-conditioning, `[batch, 6]`: original height, original width, crop top, crop left,
    /// target height, target width (pixels), as the SDXL pipeline's `add_time_ids`.
    pub time_ids: &'a Tensor,
}

/// Residuals a ControlNet adds to the UNet (diffusers' `down_block_additional_residuals` and
/// `mid_block_additional_residual`, always passed together).
#[derive(Debug)]
pub struct ControlResiduals<'a> {
    /// One per skip connection of the down path, in down-path order (conv_in's output first):
    /// each is added to the matching skip before the up path reads it.
    pub down: &'a [Tensor],
    /// Added to the middle block's output.
    pub mid: &'a Tensor,
}

/// SDXL's denoising UNet: diffusers' `UNet2DConditionModel`.
#[derive(Debug)]
pub struct UNet2DConditionModel {
    config: UNetConfig,
    conv_in: nn::Conv2D,
    time: TimeConditioning,
    context_dim: i64,
    down_blocks: Vec<DownBlock>,
    mid_block: UNetMidBlock2DCrossAttn,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_act: Activation,
    conv_out: nn::Conv2D,
    num_upsamplers: u32,
}

impl UNet2DConditionModel {
    /// Builds the model on `path` (usually `vs.root()`); load the weights into the var store
    /// afterwards. Refuses configs outside what SDXL uses with [`EngineError::InvalidConfig`].
    ///
    /// Set the store's dtype before building (`vs.set_kind`) and load with
    /// [`crate::loader::load_var_store`], which converts into the variables' dtype: the
    /// attention layers' `to_q`/`to_k`/`to_v` weights are views of one stacked matrix, and a
    /// cast afterwards (or tch's `VarStore::load` of a file in another dtype) gives each its own
    /// storage — still correct, but each projection is then multiplied separately. The timestep
    /// frequency table is not a variable and stays f32, as in diffusers.
    pub fn new(path: nn::Path, config: &UNetConfig) -> Result<Self> {
        let layout = config.layout()?;
        let c = config;
        let channels = &c.block_out_channels;
        let levels = channels.len();
        let resnet = layout.resnet;

        let conv_in = conv2d(
            &path / "conv_in",
            c.in_channels,
            channels[0],
            c.conv_in_kernel,
            1,
            (c.conv_in_kernel - 1) / 2,
        );
        let time = TimeConditioning::new(&path, c, &layout, COMPONENT)?;

        let mut down_blocks = Vec::with_capacity(levels);
        for (i, &cross) in layout.down.iter().enumerate() {
            let block = DownBlockConfig {
                in_channels: if i == 0 { channels[0] } else { channels[i - 1] },
                out_channels: channels[i],
                num_layers: layout.layers[i],
                add_downsample: i + 1 < levels,
                downsample_padding: c.downsample_padding,
                resnet,
            };
            let block_path = &path / "down_blocks" / i;
            down_blocks.push(if cross {
                DownBlock::CrossAttn(CrossAttnDownBlock2D::new(
                    block_path,
                    &block,
                    &layout.attention(c, i),
                )?)
            } else {
                DownBlock::Plain(DownBlock2D::new(block_path, &block)?)
            });
        }

        let mid_block = UNetMidBlock2DCrossAttn::new(
            &path / "mid_block",
            &MidBlockConfig {
                in_channels: channels[levels - 1],
                num_layers: 1,
                output_scale_factor: c.mid_block_scale_factor,
                resnet,
                attention: layout.attention(c, levels - 1),
            },
        )?;

        let mut up_blocks = Vec::with_capacity(levels);
        let mut output_channel = channels[levels - 1];
        for (i, &cross) in layout.up.iter().enumerate() {
            let level = levels - 1 - i;
            let prev_output_channel = output_channel;
            output_channel = channels[level];
            let block = UpBlockConfig {
                in_channels: channels[level.saturating_sub(1)],
                prev_output_channel,
                out_channels: output_channel,
                num_layers: layout.layers[level] + 1,
                add_upsample: i + 1 < levels,
                resnet,
            };
            let block_path = &path / "up_blocks" / i;
            up_blocks.push(if cross {
                UpBlock::CrossAttn(CrossAttnUpBlock2D::new(
                    block_path,
                    &block,
                    &layout.attention(c, level),
                )?)
            } else {
                UpBlock::Plain(UpBlock2D::new(block_path, &block)?)
            });
        }

        check_groups(channels[0], resnet.groups)?;
        Ok(Self {
            config: config.clone(),
            conv_in,
            time,
            context_dim: layout.cross_attention_dim[levels - 1],
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(
                &path / "conv_norm_out",
                resnet.groups,
                channels[0],
                c.norm_eps,
            ),
            conv_act: resnet.act,
            conv_out: conv2d(
                &path / "conv_out",
                channels[0],
                c.out_channels,
                c.conv_out_kernel,
                1,
                (c.conv_out_kernel - 1) / 2,
            ),
            num_upsamplers: u32::try_from(levels - 1).unwrap_or(u32::MAX),
        })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Skip connections the down path produces, i.e. the down residuals a ControlNet supplies:
    /// `conv_in`'s output, every down resnet's, every downsampler's (9 for SDXL).
    pub fn num_down_residuals(&self) -> usize {
        let levels = self.down_blocks.len();
        1 + levels.saturating_sub(1)
            + self
                .up_blocks
                .iter()
                .map(|block| block.num_skips().saturating_sub(1))
                .sum::<usize>()
    }

    /// Every cross-attention layer, down path, middle and up path.
    fn cross_attentions(&self) -> impl Iterator<Item = &Attention> {
        self.down_blocks
            .iter()
            .flat_map(DownBlock::transformers)
            .chain(self.mid_block.transformers())
            .chain(self.up_blocks.iter().flat_map(UpBlock::transformers))
            .flat_map(Transformer2DModel::cross_attentions)
    }

    /// Computes the keys and values of the text states `context` in every cross-attention
    /// layer once, for every later step over this same tensor ([`Attention::remember_context`]:
    /// call it again after changing the tensor in place or fusing a LoRA). The results are the
    /// same; each step then skips one matrix product per transformer block.
    pub fn remember_context(&self, context: &Tensor) {
        attention::remember_context_in(self.cross_attentions(), context);
    }

    /// Drops what [`Self::remember_context`] stored for `context`.
    pub fn forget_context(&self, context: &Tensor) {
        attention::forget_context_in(self.cross_attentions(), context);
    }

    /// Predicts the noise of `sample`.
    ///
    /// * `sample`: `[batch, in_channels, h, w]` latents (any `h`, `w`: sizes that are not a
    ///   multiple of the overall upsampling factor are handled as diffusers does).
    /// * `timestep`: a float for the whole batch, or a tensor (see [`Timestep`]).
    /// * `encoder_hidden_states`: `[batch, tokens, cross_attention_dim]` text states.
    /// * `added`: the `text_time` conditioning; required when the config has
    ///   `addition_embed_type = "text_time"`, ignored otherwise (as diffusers does).
    pub fn forward<'t>(
        &self,
        sample: &Tensor,
        timestep: impl Into<Timestep<'t>>,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedConditioning<'_>>,
    ) -> Result<Tensor> {
        self.forward_with_control(sample, timestep, encoder_hidden_states, added, None)
    }

    /// [`Self::forward`] with a ControlNet's residuals added where diffusers adds them: each
    /// down-path skip connection gets its residual after the down path has run, the middle
    /// block's output gets `mid`.
    pub fn forward_with_control<'t>(
        &self,
        sample: &Tensor,
        timestep: impl Into<Timestep<'t>>,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedConditioning<'_>>,
        control: Option<&ControlResiduals<'_>>,
    ) -> Result<Tensor> {
        // Inference only: no autograd graph, whatever the var store's requires_grad flags.
        let _no_grad = tch::no_grad_guard();
        let [batch, _, height, width] = check_inputs(
            COMPONENT,
            sample,
            self.config.in_channels,
            encoder_hidden_states,
            self.context_dim,
        )?;

        let overall_up_factor = 1i64 << self.num_upsamplers;
        let forward_upsample_size =
            height % overall_up_factor != 0 || width % overall_up_factor != 0;

        let centered;
        let sample = if self.config.center_input_sample {
            centered = sample * 2.0 - 1.0;
            &centered
        } else {
            sample
        };

        let emb = self.time.forward(sample, batch, timestep.into(), added)?;
        let context = encoder_hidden_states;

        let mut hidden = self.conv_in.forward(sample);
        let mut skips = vec![hidden.shallow_clone()];
        for block in &self.down_blocks {
            let (out, states) = block.forward(&hidden, &emb, context);
            hidden = out;
            skips.extend(states);
        }

        if let Some(control) = control {
            if control.down.len() != skips.len() {
                return Err(invalid_input(format!(
                    "{} down residuals for {} skip connections",
                    control.down.len(),
                    skips.len()
                )));
            }
            for (i, (skip, residual)) in skips.iter_mut().zip(control.down).enumerate() {
                if residual.size() != skip.size() {
                    return Err(invalid_input(format!(
                        "down residual {i} is {:?}, its skip connection {:?}",
                        residual.size(),
                        skip.size()
                    )));
                }
                *skip = &*skip + residual;
            }
        }

        hidden = self.mid_block.forward(&hidden, &emb, context);
        if let Some(control) = control {
            if control.mid.size() != hidden.size() {
                return Err(invalid_input(format!(
                    "mid residual is {:?}, the middle block's output {:?}",
                    control.mid.size(),
                    hidden.size()
                )));
            }
            hidden += control.mid;
        }

        let last = self.up_blocks.len().saturating_sub(1);
        for (i, block) in self.up_blocks.iter().enumerate() {
            let taken = skips.len().saturating_sub(block.num_skips());
            let block_skips = skips.split_off(taken);
            let upsample_size = match skips.last() {
                Some(next) if forward_upsample_size && i < last => {
                    let next = next.size();
                    Some([next[2], next[3]])
                }
                _ => None,
            };
            hidden = block.forward(&hidden, &block_skips, &emb, context, upsample_size);
        }

        let hidden = match self.conv_act {
            Activation::Silu => self.conv_norm_out.forward_silu(&hidden),
        };
        // Contiguous whatever the weights' layout (channels-last convolutions give channels-last
        // maps): the schedulers and the VAE get the layout they expect.
        Ok(self.conv_out.forward(&hidden).contiguous())
    }
}

/// The embedding every resnet receives, shared by the UNet and its ControlNets: the time MLP of
/// the sinusoidal timestep features plus, for `text_time`, the embedding of the pooled text and
/// the micro-conditioning ids (diffusers' `get_time_embed` + `time_embedding` + `get_aug_embed`).
#[derive(Debug)]
pub(crate) struct TimeConditioning {
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    /// `add_time_proj` and `add_embedding` of the `text_time` conditioning.
    add_time: Option<(Timesteps, TimestepEmbedding)>,
    projection_input_dim: i64,
    act: Option<Activation>,
    /// Named in input errors.
    component: &'static str,
}

impl TimeConditioning {
    /// Builds `time_embedding` and `add_embedding` under `path`.
    pub(crate) fn new(
        path: &nn::Path,
        config: &UNetConfig,
        layout: &Layout,
        component: &'static str,
    ) -> Result<Self> {
        let c = config;
        let channels = &c.block_out_channels;
        let device = path.device();
        let time_embed_dim = c.time_embed_dim();
        let time_proj = Timesteps::new(channels[0], c.flip_sin_to_cos, c.freq_shift, device);
        let time_embedding = TimestepEmbedding::new(
            path / "time_embedding",
            channels[0],
            time_embed_dim,
            layout.resnet.act,
        )?;
        let add_time = layout
            .added
            .map(|(time_dim, input_dim)| -> Result<_> {
                Ok((
                    Timesteps::new(time_dim, c.flip_sin_to_cos, c.freq_shift, device),
                    TimestepEmbedding::new(
                        path / "add_embedding",
                        input_dim,
                        time_embed_dim,
                        Activation::Silu,
                    )?,
                ))
            })
            .transpose()?;
        Ok(Self {
            time_proj,
            time_embedding,
            add_time,
            projection_input_dim: layout.added.map_or(0, |(_, input)| input),
            act: layout.time_embed_act,
            component,
        })
    }

    /// The embedding every resnet receives: time MLP of the sinusoidal timestep features, plus
    /// the `text_time` embedding (diffusers' `get_time_embed` + `time_embedding` +
    /// `get_aug_embed`).
    pub(crate) fn forward(
        &self,
        sample: &Tensor,
        batch: i64,
        timestep: Timestep<'_>,
        added: Option<&AddedConditioning<'_>>,
    ) -> Result<Tensor> {
        let device = sample.device();
        let timesteps = match timestep {
            Timestep::Value(t) => Tensor::full([batch], t, (Kind::Float, device)),
            Timestep::Tensor(t) => {
                let t = t.to_device(device);
                match t.size()[..] {
                    [] => t.expand([batch], false),
                    [n] if n == 1 || n == batch => t.expand([batch], false),
                    ref other => {
                        return Err(invalid_input_of(
                            self.component,
                            format!("timestep must be [], [1] or [{batch}], got {other:?}"),
                        ));
                    }
                }
            }
        };
        let t_emb = self.time_proj.forward(&timesteps).to_kind(sample.kind());
        let mut emb = self.time_embedding.forward(&t_emb);

        if let Some((add_time_proj, add_embedding)) = &self.add_time {
            let added = added.ok_or_else(|| {
                invalid_input_of(
                    self.component,
                    "addition_embed_type \"text_time\" needs text_embeds and time_ids".to_owned(),
                )
            })?;
            let text_size = added.text_embeds.size();
            let ids = added.time_ids.numel() as i64;
            let time_width = add_time_proj.num_channels();
            let fits = text_size.len() == 2
                && text_size[0] == batch
                && ids % batch == 0
                && text_size[1] + ids / batch * time_width == self.projection_input_dim;
            if !fits {
                return Err(invalid_input_of(
                    self.component,
                    format!(
                        "text_embeds {text_size:?} and time_ids {:?} do not make the \
                     {}-wide input of add_embedding for batch {batch}",
                        added.time_ids.size(),
                        self.projection_input_dim
                    ),
                ));
            }
            let time_embeds = add_time_proj
                .forward(&added.time_ids.flatten(0, -1))
                .reshape([batch, -1]);
            let add_embeds = Tensor::cat(
                &[
                    added.text_embeds.to_kind(emb.kind()),
                    time_embeds.to_kind(emb.kind()),
                ],
                -1,
            );
            emb += add_embedding.forward(&add_embeds);
        }

        Ok(match self.act {
            Some(act) => act.forward(&emb),
            None => emb,
        })
    }
}

/// Group norms need a positive group count dividing the channels (PyTorch refuses others).
pub(crate) fn check_groups(channels: i64, groups: i64) -> Result<()> {
    if groups <= 0 || channels % groups != 0 {
        return Err(invalid_config(format!(
            "{channels} channels do not split into {groups} groups"
        )));
    }
    Ok(())
}

fn invalid_config(message: String) -> EngineError {
    EngineError::InvalidConfig {
        component: COMPONENT,
        message,
    }
}

fn invalid_input(message: String) -> EngineError {
    invalid_input_of(COMPONENT, message)
}

/// Checks a denoiser's inputs (the UNet's, a ControlNet's): `sample` `[b, in_channels, h, w]`
/// and `encoder_hidden_states` `[b, tokens, context_dim]`; returns the sample's shape.
pub(crate) fn check_inputs(
    component: &'static str,
    sample: &Tensor,
    in_channels: i64,
    encoder_hidden_states: &Tensor,
    context_dim: i64,
) -> Result<[i64; 4]> {
    let size = sample.size();
    let [batch, channels, height, width] = size[..] else {
        return Err(invalid_input_of(
            component,
            format!("sample must be [b, c, h, w], got {size:?}"),
        ));
    };
    if channels != in_channels {
        return Err(invalid_input_of(
            component,
            format!("sample has {channels} channels, the model takes {in_channels}"),
        ));
    }
    let context_size = encoder_hidden_states.size();
    if context_size.len() != 3 || context_size[0] != batch || context_size[2] != context_dim {
        return Err(invalid_input_of(
            component,
            format!(
                "encoder_hidden_states must be [{batch}, tokens, {context_dim}], got {context_size:?}"
            ),
        ));
    }
    Ok([batch, channels, height, width])
}

fn invalid_input_of(component: &'static str, message: String) -> EngineError {
    EngineError::InvalidInput { component, message }
}
