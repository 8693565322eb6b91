//! SDXL's text conditioning (Podell et al. 2023, <https://arxiv.org/abs/2307.01952>), as
//! `StableDiffusionXLPipeline.encode_prompt` computes it in diffusers 0.42
//! (`diffusers/pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl.py`).
//!
//! Each prompt goes through both CLIP encoders, padded/truncated to 77 ids; the penultimate hidden
//! states (before the final LayerNorm) are concatenated on the feature axis —
//! `[1, 77, 768] ‖ [1, 77, 1280]` → `prompt_embeds` `[1, 77, 2048]` — and encoder 2's projected
//! pooled output is `pooled_prompt_embeds` `[1, 1280]`. diffusers' quirks are kept:
//!
//! - `prompt_2` / `negative_prompt_2` that are absent *or empty* fall back to `prompt` /
//!   `negative_prompt` (Python's `or`);
//! - with `force_zeros_for_empty_prompt` (true in SDXL base's `model_index.json`) and *no*
//!   negative prompt, both negative embeddings are zeros; an explicit `""` is encoded like any text;
//! - `clip_skip` moves the positive embeddings back by that many layers; the negative ones always
//!   use the penultimate layer.
//!
//! ```no_run
//! # fn main() -> darkroom_inference::Result<()> {
//! use std::path::Path;
//! use darkroom_inference::clip::{ClipTextConfig, ClipTextModel, ClipTextModelWithProjection};
//! use darkroom_inference::text_encoder::{PromptRequest, SdxlTextEncoders};
//! use darkroom_inference::tokenizer::ClipTokenizer;
//!
//! let root = Path::new("stable-diffusion-xl-base-1.0");
//! let mut vs = tch::nn::VarStore::new(tch::Device::Cpu);
//! let text_encoder = ClipTextModel::new(
//!     vs.root(),
//!     &ClipTextConfig::from_file(&root.join("text_encoder/config.json"))?,
//! )?;
//! vs.load(root.join("text_encoder/model.safetensors"))?;
//! let mut vs_2 = tch::nn::VarStore::new(tch::Device::Cpu);
//! let text_encoder_2 = ClipTextModelWithProjection::new(
//!     vs_2.root(),
//!     &ClipTextConfig::from_file(&root.join("text_encoder_2/config.json"))?,
//! )?;
//! vs_2.load(root.join("text_encoder_2/model.safetensors"))?;
//! let encoders = SdxlTextEncoders {
//!     tokenizer: ClipTokenizer::from_folder(&root.join("tokenizer"))?,
//!     text_encoder,
//!     tokenizer_2: ClipTokenizer::from_folder(&root.join("tokenizer_2"))?,
//!     text_encoder_2,
//!     force_zeros_for_empty_prompt: true,
//! };
//! let conditioning = encoders.encode_prompt(&PromptRequest::new("a photo of a cat"))?;
//! assert_eq!(conditioning.prompt_embeds.size(), [1, 77, 2048]);
//! # Ok(())
//! # }
//! ```

use tch::Tensor;

use crate::clip::{ClipTextModel, ClipTextModelWithProjection};
use crate::tokenizer::ClipTokenizer;
use crate::{EngineError, Result};

/// What to encode: `StableDiffusionXLPipeline.encode_prompt`'s text arguments for one prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptRequest {
    /// The prompt (for both encoders unless `prompt_2` is given).
    pub prompt: String,
    /// The prompt for `tokenizer_2`/`text_encoder_2`; absent or empty: `prompt`.
    pub prompt_2: Option<String>,
    /// What the image should not show. `None` with `force_zeros_for_empty_prompt`: zero
    /// embeddings; `None` without it: the empty text is encoded.
    pub negative_prompt: Option<String>,
    /// The negative prompt for encoder 2; absent or empty: `negative_prompt`.
    pub negative_prompt_2: Option<String>,
    /// Whether negative embeddings are wanted (guidance scale > 1).
    pub classifier_free_guidance: bool,
    /// Layers to skip from the penultimate one for the positive embeddings (diffusers' `clip_skip`).
    pub clip_skip: Option<usize>,
}

impl PromptRequest {
    /// `prompt` for both encoders, no negative prompt, classifier-free guidance on.
    pub fn new(prompt: impl Into<String>) -> Self {
        PromptRequest {
            prompt: prompt.into(),
            prompt_2: None,
            negative_prompt: None,
            negative_prompt_2: None,
            classifier_free_guidance: true,
            clip_skip: None,
        }
    }
}

/// SDXL's conditioning for one prompt, on text encoder 2's device and in its precision.
#[derive(Debug)]
pub struct TextConditioning {
    /// `[1, 77, 2048]`: the UNet's `encoder_hidden_states`.
    pub prompt_embeds: Tensor,
    /// `[1, 1280]`: the UNet's `text_embeds` (added conditioning).
    pub pooled_prompt_embeds: Tensor,
    /// `[1, 77, 2048]`, with classifier-free guidance.
    pub negative_prompt_embeds: Option<Tensor>,
    /// `[1, 1280]`, with classifier-free guidance.
    pub negative_pooled_prompt_embeds: Option<Tensor>,
    /// How many tokens of the positive prompts fell past the 77-token window (the larger count of
    /// the two tokenizers); diffusers logs a warning when this is not 0.
    pub truncated_tokens: usize,
}

/// SDXL's two tokenizer/encoder pairs and the pipeline flag that governs absent negative prompts.
#[derive(Debug)]
pub struct SdxlTextEncoders {
    /// `tokenizer/`: pads with `<|endoftext|>`.
    pub tokenizer: ClipTokenizer,
    /// `text_encoder/`: CLIP ViT-L/14.
    pub text_encoder: ClipTextModel,
    /// `tokenizer_2/`: pads with `!`.
    pub tokenizer_2: ClipTokenizer,
    /// `text_encoder_2/`: OpenCLIP ViT-bigG/14 with projection.
    pub text_encoder_2: ClipTextModelWithProjection,
    /// `force_zeros_for_empty_prompt` from `model_index.json` (true for SDXL base).
    pub force_zeros_for_empty_prompt: bool,
}

/// One text's penultimate-layer (or `clip_skip`) states from both encoders and its pooled output.
struct Encoded {
    embeds: Tensor,
    pooled: Tensor,
    truncated: usize,
}

impl SdxlTextEncoders {
    /// Computes `prompt_embeds`, `pooled_prompt_embeds` and, with guidance, the negative ones, as
    /// `encode_prompt(prompt, num_images_per_prompt=1, …)` does (repeat the rows for more images).
    /// Runs without gradient tracking.
    pub fn encode_prompt(&self, request: &PromptRequest) -> Result<TextConditioning> {
        tch::no_grad(|| self.encode_prompt_inner(request))
    }

    fn encode_prompt_inner(&self, request: &PromptRequest) -> Result<TextConditioning> {
        let prompt_2 = non_empty(request.prompt_2.as_deref()).unwrap_or(&request.prompt);
        let positive = self.encode(&request.prompt, prompt_2, request.clip_skip)?;

        let mut conditioning = TextConditioning {
            negative_prompt_embeds: None,
            negative_pooled_prompt_embeds: None,
            truncated_tokens: positive.truncated,
            prompt_embeds: positive.embeds,
            pooled_prompt_embeds: positive.pooled,
        };
        if !request.classifier_free_guidance {
            return Ok(conditioning);
        }
        let (negative_embeds, negative_pooled) = if request.negative_prompt.is_none()
            && self.force_zeros_for_empty_prompt
        {
            (
                conditioning.prompt_embeds.zeros_like(),
                conditioning.pooled_prompt_embeds.zeros_like(),
            )
        } else {
            let negative = request.negative_prompt.as_deref().unwrap_or("");
            let negative_2 = non_empty(request.negative_prompt_2.as_deref()).unwrap_or(negative);
            let encoded = self.encode(negative, negative_2, None)?;
            (encoded.embeds, encoded.pooled)
        };
        conditioning.negative_prompt_embeds = Some(negative_embeds);
        conditioning.negative_pooled_prompt_embeds = Some(negative_pooled);
        Ok(conditioning)
    }

    /// Both encoders on their texts: `hidden_states[-(clip_skip + 2)]` of each, concatenated, and
    /// encoder 2's `text_embeds`.
    fn encode(&self, text: &str, text_2: &str, clip_skip: Option<usize>) -> Result<Encoded> {
        let back = clip_skip.unwrap_or(0) + 2;
        let pick = |hidden_states: &[Tensor]| -> Result<Tensor> {
            hidden_states
                .len()
                .checked_sub(back)
                .map(|index| hidden_states[index].shallow_clone())
                .ok_or_else(|| EngineError::InvalidConfig {
                    component: "prompt encoding",
                    message: format!(
                        "clip_skip {} exceeds the {} layers of a text encoder",
                        back - 2,
                        hidden_states.len() - 1
                    ),
                })
        };

        let tokens = self.tokenizer.encode(text)?;
        let output = self
            .text_encoder
            .forward(&tokens.to_tensor(self.text_encoder.device()));
        let embeds = pick(&output.hidden_states)?;

        let tokens_2 = self.tokenizer_2.encode(text_2)?;
        let device = self.text_encoder_2.device();
        let output_2 = self.text_encoder_2.forward(&tokens_2.to_tensor(device));
        let embeds_2 = pick(&output_2.text.hidden_states)?;

        let embeds = embeds.to_device(device).to_kind(embeds_2.kind());
        Ok(Encoded {
            embeds: Tensor::cat(&[embeds, embeds_2], -1),
            pooled: output_2.text_embeds,
            truncated: tokens.truncated.max(tokens_2.truncated),
        })
    }
}

/// Python's `text or fallback` for optional strings: `None` and `""` both fall back.
fn non_empty(text: Option<&str>) -> Option<&str> {
    text.filter(|t| !t.is_empty())
}
