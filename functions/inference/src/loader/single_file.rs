//! The original SDXL checkpoint naming (Stability's `generative-models`, "sgm") mapped to the
//! diffusers/transformers parameter names.
//!
//! A single-file SDXL checkpoint (`sd_xl_base_1.0.safetensors` and fine-tunes saved the same way)
//! holds all four models under these prefixes:
//!
//! | prefix | model | naming |
//! |---|---|---|
//! | `model.diffusion_model.` | UNet | `openaimodel.py`: `input_blocks`, `middle_block`, `output_blocks`, `time_embed`, `label_emb`, `out` |
//! | `first_stage_model.` | VAE | `ldm` autoencoder: `encoder.down.N.block.M`, `mid.attn_1` (1×1 convolutions), `decoder.up.N` in reverse level order |
//! | `conditioner.embedders.0.transformer.` | CLIP ViT-L | transformers' own (`text_model.…`) |
//! | `conditioner.embedders.1.model.` | OpenCLIP ViT-bigG | OpenCLIP: `transformer.resblocks.N` with fused `attn.in_proj_*`, `ln_1`/`ln_2`, `mlp.c_fc`/`c_proj`, `positional_embedding`, `ln_final`, `text_projection` stored `(in, out)` |
//!
//! The mapping follows the facts of diffusers' converter (`loaders/single_file_utils.py`:
//! `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`,
//! `convert_open_clip_checkpoint`) but is built as tables of module prefixes generated from the
//! component's diffusers config, so any block count, resnets per level and transformer depth
//! maps without special cases. What is read from each config:
//!
//! - UNet: `down_block_types`, `up_block_types` (which levels have attention, how many levels),
//!   `layers_per_block` (number or per-level list), `mid_block_type` (must be
//!   `UNetMidBlock2DCrossAttn`), `addition_embed_type` (`text_time` maps `label_emb` to
//!   `add_embedding`). Transformer depths need no table: the blocks inside an attention module
//!   carry the same names in both namings.
//! - VAE: the number of `down_block_types` and `up_block_types` (the decoder's levels are stored
//!   in reverse order).
//! - Second text encoder: `num_hidden_layers` (fused attention projections are split per layer).
//! - First text encoder: nothing (its names are transformers' own under a prefix).
//!
//! `conditioner.embedders.1.model.text_projection.weight` (already `(out, in)`) is accepted in
//! place of `text_projection`; a file with both is corrupt (the parameter would be stored twice).
//!
//! Stored tensors outside the four prefixes are ignored (`denoiser.sigmas`, `model_ema.*` —
//! the non-EMA weights are loaded, as diffusers does by default — and anything else a trainer
//! saved). Inside the prefixes exactly two known non-parameters are ignored:
//! `conditioner.embedders.0.transformer.text_model.embeddings.position_ids` (a buffer older
//! transformers saved) and `conditioner.embedders.1.model.logit_scale` (CLIP's contrastive
//! temperature, unused for text encoding). Any other stored name under a component's prefix that
//! the tables do not know is [`super::ModelError::UnexpectedTensor`].

use std::collections::HashMap;

use serde_json::Value;

use super::Component;
use super::key_map::{Mapped, Target, Transform};

/// Stored-name prefix of each component in a single-file checkpoint.
pub const UNET_PREFIX: &str = "model.diffusion_model.";
/// See [`UNET_PREFIX`].
pub const VAE_PREFIX: &str = "first_stage_model.";
/// See [`UNET_PREFIX`]: the first text encoder's entries (its weights are under
/// `transformer.text_model.`).
pub const TEXT_ENCODER_PREFIX: &str = "conditioner.embedders.0.";
/// See [`UNET_PREFIX`]: the second text encoder's entries (its weights are under `model.`).
pub const TEXT_ENCODER_2_PREFIX: &str = "conditioner.embedders.1.";

/// Tensors every SDXL base checkpoint in the original naming holds: a file without them is not one.
pub const SDXL_MARKERS: [&str; 4] = [
    "model.diffusion_model.input_blocks.0.0.weight",
    "first_stage_model.decoder.conv_in.weight",
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
    "conditioner.embedders.1.model.token_embedding.weight",
];

/// One renamed leaf inside a module: `source` (a sub-prefix ending in `.`, followed by `weight`
/// or `bias`, or a full leaf name) becomes each of `targets`.
struct Sub {
    source: &'static str,
    targets: &'static [(&'static str, Transform)],
}

const fn sub(source: &'static str, targets: &'static [(&'static str, Transform)]) -> Sub {
    Sub { source, targets }
}

const ID: Transform = Transform::Identity;
const SQUEEZE: Transform = Transform::SqueezeConv1x1;

/// `openaimodel.ResBlock` → diffusers `ResnetBlock2D`.
const UNET_RESNET: &[Sub] = &[
    sub("in_layers.0.", &[("norm1.", ID)]),
    sub("in_layers.2.", &[("conv1.", ID)]),
    sub("emb_layers.1.", &[("time_emb_proj.", ID)]),
    sub("out_layers.0.", &[("norm2.", ID)]),
    sub("out_layers.3.", &[("conv2.", ID)]),
    sub("skip_connection.", &[("conv_shortcut.", ID)]),
];

/// `ldm` autoencoder `ResnetBlock` → diffusers `ResnetBlock2D`.
const VAE_RESNET: &[Sub] = &[
    sub("norm1.", &[("norm1.", ID)]),
    sub("conv1.", &[("conv1.", ID)]),
    sub("norm2.", &[("norm2.", ID)]),
    sub("conv2.", &[("conv2.", ID)]),
    sub("nin_shortcut.", &[("conv_shortcut.", ID)]),
];

/// `ldm` autoencoder `AttnBlock` (1×1 convolutions) → diffusers `Attention` (linear layers).
const VAE_ATTENTION: &[Sub] = &[
    sub("norm.", &[("group_norm.", ID)]),
    sub("q.", &[("to_q.", SQUEEZE)]),
    sub("k.", &[("to_k.", SQUEEZE)]),
    sub("v.", &[("to_v.", SQUEEZE)]),
    sub("proj_out.", &[("to_out.0.", SQUEEZE)]),
];

const fn chunk(index: usize) -> Transform {
    Transform::Chunk { index, count: 3 }
}

/// OpenCLIP `ResidualAttentionBlock` → transformers `CLIPEncoderLayer`.
const OPEN_CLIP_BLOCK: &[Sub] = &[
    sub(
        "attn.in_proj_weight",
        &[
            ("self_attn.q_proj.weight", chunk(0)),
            ("self_attn.k_proj.weight", chunk(1)),
            ("self_attn.v_proj.weight", chunk(2)),
        ],
    ),
    sub(
        "attn.in_proj_bias",
        &[
            ("self_attn.q_proj.bias", chunk(0)),
            ("self_attn.k_proj.bias", chunk(1)),
            ("self_attn.v_proj.bias", chunk(2)),
        ],
    ),
    sub("attn.out_proj.", &[("self_attn.out_proj.", ID)]),
    sub("ln_1.", &[("layer_norm1.", ID)]),
    sub("ln_2.", &[("layer_norm2.", ID)]),
    sub("mlp.c_fc.", &[("mlp.fc1.", ID)]),
    sub("mlp.c_proj.", &[("mlp.fc2.", ID)]),
];

/// How the rest of a stored name after a module prefix becomes the parameter's.
#[derive(Debug, Clone, Copy)]
enum Inner {
    /// A leaf module: `weight` or `bias`.
    Params,
    /// Names below the module are the same in both namings (attention transformers, CLIP-L).
    Same,
    /// Renamed leaves.
    Table(&'static [Sub]),
}

impl std::fmt::Debug for Sub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.source)
    }
}

/// The stored → parameter naming of one component in a single-file checkpoint.
#[derive(Debug, Clone)]
pub(crate) struct Rules {
    /// The component's stored-name prefix; other names are not this component's.
    prefix: &'static str,
    /// Stored names (after the prefix) that are known not to be parameters.
    ignored: &'static [&'static str],
    /// Whole stored names (after the prefix) → parameters.
    exact: HashMap<String, Vec<Target>>,
    /// Stored module prefixes (after the component prefix, ending in `.`) → parameter prefix.
    modules: HashMap<String, (String, Inner)>,
}

impl Rules {
    /// The rules for `component`, from its diffusers config (`None`: the SDXL base values).
    pub(crate) fn new(component: Component, config: Option<&Value>) -> Result<Self, String> {
        let mut rules = Rules {
            prefix: "",
            ignored: &[],
            exact: HashMap::new(),
            modules: HashMap::new(),
        };
        match component {
            Component::Unet => {
                let layout = match config {
                    Some(config) => UnetLayout::from_config(config)?,
                    None => UnetLayout::sdxl_base(),
                };
                rules.prefix = UNET_PREFIX;
                rules.add_unet(&layout);
            }
            Component::Vae => {
                let layout = match config {
                    Some(config) => VaeLayout::from_config(config)?,
                    None => VaeLayout::sdxl_base(),
                };
                rules.prefix = VAE_PREFIX;
                rules.add_vae(&layout);
            }
            Component::TextEncoder => {
                rules.prefix = TEXT_ENCODER_PREFIX;
                rules.ignored = &["transformer.text_model.embeddings.position_ids"];
                // The parameter names are those of `CLIPTextModel` without its optional
                // `text_model.` prefix; the key map matches variables with or without it.
                rules.module("transformer.text_model.", "", Inner::Same);
            }
            Component::TextEncoder2 => {
                let layers = match config {
                    Some(config) => usize_field(config, "num_hidden_layers", 12)?,
                    None => OPEN_CLIP_BIG_G_LAYERS,
                };
                rules.prefix = TEXT_ENCODER_2_PREFIX;
                rules.ignored = &["model.logit_scale"];
                rules.add_open_clip(layers);
            }
            Component::ControlNet => {
                return Err("ControlNets are read from diffusers model folders \
                            (config.json + diffusion_pytorch_model.safetensors), not from \
                            single-file checkpoints"
                    .to_owned());
            }
            Component::DepthEstimator => {
                return Err(
                    "the depth estimator is read from its transformers model folder \
                            (config.json + model.safetensors), not from a single-file \
                            checkpoint"
                        .to_owned(),
                );
            }
            Component::PoseEstimator => {
                return Err("the pose estimator is read from its own safetensors file \
                            (body_pose_model.safetensors), not from a single-file checkpoint"
                    .to_owned());
            }
        }
        Ok(rules)
    }

    /// What the stored tensor `key` (full name) provides.
    pub(crate) fn map(&self, key: &str) -> Mapped {
        let Some(rest) = key.strip_prefix(self.prefix) else {
            return Mapped::Ignored;
        };
        if self.ignored.contains(&rest) {
            return Mapped::Ignored;
        }
        if let Some(targets) = self.exact.get(rest) {
            return Mapped::Targets(targets.clone());
        }
        // The longest module prefix wins (`output_blocks.2.1.` over `output_blocks.2.`).
        for (dot, _) in rest.rmatch_indices('.') {
            let (module, leaf) = rest.split_at(dot + 1);
            if let Some((target, inner)) = self.modules.get(module) {
                return map_inner(target, *inner, leaf);
            }
        }
        Mapped::Unknown
    }

    /// The stored name (with the component prefix) that provides `parameter` unchanged (an
    /// identity transform), or `None` when no stored tensor maps to it one to one (split
    /// projections, transposed or squeezed tensors, or a name these rules do not produce).
    ///
    /// The inverse of [`Rules::map`], checked against it: kohya LoRAs name SDXL UNet modules in
    /// the stored naming (`lora_unet_input_blocks_4_1_…`), which [`crate::lora`] resolves through
    /// this.
    pub(crate) fn stored_name(&self, parameter: &str) -> Option<String> {
        let identity = |stored: &str| match self.map(stored) {
            Mapped::Targets(targets) => targets
                .iter()
                .any(|t| t.name == parameter && t.transform == ID),
            _ => false,
        };
        let exact = self
            .exact
            .iter()
            .filter(|(_, targets)| targets.iter().any(|t| t.name == parameter))
            .map(|(stored, _)| stored.clone());
        let modules = self.modules.iter().filter_map(|(stored, (target, inner))| {
            let leaf = parameter.strip_prefix(target.as_str())?;
            match inner {
                Inner::Params if is_param(leaf) => Some(format!("{stored}{leaf}")),
                Inner::Params => None,
                Inner::Same => Some(format!("{stored}{leaf}")),
                Inner::Table(table) => table.iter().find_map(|entry| {
                    entry.targets.iter().find_map(|(name, transform)| {
                        let param = leaf.strip_prefix(name)?;
                        (*transform == ID
                            && entry.source.ends_with('.')
                            && name.ends_with('.')
                            && is_param(param))
                        .then(|| format!("{stored}{}{param}", entry.source))
                    })
                }),
            }
        });
        exact
            .chain(modules)
            .map(|rest| format!("{}{rest}", self.prefix))
            .find(|stored| identity(stored))
    }

    fn module(&mut self, stored: impl Into<String>, target: impl Into<String>, inner: Inner) {
        self.modules.insert(stored.into(), (target.into(), inner));
    }

    fn exact(&mut self, stored: &str, target: &str, transform: Transform) {
        self.exact
            .insert(stored.to_owned(), vec![Target::new(target, transform)]);
    }

    /// `openaimodel.UNetModel` as diffusers' `UNet2DConditionModel`.
    fn add_unet(&mut self, layout: &UnetLayout) {
        self.module("input_blocks.0.0.", "conv_in.", Inner::Params);
        self.module("time_embed.0.", "time_embedding.linear_1.", Inner::Params);
        self.module("time_embed.2.", "time_embedding.linear_2.", Inner::Params);
        if layout.text_time {
            self.module("label_emb.0.0.", "add_embedding.linear_1.", Inner::Params);
            self.module("label_emb.0.2.", "add_embedding.linear_2.", Inner::Params);
        }
        self.module("out.0.", "conv_norm_out.", Inner::Params);
        self.module("out.2.", "conv_out.", Inner::Params);

        // input_blocks: [conv_in], then per level `layers` × [resnet, attention?], then a
        // downsampler on all levels but the last.
        let levels = layout.down_attention.len();
        let mut index = 1;
        for level in 0..levels {
            for layer in 0..layout.layers_per_block[level] {
                let resnet = format!("down_blocks.{level}.resnets.{layer}.");
                self.module(
                    format!("input_blocks.{index}.0."),
                    resnet,
                    Inner::Table(UNET_RESNET),
                );
                if layout.down_attention[level] {
                    self.module(
                        format!("input_blocks.{index}.1."),
                        format!("down_blocks.{level}.attentions.{layer}."),
                        Inner::Same,
                    );
                }
                index += 1;
            }
            if level + 1 < levels {
                self.module(
                    format!("input_blocks.{index}.0.op."),
                    format!("down_blocks.{level}.downsamplers.0.conv."),
                    Inner::Params,
                );
                index += 1;
            }
        }

        // middle_block: resnet, attention, resnet.
        self.module(
            "middle_block.0.",
            "mid_block.resnets.0.",
            Inner::Table(UNET_RESNET),
        );
        self.module("middle_block.1.", "mid_block.attentions.0.", Inner::Same);
        self.module(
            "middle_block.2.",
            "mid_block.resnets.1.",
            Inner::Table(UNET_RESNET),
        );

        // output_blocks: levels from the deepest, `layers + 1` × [resnet, attention?, and on
        // the level's last entry an upsampler (except the last level) after them].
        let mut index = 0;
        for (level, &attention) in layout.up_attention.iter().enumerate() {
            let layers = layout.layers_per_block[levels - 1 - level] + 1;
            for layer in 0..layers {
                self.module(
                    format!("output_blocks.{index}.0."),
                    format!("up_blocks.{level}.resnets.{layer}."),
                    Inner::Table(UNET_RESNET),
                );
                if attention {
                    self.module(
                        format!("output_blocks.{index}.1."),
                        format!("up_blocks.{level}.attentions.{layer}."),
                        Inner::Same,
                    );
                }
                if layer + 1 == layers && level + 1 < levels {
                    let slot = if attention { 2 } else { 1 };
                    self.module(
                        format!("output_blocks.{index}.{slot}.conv."),
                        format!("up_blocks.{level}.upsamplers.0.conv."),
                        Inner::Params,
                    );
                }
                index += 1;
            }
        }
    }

    /// The `ldm` `AutoencoderKL` as diffusers' `AutoencoderKL`.
    fn add_vae(&mut self, layout: &VaeLayout) {
        for module in ["quant_conv.", "post_quant_conv."] {
            self.module(module, module, Inner::Params);
        }
        for part in ["encoder", "decoder"] {
            for module in ["conv_in.", "conv_out."] {
                self.module(
                    format!("{part}.{module}"),
                    format!("{part}.{module}"),
                    Inner::Params,
                );
            }
            self.module(
                format!("{part}.norm_out."),
                format!("{part}.conv_norm_out."),
                Inner::Params,
            );
            for (stored, resnet) in [("block_1", 0), ("block_2", 1)] {
                self.module(
                    format!("{part}.mid.{stored}."),
                    format!("{part}.mid_block.resnets.{resnet}."),
                    Inner::Table(VAE_RESNET),
                );
            }
            self.module(
                format!("{part}.mid.attn_1."),
                format!("{part}.mid_block.attentions.0."),
                Inner::Table(VAE_ATTENTION),
            );
        }
        for level in 0..layout.down_levels {
            for layer in 0..layout.layers_per_block {
                self.module(
                    format!("encoder.down.{level}.block.{layer}."),
                    format!("encoder.down_blocks.{level}.resnets.{layer}."),
                    Inner::Table(VAE_RESNET),
                );
            }
            self.module(
                format!("encoder.down.{level}.downsample.conv."),
                format!("encoder.down_blocks.{level}.downsamplers.0.conv."),
                Inner::Params,
            );
        }
        // The decoder's levels are stored deepest last: `up.{n-1}` is diffusers' `up_blocks.0`.
        for level in 0..layout.up_levels {
            let stored = layout.up_levels - 1 - level;
            for layer in 0..=layout.layers_per_block {
                self.module(
                    format!("decoder.up.{stored}.block.{layer}."),
                    format!("decoder.up_blocks.{level}.resnets.{layer}."),
                    Inner::Table(VAE_RESNET),
                );
            }
            self.module(
                format!("decoder.up.{stored}.upsample.conv."),
                format!("decoder.up_blocks.{level}.upsamplers.0.conv."),
                Inner::Params,
            );
        }
    }

    /// OpenCLIP's text tower as transformers' `CLIPTextModelWithProjection`.
    fn add_open_clip(&mut self, layers: usize) {
        self.exact(
            "model.token_embedding.weight",
            "text_model.embeddings.token_embedding.weight",
            ID,
        );
        self.exact(
            "model.positional_embedding",
            "text_model.embeddings.position_embedding.weight",
            ID,
        );
        self.exact(
            "model.text_projection",
            "text_projection.weight",
            Transform::Transpose,
        );
        // The spelling some tools write, already as the linear weight (ComfyUI reads both).
        self.exact("model.text_projection.weight", "text_projection.weight", ID);
        self.module(
            "model.ln_final.",
            "text_model.final_layer_norm.",
            Inner::Params,
        );
        for layer in 0..layers {
            self.module(
                format!("model.transformer.resblocks.{layer}."),
                format!("text_model.encoder.layers.{layer}."),
                Inner::Table(OPEN_CLIP_BLOCK),
            );
        }
    }
}

fn is_param(leaf: &str) -> bool {
    leaf == "weight" || leaf == "bias"
}

fn map_inner(target: &str, inner: Inner, leaf: &str) -> Mapped {
    match inner {
        Inner::Params if is_param(leaf) => {
            Mapped::Targets(vec![Target::new(format!("{target}{leaf}"), ID)])
        }
        Inner::Params => Mapped::Unknown,
        Inner::Same => Mapped::Targets(vec![Target::new(format!("{target}{leaf}"), ID)]),
        Inner::Table(table) => {
            for entry in table {
                let param = if entry.source.ends_with('.') {
                    match leaf.strip_prefix(entry.source) {
                        Some(param) if is_param(param) => param,
                        _ => continue,
                    }
                } else if leaf == entry.source {
                    ""
                } else {
                    continue;
                };
                return Mapped::Targets(
                    entry
                        .targets
                        .iter()
                        .map(|(name, transform)| {
                            Target::new(format!("{target}{name}{param}"), *transform)
                        })
                        .collect(),
                );
            }
            Mapped::Unknown
        }
    }
}

/// Transformer layers of OpenCLIP ViT-bigG/14's text tower (SDXL base
/// `text_encoder_2/config.json`: `num_hidden_layers: 32`).
const OPEN_CLIP_BIG_G_LAYERS: usize = 32;

/// What the single-file mapping needs of a `UNet2DConditionModel` config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnetLayout {
    /// Resnets per down level (up levels have one more).
    pub layers_per_block: Vec<usize>,
    /// Whether each down level (from the input) has cross-attention transformers.
    pub down_attention: Vec<bool>,
    /// Whether each up level (from the deepest) has cross-attention transformers.
    pub up_attention: Vec<bool>,
    /// Whether `label_emb` is diffusers' `add_embedding` (`addition_embed_type: "text_time"`).
    pub text_time: bool,
}

impl UnetLayout {
    /// SDXL base 1.0 (`stabilityai/stable-diffusion-xl-base-1.0`, `unet/config.json`):
    /// `DownBlock2D, CrossAttnDownBlock2D, CrossAttnDownBlock2D`, the mirror image going up,
    /// `layers_per_block: 2`, `addition_embed_type: "text_time"`.
    pub fn sdxl_base() -> Self {
        UnetLayout {
            layers_per_block: vec![2, 2, 2],
            down_attention: vec![false, true, true],
            up_attention: vec![true, true, false],
            text_time: true,
        }
    }

    /// Reads the layout from a diffusers `unet/config.json` value; absent fields take
    /// `UNet2DConditionModel`'s defaults.
    pub fn from_config(config: &Value) -> Result<Self, String> {
        let down = string_list(
            config,
            "down_block_types",
            &[
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ],
        )?;
        let up = string_list(
            config,
            "up_block_types",
            &[
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ],
        )?;
        if down.is_empty() || down.len() != up.len() {
            return Err(format!(
                "{} down blocks and {} up blocks (need the same, at least one)",
                down.len(),
                up.len()
            ));
        }
        let attention = |kind: &str, plain: &str, cross: &str| match kind {
            k if k == plain => Ok(false),
            k if k == cross => Ok(true),
            other => Err(format!(
                "block type {other:?} is not supported (only {plain} and {cross})"
            )),
        };
        let down_attention = down
            .iter()
            .map(|k| attention(k, "DownBlock2D", "CrossAttnDownBlock2D"))
            .collect::<Result<Vec<_>, _>>()?;
        let up_attention = up
            .iter()
            .map(|k| attention(k, "UpBlock2D", "CrossAttnUpBlock2D"))
            .collect::<Result<Vec<_>, _>>()?;
        let layers_per_block = match config.get("layers_per_block") {
            None | Some(Value::Null) => vec![2; down.len()],
            Some(Value::Array(items)) => {
                let layers = items
                    .iter()
                    .map(|v| v.as_u64().and_then(|n| usize::try_from(n).ok()))
                    .collect::<Option<Vec<_>>>()
                    .ok_or("layers_per_block must hold non-negative integers")?;
                if layers.len() != down.len() {
                    return Err(format!(
                        "layers_per_block has {} entries for {} levels",
                        layers.len(),
                        down.len()
                    ));
                }
                layers
            }
            Some(value) => vec![as_usize(value, "layers_per_block")?; down.len()],
        };
        match config.get("mid_block_type") {
            None | Some(Value::Null) => {}
            Some(Value::String(kind)) if kind == "UNetMidBlock2DCrossAttn" => {}
            Some(other) => {
                return Err(format!(
                    "mid_block_type {other} is not supported (only UNetMidBlock2DCrossAttn)"
                ));
            }
        }
        let text_time = match config.get("addition_embed_type") {
            None | Some(Value::Null) => false,
            Some(Value::String(kind)) if kind == "text_time" => true,
            Some(other) => {
                return Err(format!(
                    "addition_embed_type {other} is not supported (only text_time or null)"
                ));
            }
        };
        Ok(UnetLayout {
            layers_per_block,
            down_attention,
            up_attention,
            text_time,
        })
    }
}

/// What the single-file mapping needs of an `AutoencoderKL` config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaeLayout {
    /// Encoder levels.
    pub down_levels: usize,
    /// Decoder levels.
    pub up_levels: usize,
    /// Resnets per encoder level (decoder levels have one more).
    pub layers_per_block: usize,
}

impl VaeLayout {
    /// SDXL base 1.0 (`vae/config.json`): four levels, `layers_per_block: 2`.
    pub fn sdxl_base() -> Self {
        VaeLayout {
            down_levels: 4,
            up_levels: 4,
            layers_per_block: 2,
        }
    }

    /// Reads the layout from a diffusers `vae/config.json` value; absent fields take
    /// `AutoencoderKL`'s defaults.
    pub fn from_config(config: &Value) -> Result<Self, String> {
        let down = string_list(config, "down_block_types", &["DownEncoderBlock2D"])?;
        let up = string_list(config, "up_block_types", &["UpDecoderBlock2D"])?;
        for kind in &down {
            if kind != "DownEncoderBlock2D" {
                return Err(format!("VAE block type {kind:?} is not supported"));
            }
        }
        for kind in &up {
            if kind != "UpDecoderBlock2D" {
                return Err(format!("VAE block type {kind:?} is not supported"));
            }
        }
        Ok(VaeLayout {
            down_levels: down.len(),
            up_levels: up.len(),
            layers_per_block: usize_field(config, "layers_per_block", 1)?,
        })
    }
}

fn string_list(config: &Value, field: &str, default: &[&str]) -> Result<Vec<String>, String> {
    match config.get(field) {
        None | Some(Value::Null) => Ok(default.iter().map(|s| (*s).to_owned()).collect()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                item.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| format!("{field} must be a list of strings"))
            })
            .collect(),
        Some(_) => Err(format!("{field} must be a list of strings")),
    }
}

fn usize_field(config: &Value, field: &str, default: usize) -> Result<usize, String> {
    match config.get(field) {
        None | Some(Value::Null) => Ok(default),
        Some(value) => as_usize(value, field),
    }
}

fn as_usize(value: &Value, field: &str) -> Result<usize, String> {
    value
        .as_u64()
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| format!("{field} must be a non-negative integer, not {value}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn targets(rules: &Rules, key: &str) -> Vec<(String, Transform)> {
        match rules.map(key) {
            Mapped::Targets(t) => t.into_iter().map(|t| (t.name, t.transform)).collect(),
            other => panic!("{key}: {other:?}"),
        }
    }

    fn one(rules: &Rules, key: &str) -> String {
        let t = targets(rules, key);
        assert_eq!(t.len(), 1, "{key}");
        t[0].0.clone()
    }

    /// Spot checks against the SDXL base layout, with names as diffusers' converter produces them.
    #[test]
    fn sdxl_base_unet_names() {
        let rules = Rules::new(Component::Unet, None).unwrap();
        let cases = [
            ("input_blocks.0.0.weight", "conv_in.weight"),
            (
                "input_blocks.2.0.in_layers.2.weight",
                "down_blocks.0.resnets.1.conv1.weight",
            ),
            (
                "input_blocks.3.0.op.bias",
                "down_blocks.0.downsamplers.0.conv.bias",
            ),
            (
                "input_blocks.4.0.skip_connection.weight",
                "down_blocks.1.resnets.0.conv_shortcut.weight",
            ),
            (
                "input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight",
                "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k.weight",
            ),
            (
                "middle_block.2.emb_layers.1.bias",
                "mid_block.resnets.1.time_emb_proj.bias",
            ),
            (
                "middle_block.1.proj_out.weight",
                "mid_block.attentions.0.proj_out.weight",
            ),
            (
                "output_blocks.2.2.conv.weight",
                "up_blocks.0.upsamplers.0.conv.weight",
            ),
            (
                "output_blocks.2.1.norm.weight",
                "up_blocks.0.attentions.2.norm.weight",
            ),
            (
                "output_blocks.5.2.conv.bias",
                "up_blocks.1.upsamplers.0.conv.bias",
            ),
            (
                "output_blocks.8.0.out_layers.3.weight",
                "up_blocks.2.resnets.2.conv2.weight",
            ),
            ("label_emb.0.2.weight", "add_embedding.linear_2.weight"),
            ("time_embed.0.bias", "time_embedding.linear_1.bias"),
            ("out.2.weight", "conv_out.weight"),
        ];
        for (stored, expected) in cases {
            assert_eq!(one(&rules, &format!("{UNET_PREFIX}{stored}")), expected);
        }
        for unknown in [
            "input_blocks.1.1.norm.weight",
            "output_blocks.8.1.conv.weight",
            "out.1.weight",
        ] {
            assert_eq!(
                rules.map(&format!("{UNET_PREFIX}{unknown}")),
                Mapped::Unknown,
                "{unknown}"
            );
        }
        assert_eq!(
            rules.map("first_stage_model.encoder.conv_in.weight"),
            Mapped::Ignored
        );
    }

    #[test]
    fn sdxl_base_vae_and_text_encoder_names() {
        let vae = Rules::new(Component::Vae, None).unwrap();
        assert_eq!(
            one(
                &vae,
                "first_stage_model.decoder.up.3.block.2.nin_shortcut.bias"
            ),
            "decoder.up_blocks.0.resnets.2.conv_shortcut.bias"
        );
        assert_eq!(
            targets(&vae, "first_stage_model.encoder.mid.attn_1.proj_out.weight"),
            vec![(
                "encoder.mid_block.attentions.0.to_out.0.weight".to_owned(),
                SQUEEZE
            )]
        );
        let g = Rules::new(Component::TextEncoder2, None).unwrap();
        assert_eq!(
            targets(
                &g,
                "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_bias"
            ),
            (0..3)
                .map(|i| (
                    format!(
                        "text_model.encoder.layers.31.self_attn.{}_proj.bias",
                        ["q", "k", "v"][i]
                    ),
                    chunk(i)
                ))
                .collect::<Vec<_>>()
        );
        assert_eq!(
            g.map("conditioner.embedders.1.model.transformer.resblocks.32.ln_1.weight"),
            Mapped::Unknown
        );
        assert_eq!(
            g.map("conditioner.embedders.1.model.logit_scale"),
            Mapped::Ignored
        );
        let l = Rules::new(Component::TextEncoder, None).unwrap();
        assert_eq!(
            one(
                &l,
                "conditioner.embedders.0.transformer.text_model.final_layer_norm.bias"
            ),
            "final_layer_norm.bias"
        );
        assert_eq!(
            l.map("conditioner.embedders.0.something_else"),
            Mapped::Unknown
        );
    }

    /// Every UNet parameter a stored tensor provides one to one maps back to that stored name.
    #[test]
    fn stored_names_invert_the_unet_mapping() {
        let rules = Rules::new(Component::Unet, None).unwrap();
        let cases = [
            (
                "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight",
                "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
            ),
            (
                "down_blocks.1.resnets.0.conv1.weight",
                "input_blocks.4.0.in_layers.2.weight",
            ),
            (
                "down_blocks.0.downsamplers.0.conv.weight",
                "input_blocks.3.0.op.weight",
            ),
            (
                "up_blocks.0.upsamplers.0.conv.weight",
                "output_blocks.2.2.conv.weight",
            ),
            (
                "mid_block.resnets.1.time_emb_proj.weight",
                "middle_block.2.emb_layers.1.weight",
            ),
            ("add_embedding.linear_1.weight", "label_emb.0.0.weight"),
            ("conv_out.weight", "out.2.weight"),
            ("conv_in.bias", "input_blocks.0.0.bias"),
        ];
        for (parameter, stored) in cases {
            assert_eq!(
                rules.stored_name(parameter),
                Some(format!("{UNET_PREFIX}{stored}")),
                "{parameter}"
            );
        }
        assert_eq!(
            rules.stored_name("down_blocks.0.attentions.0.proj_in.weight"),
            None
        );
        let g = Rules::new(Component::TextEncoder2, None).unwrap();
        // Split from the fused projection: no stored tensor provides it alone.
        assert_eq!(
            g.stored_name("text_model.encoder.layers.0.self_attn.q_proj.weight"),
            None
        );
        assert_eq!(
            g.stored_name("text_model.encoder.layers.0.mlp.fc1.weight"),
            Some(
                "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight".to_owned()
            )
        );
    }

    #[test]
    fn transforms_shapes() {
        assert_eq!(chunk(1).output_shape(&[6, 2]), Some(vec![2, 2]));
        assert_eq!(chunk(1).output_shape(&[7, 2]), None);
        assert_eq!(Transform::Transpose.output_shape(&[3, 5]), Some(vec![5, 3]));
        assert_eq!(SQUEEZE.output_shape(&[4, 3, 1, 1]), Some(vec![4, 3]));
        assert_eq!(SQUEEZE.output_shape(&[4]), Some(vec![4]));
        assert_eq!(SQUEEZE.output_shape(&[4, 3, 3, 3]), None);
    }

    #[test]
    fn bad_configs_are_errors() {
        let config = serde_json::json!({"down_block_types": ["DownBlock2D"], "up_block_types": []});
        assert!(UnetLayout::from_config(&config).is_err());
        let config = serde_json::json!({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"});
        assert!(UnetLayout::from_config(&config).is_err());
        let config = serde_json::json!({"layers_per_block": -1});
        assert!(UnetLayout::from_config(&config).is_err());
    }
}
