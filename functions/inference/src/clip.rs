//! CLIP's text transformer (Radford et al. 2021, <https://arxiv.org/abs/2103.00020>) as
//! transformers 5 implements it in `transformers/models/clip/modeling_clip.py`:
//! `CLIPTextModel` (SDXL's `text_encoder`, OpenAI ViT-L/14) and `CLIPTextModelWithProjection`
//! (SDXL's `text_encoder_2`, OpenCLIP ViT-bigG/14).
//!
//! Token + position embeddings, pre-LayerNorm encoder layers with causal self-attention, a final
//! LayerNorm, the pooled output at the end-of-text position, and for the projection variant a
//! bias-free `text_projection`. Every layer's hidden state is returned (SDXL conditions on the
//! penultimate one, taken before the final LayerNorm).
//!
//! Parameters carry the names of transformers' state dict as real SDXL files store them
//! (`text_model.embeddings.token_embedding.weight`,
//! `text_model.encoder.layers.0.self_attn.q_proj.weight`, …, `text_projection.weight`), so
//! [`ClipTextModel::new`] on a `VarStore`'s root is filled by `vs.load("text_encoder/model.safetensors")`.
//! transformers ≥ 5 writes a bare `CLIPTextModel` without the `text_model.` prefix (and strips it
//! on load): [`canonical_parameter_name`] maps such names back.

use std::borrow::Cow;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use crate::layers;
use crate::{EngineError, Result};

/// The activation of the encoder MLPs (`hidden_act` in `config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    /// `x · sigmoid(1.702 x)`: OpenAI CLIP (SDXL's `text_encoder`).
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    /// Exact (erf) GELU: OpenCLIP bigG (SDXL's `text_encoder_2`).
    #[serde(rename = "gelu")]
    Gelu,
    /// GELU with the tanh approximation.
    #[serde(rename = "gelu_pytorch_tanh")]
    GeluTanh,
}

impl Activation {
    fn apply(self, xs: &Tensor) -> Tensor {
        match self {
            Activation::QuickGelu => xs * (xs * 1.702).sigmoid(),
            Activation::Gelu => xs.gelu("none"),
            Activation::GeluTanh => xs.gelu("tanh"),
        }
    }
}

/// transformers' `CLIPTextConfig`, as a diffusers folder's `text_encoder/config.json` and
/// `text_encoder_2/config.json` hold it. Missing fields take transformers' defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    /// Token vocabulary size (49408).
    pub vocab_size: i64,
    /// Width of the transformer.
    pub hidden_size: i64,
    /// Width of the MLP inside each layer.
    pub intermediate_size: i64,
    /// Output width of `text_projection` (the projection variant only).
    pub projection_dim: i64,
    /// Number of encoder layers.
    pub num_hidden_layers: i64,
    /// Attention heads per layer.
    pub num_attention_heads: i64,
    /// Longest input, in tokens (77).
    pub max_position_embeddings: i64,
    /// MLP activation.
    pub hidden_act: Activation,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// Id of the beginning-of-text token.
    pub bos_token_id: i64,
    /// Id of the end-of-text token, whose position gives the pooled output. The value 2, which
    /// configs written before transformers PR #24773 carry (SDXL's among them), selects the legacy
    /// rule: pool at the largest id of each row.
    pub eos_token_id: i64,
    /// Id of the padding token (unused by the model).
    pub pad_token_id: i64,
}

impl Default for ClipTextConfig {
    /// transformers' `CLIPTextConfig()` defaults.
    fn default() -> Self {
        ClipTextConfig {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
            bos_token_id: 49406,
            eos_token_id: 49407,
            pad_token_id: 1,
        }
    }
}

impl ClipTextConfig {
    /// SDXL base 1.0's `text_encoder` (OpenAI CLIP ViT-L/14), as in
    /// `stabilityai/stable-diffusion-xl-base-1.0/text_encoder/config.json`.
    pub fn sdxl_text_encoder() -> Self {
        ClipTextConfig {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            projection_dim: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
            bos_token_id: 0,
            eos_token_id: 2,
            pad_token_id: 1,
        }
    }

    /// SDXL base 1.0's `text_encoder_2` (OpenCLIP ViT-bigG/14), as in
    /// `stabilityai/stable-diffusion-xl-base-1.0/text_encoder_2/config.json`.
    pub fn sdxl_text_encoder_2() -> Self {
        ClipTextConfig {
            hidden_size: 1280,
            intermediate_size: 5120,
            projection_dim: 1280,
            num_hidden_layers: 32,
            num_attention_heads: 20,
            hidden_act: Activation::Gelu,
            ..Self::sdxl_text_encoder()
        }
    }

    /// Reads a `config.json`; unknown fields are ignored.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| EngineError::Io {
            path: path.to_owned(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|e| EngineError::InvalidConfig {
            component: "CLIP text encoder",
            message: format!("{}: {e}", path.display()),
        })
    }

    fn validate(&self) -> Result<()> {
        let invalid = |message: String| EngineError::InvalidConfig {
            component: "CLIP text encoder",
            message,
        };
        if self.num_attention_heads <= 0 || self.hidden_size % self.num_attention_heads != 0 {
            return Err(invalid(format!(
                "hidden_size {} is not divisible into {} attention heads",
                self.hidden_size, self.num_attention_heads
            )));
        }
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value <= 0 {
                return Err(invalid(format!("{name} must be positive, got {value}")));
            }
        }
        Ok(())
    }
}

/// transformers' `CLIPTextEmbeddings`: token plus learned position embeddings.
#[derive(Debug)]
struct ClipTextEmbeddings {
    token_embedding: nn::Embedding,
    position_embedding: nn::Embedding,
}

impl ClipTextEmbeddings {
    fn new(path: nn::Path, config: &ClipTextConfig) -> Self {
        let embedding = |name: &str, n: i64| layers::embedding(&path / name, n, config.hidden_size);
        ClipTextEmbeddings {
            token_embedding: embedding("token_embedding", config.vocab_size),
            position_embedding: embedding("position_embedding", config.max_position_embeddings),
        }
    }

    fn forward(&self, input_ids: &Tensor) -> Tensor {
        let length = input_ids.size()[1];
        let positions = Tensor::arange(length, (Kind::Int64, input_ids.device()));
        self.token_embedding.forward(input_ids) + self.position_embedding.forward(&positions)
    }
}

/// transformers' `CLIPAttention`, causal as the text model runs it.
#[derive(Debug)]
struct ClipAttention {
    q_proj: nn::Linear,
    k_proj: nn::Linear,
    v_proj: nn::Linear,
    out_proj: nn::Linear,
    num_heads: i64,
    head_dim: i64,
}

impl ClipAttention {
    fn new(path: nn::Path, config: &ClipTextConfig) -> Self {
        let width = config.hidden_size;
        let linear = |name: &str| layers::linear(&path / name, width, width, true);
        ClipAttention {
            q_proj: linear("q_proj"),
            k_proj: linear("k_proj"),
            v_proj: linear("v_proj"),
            out_proj: linear("out_proj"),
            num_heads: config.num_attention_heads,
            head_dim: width / config.num_attention_heads,
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let size = xs.size();
        let (batch, length, width) = (size[0], size[1], size[2]);
        let heads = |projection: &nn::Linear| {
            projection
                .forward(xs)
                .view([batch, length, self.num_heads, self.head_dim])
                .transpose(1, 2)
        };
        // The default scale is head_dim^-0.5, as in transformers.
        let attention = Tensor::scaled_dot_product_attention(
            &heads(&self.q_proj),
            &heads(&self.k_proj),
            &heads(&self.v_proj),
            None::<Tensor>,
            0.0,
            true,
            None,
            false,
        );
        self.out_proj
            .forward(&attention.transpose(1, 2).reshape([batch, length, width]))
    }
}

/// transformers' `CLIPMLP`.
#[derive(Debug)]
struct ClipMlp {
    fc1: nn::Linear,
    fc2: nn::Linear,
    activation: Activation,
}

impl ClipMlp {
    fn new(path: nn::Path, config: &ClipTextConfig) -> Self {
        let (width, inner) = (config.hidden_size, config.intermediate_size);
        ClipMlp {
            fc1: layers::linear(&path / "fc1", width, inner, true),
            fc2: layers::linear(&path / "fc2", inner, width, true),
            activation: config.hidden_act,
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        self.fc2
            .forward(&self.activation.apply(&self.fc1.forward(xs)))
    }
}

/// transformers' `CLIPEncoderLayer`: pre-LayerNorm attention and MLP, each with a residual.
#[derive(Debug)]
struct ClipEncoderLayer {
    layer_norm1: nn::LayerNorm,
    self_attn: ClipAttention,
    layer_norm2: nn::LayerNorm,
    mlp: ClipMlp,
}

impl ClipEncoderLayer {
    fn new(path: nn::Path, config: &ClipTextConfig) -> Self {
        ClipEncoderLayer {
            layer_norm1: layer_norm(&path / "layer_norm1", config),
            self_attn: ClipAttention::new(&path / "self_attn", config),
            layer_norm2: layer_norm(&path / "layer_norm2", config),
            mlp: ClipMlp::new(&path / "mlp", config),
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let xs = xs + self.self_attn.forward(&self.layer_norm1.forward(xs));
        &xs + self.mlp.forward(&self.layer_norm2.forward(&xs))
    }
}

fn layer_norm(path: nn::Path, config: &ClipTextConfig) -> nn::LayerNorm {
    layers::layer_norm(path, config.hidden_size, config.layer_norm_eps)
}

/// What a CLIP text model computes for a batch of id rows.
#[derive(Debug)]
pub struct ClipTextOutput {
    /// `num_hidden_layers + 1` tensors `[batch, length, hidden_size]`: the embeddings, then the
    /// output of every encoder layer (the last one before the final LayerNorm) — transformers'
    /// `hidden_states` with `output_hidden_states=True`. SDXL takes `hidden_states[len − 2]`.
    pub hidden_states: Vec<Tensor>,
    /// The last layer's output after the final LayerNorm, `[batch, length, hidden_size]`.
    pub last_hidden_state: Tensor,
    /// `last_hidden_state` at each row's end-of-text position, `[batch, hidden_size]`.
    pub pooler_output: Tensor,
}

/// transformers' `CLIPTextModel` (SDXL's `text_encoder`).
#[derive(Debug)]
pub struct ClipTextModel {
    embeddings: ClipTextEmbeddings,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: nn::LayerNorm,
    config: ClipTextConfig,
    device: Device,
}

impl ClipTextModel {
    /// Creates the model's parameters under `path / "text_model"` (so on a `VarStore` root the
    /// names are those of SDXL's `text_encoder/model.safetensors`).
    pub fn new(path: nn::Path, config: &ClipTextConfig) -> Result<Self> {
        config.validate()?;
        let device = path.device();
        let path = &path / "text_model";
        let layers_path = &path / "encoder" / "layers";
        let layers = (0..config.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(&layers_path / i, config))
            .collect();
        Ok(ClipTextModel {
            embeddings: ClipTextEmbeddings::new(&path / "embeddings", config),
            layers,
            final_layer_norm: layer_norm(&path / "final_layer_norm", config),
            config: config.clone(),
            device,
        })
    }

    /// Runs the model on `input_ids` (`[batch, length]` or `[length]`, int64, length at most
    /// `max_position_embeddings`; panics otherwise, as a libtorch error). Attention is causal and
    /// padding is attended to, as diffusers runs SDXL's encoders (no attention mask).
    pub fn forward(&self, input_ids: &Tensor) -> ClipTextOutput {
        let input_ids = if input_ids.dim() == 1 {
            input_ids.unsqueeze(0)
        } else {
            input_ids.shallow_clone()
        };
        let mut hidden_states = Vec::with_capacity(self.layers.len() + 1);
        hidden_states.push(self.embeddings.forward(&input_ids));
        for layer in &self.layers {
            let next = layer.forward(&hidden_states[hidden_states.len() - 1]);
            hidden_states.push(next);
        }
        let last_hidden_state = self
            .final_layer_norm
            .forward(&hidden_states[hidden_states.len() - 1]);
        let pooler_output = self.pool(&input_ids, &last_hidden_state);
        ClipTextOutput {
            hidden_states,
            last_hidden_state,
            pooler_output,
        }
    }

    /// The end-of-text position of each row, as `CLIPTextModel.forward` finds it: the first
    /// `eos_token_id`, or — for the legacy `eos_token_id == 2` configs — the first largest id
    /// (`<|endoftext|>` is the largest id of CLIP's vocabulary).
    fn pool(&self, input_ids: &Tensor, last_hidden_state: &Tensor) -> Tensor {
        let input_ids = input_ids.to_device(last_hidden_state.device());
        let positions = if self.config.eos_token_id == 2 {
            input_ids.argmax(-1, false)
        } else {
            input_ids
                .eq(self.config.eos_token_id)
                .to_kind(Kind::Int)
                .argmax(-1, false)
        };
        let rows = Tensor::arange(
            input_ids.size()[0],
            (Kind::Int64, last_hidden_state.device()),
        );
        last_hidden_state.index(&[Some(rows), Some(positions)])
    }

    /// The configuration the model was built with.
    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// The device its parameters live on (where input ids should be).
    pub fn device(&self) -> Device {
        self.device
    }
}

/// What [`ClipTextModelWithProjection`] computes.
#[derive(Debug)]
pub struct ClipTextProjectionOutput {
    /// `text_projection(pooler_output)`, `[batch, projection_dim]`: SDXL's pooled prompt embedding.
    pub text_embeds: Tensor,
    /// The text model's outputs.
    pub text: ClipTextOutput,
}

/// transformers' `CLIPTextModelWithProjection` (SDXL's `text_encoder_2`).
#[derive(Debug)]
pub struct ClipTextModelWithProjection {
    text_model: ClipTextModel,
    text_projection: nn::Linear,
}

impl ClipTextModelWithProjection {
    /// Creates the parameters `text_model.*` and `text_projection.weight` under `path`.
    pub fn new(path: nn::Path, config: &ClipTextConfig) -> Result<Self> {
        let text_model = ClipTextModel::new(path.clone(), config)?;
        let text_projection = layers::linear(
            &path / "text_projection",
            config.hidden_size,
            config.projection_dim,
            false,
        );
        Ok(ClipTextModelWithProjection {
            text_model,
            text_projection,
        })
    }

    /// Runs the text model and projects its pooled output (see [`ClipTextModel::forward`]).
    pub fn forward(&self, input_ids: &Tensor) -> ClipTextProjectionOutput {
        let text = self.text_model.forward(input_ids);
        ClipTextProjectionOutput {
            text_embeds: self.text_projection.forward(&text.pooler_output),
            text,
        }
    }

    /// The configuration the model was built with.
    pub fn config(&self) -> &ClipTextConfig {
        self.text_model.config()
    }

    /// The device its parameters live on (where input ids should be).
    pub fn device(&self) -> Device {
        self.text_model.device()
    }
}

/// Maps a text-encoder parameter name as found in a file to the name these modules use:
/// transformers ≥ 5 saves a bare `CLIPTextModel` as `embeddings.…`, `encoder.…`,
/// `final_layer_norm.…`, which become `text_model.…`; every other name is returned unchanged.
pub fn canonical_parameter_name(name: &str) -> Cow<'_, str> {
    if ["embeddings.", "encoder.", "final_layer_norm."]
        .iter()
        .any(|prefix| name.starts_with(prefix))
    {
        Cow::Owned(format!("text_model.{name}"))
    } else {
        Cow::Borrowed(name)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sdxl_configs_build_the_real_parameter_names() {
        let config = ClipTextConfig {
            num_hidden_layers: 2,
            ..ClipTextConfig::sdxl_text_encoder_2()
        };
        let vs = nn::VarStore::new(Device::Cpu);
        ClipTextModelWithProjection::new(vs.root(), &config).unwrap();
        let variables = vs.variables();
        for name in [
            "text_model.embeddings.token_embedding.weight",
            "text_model.embeddings.position_embedding.weight",
            "text_model.encoder.layers.1.self_attn.q_proj.weight",
            "text_model.encoder.layers.1.self_attn.out_proj.bias",
            "text_model.encoder.layers.0.mlp.fc1.weight",
            "text_model.encoder.layers.0.layer_norm2.bias",
            "text_model.final_layer_norm.weight",
            "text_projection.weight",
        ] {
            assert!(variables.contains_key(name), "{name}");
        }
        assert!(!variables.contains_key("text_projection.bias"));
        assert_eq!(variables["text_projection.weight"].size(), [1280, 1280]);
        assert_eq!(
            variables["text_model.encoder.layers.0.mlp.fc1.weight"].size(),
            [5120, 1280]
        );
        assert_eq!(variables.len(), 2 + 2 * 16 + 2 + 1);
    }

    #[test]
    fn configs_parse_from_json_with_defaults() {
        let config: ClipTextConfig = serde_json::from_str(
            r#"{"hidden_act": "gelu", "hidden_size": 1280, "architectures": ["x"]}"#,
        )
        .unwrap();
        assert_eq!(config.hidden_act, Activation::Gelu);
        assert_eq!(config.hidden_size, 1280);
        assert_eq!(config.eos_token_id, 49407);
        assert!(serde_json::from_str::<ClipTextConfig>(r#"{"hidden_act": "swish"}"#).is_err());
        let bad = ClipTextConfig {
            num_attention_heads: 7,
            ..ClipTextConfig::sdxl_text_encoder()
        };
        let vs = nn::VarStore::new(Device::Cpu);
        assert!(matches!(
            ClipTextModel::new(vs.root(), &bad),
            Err(EngineError::InvalidConfig { .. })
        ));
    }

    #[test]
    fn transformers_5_names_map_to_the_prefixed_ones() {
        assert_eq!(
            canonical_parameter_name("encoder.layers.3.mlp.fc2.bias"),
            "text_model.encoder.layers.3.mlp.fc2.bias"
        );
        assert_eq!(
            canonical_parameter_name("text_model.final_layer_norm.bias"),
            "text_model.final_layer_norm.bias"
        );
        assert_eq!(
            canonical_parameter_name("text_projection.weight"),
            "text_projection.weight"
        );
    }
}
