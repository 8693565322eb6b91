//! ControlNet for SDXL: diffusers' `ControlNetModel` (`models/controlnets/controlnet.py`,
//! diffusers 0.42), after "Adding Conditional Control to Text-to-Image Diffusion Models"
//! (Zhang, Rao and Agrawala, 2023, <https://arxiv.org/abs/2302.05543>).
//!
//! A trainable copy of the UNet's down path and middle block reads the noisy latents plus an
//! embedding of a control image (edges, depth, pose…) and hands the UNet one residual per skip
//! connection and one for the middle block, each through a 1×1 convolution trained from zero
//! ([`crate::unet::ControlResiduals`]). The parts it shares with the UNet are the UNet's own
//! block types, built with the same parameter names, so a diffusers ControlNet folder
//! (`config.json` + `diffusion_pytorch_model.safetensors`) loads as is ([`ControlNet::load`]).

use std::path::{Path, PathBuf};

use image::RgbImage;
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use crate::device::DType;
use crate::layers::conv2d;
use crate::loader::{Component, ComponentSource, WeightVariant};
use crate::memo::TensorMemo;
use crate::unet::attention::{self, Attention, Transformer2DModel};
use crate::unet::unet_2d_blocks::{
    CrossAttnDownBlock2D, DownBlock, DownBlock2D, DownBlockConfig, MidBlockConfig,
    UNetMidBlock2DCrossAttn,
};
use crate::unet::{
    AddedConditioning, ControlResiduals, PerBlock, TimeConditioning, Timestep, UNetConfig,
    check_groups,
};
use crate::{EngineError, Result};

const COMPONENT: &str = "controlnet";

/// A ControlNet's `config.json`, as diffusers' `ControlNetModel.__init__` takes it.
///
/// Fields keep diffusers' names and defaults; unknown fields are ignored. The network settings
/// mean what they mean in [`UNetConfig`] (a ControlNet copies its base UNet's down path); the
/// same values are supported, anything else is refused with [`EngineError::InvalidConfig`] when
/// the model is built.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ControlNetConfig {
    /// Latent channels in.
    pub in_channels: i64,
    /// Channels of the control image.
    pub conditioning_channels: i64,
    /// Order of the sinusoidal features: `cos, sin` when true.
    pub flip_sin_to_cos: bool,
    /// `downscale_freq_shift` of the sinusoidal features.
    pub freq_shift: f64,
    /// Down block types: `DownBlock2D` or `CrossAttnDownBlock2D`.
    pub down_block_types: Vec<String>,
    /// Middle block type: `UNetMidBlock2DCrossAttn` (the only one supported).
    pub mid_block_type: Option<String>,
    /// Cross-attention in place of self-attention (unsupported when true).
    pub only_cross_attention: PerBlock<bool>,
    /// Channels of each resolution level.
    pub block_out_channels: Vec<i64>,
    /// Resnets per down block.
    pub layers_per_block: i64,
    /// Padding of the downsampling convolutions.
    pub downsample_padding: i64,
    /// Output scale of the middle block's resnets.
    pub mid_block_scale_factor: f64,
    /// Nonlinearity of resnets and time embedding (`silu`/`swish` supported).
    pub act_fn: String,
    /// Group-norm groups (`null` is unsupported).
    pub norm_num_groups: Option<i64>,
    /// Group-norm epsilon.
    pub norm_eps: f64,
    /// Width of the text states attended to.
    pub cross_attention_dim: i64,
    /// Transformer blocks per level.
    pub transformer_layers_per_block: PerBlock<i64>,
    /// Projection of the text states (unsupported when set).
    pub encoder_hid_dim: Option<i64>,
    /// Kind of that projection (unsupported when set).
    pub encoder_hid_dim_type: Option<String>,
    /// Attention heads per level (diffusers' naming quirk; see [`UNetConfig::attention_heads`]).
    pub attention_head_dim: PerBlock<i64>,
    /// Heads per level, when a config spells them correctly (takes precedence).
    pub num_attention_heads: Option<PerBlock<i64>>,
    /// Linear projections in and out of the transformers (SDXL).
    pub use_linear_projection: bool,
    /// Class-label conditioning (unsupported when set).
    pub class_embed_type: Option<String>,
    /// Added conditioning: `text_time` (SDXL) or none.
    pub addition_embed_type: Option<String>,
    /// Sinusoidal features per added time id (256 for SDXL).
    pub addition_time_embed_dim: Option<i64>,
    /// Number of class embeddings (unsupported when set).
    pub num_class_embeds: Option<i64>,
    /// Without effect, as in diffusers' default attention processor.
    pub upcast_attention: Option<bool>,
    /// How resnets take the time embedding: `default` or `scale_shift`.
    pub resnet_time_scale_shift: String,
    /// Input width of `add_embedding`: pooled text width + 6 × `addition_time_embed_dim`.
    pub projection_class_embeddings_input_dim: Option<i64>,
    /// `rgb`, or `bgr` for ControlNets trained on BGR images (the channels are flipped first).
    pub controlnet_conditioning_channel_order: String,
    /// Channels of the control-image embedding's stages; each stage after the first halves the
    /// resolution, so `n` entries map an image to latents `2^(n−1)` times smaller.
    pub conditioning_embedding_out_channels: Option<Vec<i64>>,
    /// Residuals averaged over space (shuffle-style ControlNets of SD 1.5; no SDXL ControlNet
    /// sets it). The model supports it; [`crate::pipeline`] refuses such ControlNets, since
    /// diffusers then switches its pipeline to guess mode.
    pub global_pool_conditions: bool,
    /// Only read by the `text` added conditioning, which SDXL does not use.
    pub addition_embed_type_num_heads: i64,
}

impl Default for ControlNetConfig {
    /// diffusers' `ControlNetModel` defaults (the SD 1.x layout).
    fn default() -> Self {
        let unet = UNetConfig::default();
        Self {
            in_channels: unet.in_channels,
            conditioning_channels: 3,
            flip_sin_to_cos: unet.flip_sin_to_cos,
            freq_shift: unet.freq_shift,
            down_block_types: unet.down_block_types,
            mid_block_type: unet.mid_block_type,
            only_cross_attention: unet.only_cross_attention,
            block_out_channels: unet.block_out_channels,
            layers_per_block: 2,
            downsample_padding: unet.downsample_padding,
            mid_block_scale_factor: unet.mid_block_scale_factor,
            act_fn: unet.act_fn,
            norm_num_groups: unet.norm_num_groups,
            norm_eps: unet.norm_eps,
            cross_attention_dim: 1280,
            transformer_layers_per_block: unet.transformer_layers_per_block,
            encoder_hid_dim: None,
            encoder_hid_dim_type: None,
            attention_head_dim: unet.attention_head_dim,
            num_attention_heads: None,
            use_linear_projection: false,
            class_embed_type: None,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            num_class_embeds: None,
            upcast_attention: Some(false),
            resnet_time_scale_shift: unet.resnet_time_scale_shift,
            projection_class_embeddings_input_dim: None,
            controlnet_conditioning_channel_order: "rgb".to_owned(),
            conditioning_embedding_out_channels: Some(vec![16, 32, 96, 256]),
            global_pool_conditions: false,
            addition_embed_type_num_heads: 64,
        }
    }
}

impl ControlNetConfig {
    /// An SDXL 1.0 ControlNet: the configuration `ControlNetModel.from_unet` derives from SDXL
    /// base's UNet, which is what `diffusers/controlnet-canny-sdxl-1.0` and
    /// `diffusers/controlnet-depth-sdxl-1.0` ship in their `config.json`.
    pub fn sdxl() -> Self {
        Self::from_unet(&UNetConfig::sdxl_base())
    }

    /// The configuration diffusers' `ControlNetModel.from_unet(unet)` gives a ControlNet for
    /// `unet` (default conditioning embedding, RGB order). A per-block `layers_per_block` or
    /// `cross_attention_dim`, which a ControlNet cannot express, takes the first entry.
    pub fn from_unet(unet: &UNetConfig) -> Self {
        let first = |value: &PerBlock<i64>, default: i64| match value {
            PerBlock::All(v) => *v,
            PerBlock::Each(values) => values.first().copied().unwrap_or(default),
        };
        Self {
            in_channels: unet.in_channels,
            flip_sin_to_cos: unet.flip_sin_to_cos,
            freq_shift: unet.freq_shift,
            down_block_types: unet.down_block_types.clone(),
            mid_block_type: unet.mid_block_type.clone(),
            only_cross_attention: unet.only_cross_attention.clone(),
            block_out_channels: unet.block_out_channels.clone(),
            layers_per_block: first(&unet.layers_per_block, 2),
            downsample_padding: unet.downsample_padding,
            mid_block_scale_factor: unet.mid_block_scale_factor,
            act_fn: unet.act_fn.clone(),
            norm_num_groups: unet.norm_num_groups,
            norm_eps: unet.norm_eps,
            cross_attention_dim: first(&unet.cross_attention_dim, 1280),
            transformer_layers_per_block: unet.transformer_layers_per_block.clone(),
            encoder_hid_dim: unet.encoder_hid_dim,
            encoder_hid_dim_type: unet.encoder_hid_dim_type.clone(),
            attention_head_dim: unet.attention_head_dim.clone(),
            num_attention_heads: unet.num_attention_heads.clone(),
            use_linear_projection: unet.use_linear_projection,
            class_embed_type: unet.class_embed_type.clone(),
            addition_embed_type: unet.addition_embed_type.clone(),
            addition_time_embed_dim: unet.addition_time_embed_dim,
            num_class_embeds: unet.num_class_embeds,
            upcast_attention: unet.upcast_attention,
            resnet_time_scale_shift: unet.resnet_time_scale_shift.clone(),
            projection_class_embeddings_input_dim: unet.projection_class_embeddings_input_dim,
            ..Self::default()
        }
    }

    /// Parses a diffusers ControlNet `config.json`.
    pub fn from_json(json: &str) -> Result<Self> {
        serde_json::from_str(json).map_err(|e| invalid_config(format!("config.json: {e}")))
    }

    /// The UNet whose down path and middle block this ControlNet copies: used to validate the
    /// shared settings with the UNet's own rules and to build the shared blocks.
    fn unet_view(&self) -> UNetConfig {
        let up_block_types = self
            .down_block_types
            .iter()
            .rev()
            .map(|name| match name.as_str() {
                "DownBlock2D" => "UpBlock2D".to_owned(),
                "CrossAttnDownBlock2D" => "CrossAttnUpBlock2D".to_owned(),
                other => other.to_owned(),
            })
            .collect();
        UNetConfig {
            sample_size: None,
            in_channels: self.in_channels,
            out_channels: self.in_channels,
            flip_sin_to_cos: self.flip_sin_to_cos,
            freq_shift: self.freq_shift,
            down_block_types: self.down_block_types.clone(),
            mid_block_type: self.mid_block_type.clone(),
            up_block_types,
            only_cross_attention: self.only_cross_attention.clone(),
            block_out_channels: self.block_out_channels.clone(),
            layers_per_block: PerBlock::All(self.layers_per_block),
            downsample_padding: self.downsample_padding,
            mid_block_scale_factor: self.mid_block_scale_factor,
            act_fn: self.act_fn.clone(),
            norm_num_groups: self.norm_num_groups,
            norm_eps: self.norm_eps,
            cross_attention_dim: PerBlock::All(self.cross_attention_dim),
            transformer_layers_per_block: self.transformer_layers_per_block.clone(),
            encoder_hid_dim: self.encoder_hid_dim,
            encoder_hid_dim_type: self.encoder_hid_dim_type.clone(),
            attention_head_dim: self.attention_head_dim.clone(),
            num_attention_heads: self.num_attention_heads.clone(),
            use_linear_projection: self.use_linear_projection,
            class_embed_type: self.class_embed_type.clone(),
            addition_embed_type: self.addition_embed_type.clone(),
            addition_time_embed_dim: self.addition_time_embed_dim,
            num_class_embeds: self.num_class_embeds,
            upcast_attention: self.upcast_attention,
            resnet_time_scale_shift: self.resnet_time_scale_shift.clone(),
            projection_class_embeddings_input_dim: self.projection_class_embeddings_input_dim,
            addition_embed_type_num_heads: self.addition_embed_type_num_heads,
            // A ControlNet has no settings for these: diffusers fixes them to the defaults.
            ..UNetConfig::default()
        }
    }

    /// Checks that this ControlNet was made for `unet`: its residuals must have the shapes of
    /// the UNet's skip connections, and it must read the same text states and added
    /// conditioning. Lists every setting that differs.
    pub fn check_compatible(&self, unet: &UNetConfig) -> Result<()> {
        let mut differences = Vec::new();
        let mut compare = |field: &str, ours: String, base: String| {
            if ours != base {
                differences.push(format!("{field} is {ours}, the base UNet's {base}"));
            }
        };
        compare(
            "in_channels",
            self.in_channels.to_string(),
            unet.in_channels.to_string(),
        );
        compare(
            "block_out_channels",
            format!("{:?}", self.block_out_channels),
            format!("{:?}", unet.block_out_channels),
        );
        let levels = unet.block_out_channels.len();
        let unet_layers = unet
            .layers_per_block
            .expand(levels, "layers_per_block")
            .map(|layers| format!("{layers:?}"))
            .unwrap_or_else(|e| e.to_string());
        compare(
            "layers_per_block",
            format!("{:?}", vec![self.layers_per_block; levels]),
            unet_layers,
        );
        compare(
            "downsample_padding",
            self.downsample_padding.to_string(),
            unet.downsample_padding.to_string(),
        );
        let unet_context = match &unet.cross_attention_dim {
            PerBlock::All(dim) => Some(*dim),
            PerBlock::Each(dims) => dims.last().copied(),
        };
        compare(
            "cross_attention_dim",
            self.cross_attention_dim.to_string(),
            unet_context.map_or_else(|| "unset".to_owned(), |dim| dim.to_string()),
        );
        compare(
            "addition_embed_type",
            format!("{:?}", self.addition_embed_type),
            format!("{:?}", unet.addition_embed_type),
        );
        if unet.addition_embed_type.is_some() {
            compare(
                "addition_time_embed_dim",
                format!("{:?}", self.addition_time_embed_dim),
                format!("{:?}", unet.addition_time_embed_dim),
            );
            compare(
                "projection_class_embeddings_input_dim",
                format!("{:?}", self.projection_class_embeddings_input_dim),
                format!("{:?}", unet.projection_class_embeddings_input_dim),
            );
        }
        if differences.is_empty() {
            Ok(())
        } else {
            Err(invalid_config(format!(
                "not made for this base model: {}",
                differences.join("; ")
            )))
        }
    }
}

/// The small convolutional encoder of the control image: diffusers'
/// `ControlNetConditioningEmbedding` (`conv_in`, pairs of 3×3 convolutions the second of which
/// has stride 2, `conv_out`, SiLU after each but the last).
#[derive(Debug)]
pub struct ControlNetConditioningEmbedding {
    conv_in: nn::Conv2D,
    blocks: Vec<nn::Conv2D>,
    conv_out: nn::Conv2D,
    in_channels: i64,
}

impl ControlNetConditioningEmbedding {
    /// `conditioning_channels` → `block_out_channels` stages → `embedding_channels`.
    pub fn new(
        path: nn::Path,
        embedding_channels: i64,
        conditioning_channels: i64,
        block_out_channels: &[i64],
    ) -> Result<Self> {
        let (&first, _) = block_out_channels.split_first().ok_or_else(|| {
            invalid_config("conditioning_embedding_out_channels is empty".to_owned())
        })?;
        if let Some(bad) = block_out_channels.iter().find(|c| **c <= 0) {
            return Err(invalid_config(format!(
                "conditioning_embedding_out_channels has {bad} channels"
            )));
        }
        let mut blocks = Vec::with_capacity(2 * (block_out_channels.len() - 1));
        for (i, pair) in block_out_channels.windows(2).enumerate() {
            let (channel_in, channel_out) = (pair[0], pair[1]);
            let blocks_path = &path / "blocks";
            blocks.push(conv2d(
                &blocks_path / (2 * i),
                channel_in,
                channel_in,
                3,
                1,
                1,
            ));
            blocks.push(conv2d(
                &blocks_path / (2 * i + 1),
                channel_in,
                channel_out,
                3,
                2,
                1,
            ));
        }
        let last = block_out_channels[block_out_channels.len() - 1];
        Ok(Self {
            conv_in: conv2d(&path / "conv_in", conditioning_channels, first, 3, 1, 1),
            blocks,
            conv_out: conv2d(&path / "conv_out", last, embedding_channels, 3, 1, 1),
            in_channels: conditioning_channels,
        })
    }

    /// `[b, conditioning_channels, H, W]` → `[b, embedding_channels, H / 2^k, W / 2^k]`.
    pub fn forward(&self, conditioning: &Tensor) -> Tensor {
        let mut embedding = self.conv_in.forward(conditioning).silu();
        for block in &self.blocks {
            embedding = block.forward(&embedding).silu();
        }
        self.conv_out.forward(&embedding)
    }
}

/// What a ControlNet hands the UNet: diffusers' `ControlNetOutput`, already multiplied by the
/// conditioning scale.
#[derive(Debug)]
pub struct ControlNetOutput {
    /// One residual per skip connection of the UNet's down path (`down_block_res_samples`).
    pub down: Vec<Tensor>,
    /// The middle block's residual (`mid_block_res_sample`).
    pub mid: Tensor,
}

impl ControlNetOutput {
    /// Adds another ControlNet's residuals, as diffusers' `MultiControlNetModel` sums them.
    pub fn accumulate(&mut self, other: &ControlNetOutput) -> Result<()> {
        let same = self.down.len() == other.down.len()
            && self
                .down
                .iter()
                .zip(&other.down)
                .all(|(a, b)| a.size() == b.size())
            && self.mid.size() == other.mid.size();
        if !same {
            return Err(invalid_input(
                "residuals of ControlNets with different shapes cannot be summed".to_owned(),
            ));
        }
        for (sum, residual) in self.down.iter_mut().zip(&other.down) {
            *sum = &*sum + residual;
        }
        self.mid += &other.mid;
        Ok(())
    }

    /// The residuals as the UNet takes them.
    pub fn residuals(&self) -> ControlResiduals<'_> {
        ControlResiduals {
            down: &self.down,
            mid: &self.mid,
        }
    }
}

/// diffusers' `ControlNetModel` (SDXL subset: the UNet's block types, `text_time` conditioning).
#[derive(Debug)]
pub struct ControlNetModel {
    config: ControlNetConfig,
    conv_in: nn::Conv2D,
    time: TimeConditioning,
    controlnet_cond_embedding: ControlNetConditioningEmbedding,
    down_blocks: Vec<DownBlock>,
    controlnet_down_blocks: Vec<nn::Conv2D>,
    mid_block: UNetMidBlock2DCrossAttn,
    controlnet_mid_block: nn::Conv2D,
    flip_channels: bool,
    /// Conditioning embeddings by control-image tensor ([`Self::remember_condition`]).
    remembered: TensorMemo,
}

impl ControlNetModel {
    /// Builds the model on `path` (usually `vs.root()`) with diffusers' parameter names; load
    /// the weights into the var store afterwards. Every parameter starts at zero; the random
    /// generator is not used.
    pub fn new(path: nn::Path, config: &ControlNetConfig) -> Result<Self> {
        let unet = config.unet_view();
        let layout = unet.layout()?;
        let c = config;
        let channels = &c.block_out_channels;
        let levels = channels.len();
        let resnet = layout.resnet;
        let flip_channels = match c.controlnet_conditioning_channel_order.as_str() {
            "rgb" => false,
            "bgr" => true,
            other => {
                return Err(invalid_config(format!(
                    "controlnet_conditioning_channel_order {other:?} (expected rgb or bgr)"
                )));
            }
        };
        if c.conditioning_channels <= 0 {
            return Err(invalid_config(format!(
                "{} conditioning channels",
                c.conditioning_channels
            )));
        }
        let embedding_channels = c
            .conditioning_embedding_out_channels
            .as_deref()
            .ok_or_else(|| {
                invalid_config("conditioning_embedding_out_channels is null".to_owned())
            })?;
        check_groups(channels[0], resnet.groups)?;

        let conv_in = conv2d(&path / "conv_in", c.in_channels, channels[0], 3, 1, 1);
        let time = TimeConditioning::new(&path, &unet, &layout, COMPONENT)?;
        let controlnet_cond_embedding = ControlNetConditioningEmbedding::new(
            &path / "controlnet_cond_embedding",
            channels[0],
            c.conditioning_channels,
            embedding_channels,
        )?;

        let zero_conv = |name: nn::Path, channels: i64| conv2d(name, channels, channels, 1, 1, 0);
        let mut down_blocks = Vec::with_capacity(levels);
        let mut controlnet_down_blocks =
            vec![zero_conv(&path / "controlnet_down_blocks" / 0, channels[0])];
        for (i, &cross) in layout.down.iter().enumerate() {
            let is_final = i + 1 == levels;
            let block = DownBlockConfig {
                in_channels: if i == 0 { channels[0] } else { channels[i - 1] },
                out_channels: channels[i],
                num_layers: layout.layers[i],
                add_downsample: !is_final,
                downsample_padding: c.downsample_padding,
                resnet,
            };
            let block_path = &path / "down_blocks" / i;
            down_blocks.push(if cross {
                DownBlock::CrossAttn(CrossAttnDownBlock2D::new(
                    block_path,
                    &block,
                    &layout.attention(&unet, i),
                )?)
            } else {
                DownBlock::Plain(DownBlock2D::new(block_path, &block)?)
            });
            let residuals = layout.layers[i] + i64::from(!is_final);
            for _ in 0..residuals {
                let index = controlnet_down_blocks.len();
                controlnet_down_blocks.push(zero_conv(
                    &path / "controlnet_down_blocks" / index,
                    channels[i],
                ));
            }
        }

        let mid_channels = channels[levels - 1];
        let mid_block = UNetMidBlock2DCrossAttn::new(
            &path / "mid_block",
            &MidBlockConfig {
                in_channels: mid_channels,
                num_layers: 1,
                output_scale_factor: c.mid_block_scale_factor,
                resnet,
                attention: layout.attention(&unet, levels - 1),
            },
        )?;
        let controlnet_mid_block = zero_conv(&path / "controlnet_mid_block", mid_channels);

        Ok(Self {
            config: config.clone(),
            conv_in,
            time,
            controlnet_cond_embedding,
            down_blocks,
            controlnet_down_blocks,
            mid_block,
            controlnet_mid_block,
            flip_channels,
            remembered: TensorMemo::default(),
        })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &ControlNetConfig {
        &self.config
    }

    /// Number of down residuals the model produces (9 for SDXL).
    pub fn num_down_residuals(&self) -> usize {
        self.controlnet_down_blocks.len()
    }

    /// Every cross-attention layer, down path and middle.
    fn cross_attentions(&self) -> impl Iterator<Item = &Attention> {
        self.down_blocks
            .iter()
            .flat_map(DownBlock::transformers)
            .chain(self.mid_block.transformers())
            .flat_map(Transformer2DModel::cross_attentions)
    }

    /// As [`crate::unet::UNet2DConditionModel::remember_context`]: the keys and values of
    /// `context` computed once in every cross-attention layer.
    pub fn remember_context(&self, context: &Tensor) {
        attention::remember_context_in(self.cross_attentions(), context);
    }

    /// Drops what [`Self::remember_context`] stored for `context`.
    pub fn forget_context(&self, context: &Tensor) {
        attention::forget_context_in(self.cross_attentions(), context);
    }

    /// Computes the conditioning embedding of the control image `controlnet_cond` now, for
    /// every later [`Self::forward`] over this same tensor: the image is the same at every
    /// denoising step, so its eight convolutions at the image's full resolution run once per
    /// image instead of once per step (diffusers runs them every step; the results are the
    /// same). If the tensor is already remembered, the stored embedding is overwritten in place
    /// (its memory stays where a recorded CUDA graph reads it): do that whenever the tensor's
    /// contents have changed.
    pub fn remember_condition(&self, controlnet_cond: &Tensor) {
        let _no_grad = tch::no_grad_guard();
        self.remembered
            .store(controlnet_cond, self.embed_condition(controlnet_cond));
    }

    /// Drops what [`Self::remember_condition`] stored for `controlnet_cond`.
    pub fn forget_condition(&self, controlnet_cond: &Tensor) {
        self.remembered.forget(controlnet_cond);
    }

    /// The conditioning embedding of `controlnet_cond`: remembered, or computed now.
    fn condition_embedding(&self, controlnet_cond: &Tensor) -> Tensor {
        self.remembered
            .get(controlnet_cond)
            .unwrap_or_else(|| self.embed_condition(controlnet_cond))
    }

    /// `controlnet_cond_embedding` of the control image in the model's channel order.
    fn embed_condition(&self, controlnet_cond: &Tensor) -> Tensor {
        if self.flip_channels {
            self.controlnet_cond_embedding
                .forward(&controlnet_cond.flip([1]))
        } else {
            self.controlnet_cond_embedding.forward(controlnet_cond)
        }
    }

    /// The residuals for the UNet, each multiplied by `conditioning_scale`.
    ///
    /// * `sample`: `[batch, in_channels, h, w]` latents, as the UNet gets them (scaled by the
    ///   scheduler).
    /// * `timestep`, `encoder_hidden_states`, `added`: as for
    ///   [`crate::unet::UNet2DConditionModel::forward`].
    /// * `controlnet_cond`: `[batch, conditioning_channels, H, W]`, the control image in
    ///   `[0, 1]` ([`control_image_to_tensor`]), at the size the embedding maps to `h × w`
    ///   (`8h × 8w` for the default embedding).
    ///
    /// diffusers' `guess_mode` is not offered (its pipelines only use it with
    /// `global_pool_conditions`, which [`crate::pipeline`] refuses); with
    /// `global_pool_conditions` the residuals are averaged over space (`[batch, c, 1, 1]`).
    pub fn forward<'t>(
        &self,
        sample: &Tensor,
        timestep: impl Into<Timestep<'t>>,
        encoder_hidden_states: &Tensor,
        controlnet_cond: &Tensor,
        conditioning_scale: f64,
        added: Option<&AddedConditioning<'_>>,
    ) -> Result<ControlNetOutput> {
        let _no_grad = tch::no_grad_guard();
        let c = &self.config;
        let [batch, ..] = crate::unet::check_inputs(
            COMPONENT,
            sample,
            c.in_channels,
            encoder_hidden_states,
            c.cross_attention_dim,
        )?;
        let cond_size = controlnet_cond.size();
        if cond_size.len() != 4
            || cond_size[0] != batch
            || cond_size[1] != self.controlnet_cond_embedding.in_channels
        {
            return Err(invalid_input(format!(
                "controlnet_cond must be [{batch}, {}, H, W], got {cond_size:?}",
                self.controlnet_cond_embedding.in_channels
            )));
        }

        let emb = self.time.forward(sample, batch, timestep.into(), added)?;

        let hidden = self.conv_in.forward(sample);
        let cond = self.condition_embedding(controlnet_cond);
        if cond.size() != hidden.size() {
            return Err(invalid_input(format!(
                "the control image {cond_size:?} embeds to {:?}, the latents to {:?}",
                cond.size(),
                hidden.size()
            )));
        }
        let mut hidden = hidden + cond;

        let mut states = vec![hidden.shallow_clone()];
        for block in &self.down_blocks {
            let (out, block_states) = block.forward(&hidden, &emb, encoder_hidden_states);
            hidden = out;
            states.extend(block_states);
        }
        let hidden = self.mid_block.forward(&hidden, &emb, encoder_hidden_states);

        let mut down: Vec<Tensor> = states
            .iter()
            .zip(&self.controlnet_down_blocks)
            .map(|(state, conv)| conv.forward(state) * conditioning_scale)
            .collect();
        let mut mid = self.controlnet_mid_block.forward(&hidden) * conditioning_scale;
        if c.global_pool_conditions {
            let pool = |t: &Tensor| t.mean_dim([2i64, 3].as_slice(), true, None::<Kind>);
            down = down.iter().map(pool).collect();
            mid = pool(&mid);
        }
        Ok(ControlNetOutput { down, mid })
    }
}

/// A control image (RGB, u8) → a `(1, 3, H, W)` f32 tensor in `[0, 1]` on `device`, as
/// diffusers' control image processor (`VaeImageProcessor(do_normalize=False)`) converts an
/// image that is already at the output size: `u8 / 255` in f32, no normalization. The bytes
/// travel and are converted there (a correctly rounded division: the same floats anywhere).
pub fn control_image_to_tensor(image: &RgbImage, device: Device) -> Tensor {
    let (width, height) = image.dimensions();
    (Tensor::from_slice(image.as_raw())
        .to_device(device)
        .view([1, i64::from(height), i64::from(width), 3])
        .permute([0, 3, 1, 2])
        .to_kind(Kind::Float)
        / 255.0)
        .contiguous()
}

/// A ControlNet loaded from a diffusers model folder: the model with its weights.
#[derive(Debug)]
pub struct ControlNet {
    model: ControlNetModel,
    vs: nn::VarStore,
    path: PathBuf,
}

impl ControlNet {
    /// Loads a diffusers ControlNet folder (`config.json` and
    /// `diffusion_pytorch_model[.fp16].safetensors` or shards) onto `device` in `dtype`,
    /// preferring the fp16 files for f16 and the full-precision ones otherwise (each falls back
    /// to the other).
    pub fn load(dir: &Path, device: Device, dtype: DType) -> Result<Self> {
        let source = ComponentSource::model_folder(
            dir,
            Component::ControlNet,
            WeightVariant::for_dtype(dtype),
        )?;
        let config_path = source.config.as_deref().unwrap_or(dir);
        let json = std::fs::read_to_string(config_path).map_err(|e| EngineError::Io {
            path: config_path.to_owned(),
            source: e,
        })?;
        let config = ControlNetConfig::from_json(&json)?;
        let mut vs = nn::VarStore::new(device);
        // Before building: the layers are created in the run dtype (the attention's weights
        // are views of one stack, which a later cast would pull apart).
        vs.set_kind(dtype.kind());
        let model = ControlNetModel::new(vs.root(), &config)?;
        source.load(&mut vs)?;
        vs.freeze();
        Ok(Self {
            model,
            vs,
            path: dir.to_owned(),
        })
    }

    /// The model.
    pub fn model(&self) -> &ControlNetModel {
        &self.model
    }

    /// Its configuration.
    pub fn config(&self) -> &ControlNetConfig {
        self.model.config()
    }

    /// The weights (shared with the model).
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// The folder it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The precision its weights are in.
    pub fn kind(&self) -> Kind {
        self.vs.kind()
    }

    /// The device its weights are on.
    pub fn device(&self) -> Device {
        self.vs.device()
    }
}

fn invalid_config(message: String) -> EngineError {
    EngineError::InvalidConfig {
        component: COMPONENT,
        message,
    }
}

fn invalid_input(message: String) -> EngineError {
    EngineError::InvalidInput {
        component: COMPONENT,
        message,
    }
}
