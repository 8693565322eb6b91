//! SDXL's VAE: diffusers' `AutoencoderKL` (the KL-regularized autoencoder of Rombach et al.,
//! "High-Resolution Image Synthesis with Latent Diffusion Models",
//! <https://arxiv.org/abs/2112.10752>), with the pipeline steps around it.
//!
//! Upstream: `diffusers/models/autoencoders/autoencoder_kl.py` and `vae.py`; the latent scaling
//! and precision handling follow `StableDiffusionXLPipeline.__call__` (decode) and
//! `StableDiffusionXLImg2ImgPipeline.prepare_latents` (encode).
//!
//! # Precision
//!
//! The stock SDXL VAE overflows in f16 (`force_upcast: true`): diffusers casts it to f32 around
//! encode and decode. Here the VAE lives in its own [`nn::VarStore`] (see [`Vae::load`]), so the
//! engine loads it once in [`VaeConfig::run_kind`] of the UNet's kind — f32 next to an f16 UNet —
//! and [`AutoencoderKL::latents_from_image`] / [`AutoencoderKL::image_from_latents`] cast at the
//! boundary exactly where diffusers does.

mod blocks;
mod config;
mod decoder;
mod distribution;
mod encoder;
mod image;

use std::path::Path;

use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

pub use self::config::{DOWN_ENCODER_BLOCK, SampleSize, UP_DECODER_BLOCK, VaeConfig};
use self::decoder::Decoder;
pub use self::distribution::DiagonalGaussian;
use self::encoder::Encoder;
pub use self::image::{image_to_tensor, tensor_to_image};
use crate::layers;
use crate::{EngineError, Result};

/// The weights file in a diffusers `vae/` folder.
pub const WEIGHTS_FILE: &str = "diffusion_pytorch_model.safetensors";
/// The configuration file in a diffusers `vae/` folder.
pub const CONFIG_FILE: &str = "config.json";

/// Which latents [`AutoencoderKL::latents_from_image`] takes from the encoder's distribution.
#[derive(Debug, Clone, Copy)]
pub enum LatentSample<'a> {
    /// The mean (diffusers' `retrieve_latents(..., sample_mode="argmax")`).
    Mode,
    /// `mean + std · noise`, with caller-drawn noise shaped like the latents.
    Noise(&'a Tensor),
    /// `mean + std · noise`, the noise drawn right after encoding from libtorch's default CPU
    /// generator ([`DiagonalGaussian::draw_noise`]): img2img's `latent_dist.sample(generator)`
    /// with a CPU generator seeded like `tch::manual_seed`.
    DefaultGenerator,
}

/// `AutoencoderKL`: encoder, `quant_conv`, diagonal Gaussian, `post_quant_conv`, decoder.
///
/// Parameters carry diffusers' state-dict names (`encoder.down_blocks.0.resnets.0.conv1.weight`,
/// `decoder.mid_block.attentions.0.to_q.weight`, `quant_conv.weight`, …), so a `VarStore` fills
/// from a diffusers `vae/diffusion_pytorch_model.safetensors`. (Pre-0.14 checkpoints whose
/// attention is named `query`/`key`/`value`/`proj_attn` need renaming first.)
#[derive(Debug)]
pub struct AutoencoderKL {
    config: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<nn::Conv2D>,
    post_quant_conv: Option<nn::Conv2D>,
}

impl AutoencoderKL {
    /// Creates the model's variables under `path` (the root of the VAE's own `VarStore`).
    /// [`Vae::load`] does this and fills the weights; encoding and decoding never record
    /// gradients.
    pub fn new(path: nn::Path, config: &VaeConfig) -> Result<Self> {
        config.validate()?;
        let latent = config.latent_channels;
        Ok(Self {
            config: config.clone(),
            encoder: Encoder::new(&path / "encoder", config)?,
            decoder: Decoder::new(&path / "decoder", config)?,
            quant_conv: config
                .use_quant_conv
                .then(|| layers::conv2d(&path / "quant_conv", 2 * latent, 2 * latent, 1, 1, 0)),
            post_quant_conv: config
                .use_post_quant_conv
                .then(|| layers::conv2d(&path / "post_quant_conv", latent, latent, 1, 1, 0)),
        })
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// The kind of the weights (what inputs are cast to).
    pub fn kind(&self) -> Kind {
        self.decoder.weights().kind()
    }

    /// The device of the weights (where inputs are moved to).
    pub fn device(&self) -> Device {
        self.decoder.weights().device()
    }

    /// Encodes images (N, in_channels, H, W) in [-1, 1] into the latent distribution, whose
    /// latents are (N, latent_channels, H/f, W/f) with f = [`VaeConfig::vae_scale_factor`]
    /// (each downsampling halves rounding down, as diffusers' padded stride-2 convolution does).
    ///
    /// The images are cast to the model's kind and device first. Like every `tch` module
    /// forward, panics on a tensor of the wrong rank or channel count; the pipeline helpers
    /// ([`Self::latents_from_image`]) check shapes and return errors instead.
    pub fn encode(&self, images: &Tensor) -> DiagonalGaussian {
        let _no_grad = tch::no_grad_guard();
        let images = images.to_device(self.device()).to_kind(self.kind());
        let mut moments = self.encoder.forward(&images);
        if let Some(conv) = &self.quant_conv {
            moments = conv.forward(&moments);
        }
        // Contiguous whatever the weights' layout (channels-last convolutions give channels-last
        // maps): the latents are the schedulers' and the UNet's input.
        DiagonalGaussian::from_parameters(&moments.contiguous())
    }

    /// Decodes unscaled latents (N, latent_channels, h, w) into contiguous images (N,
    /// out_channels, f·h, f·w) in about [-1, 1], in the model's kind. The latents are cast to the model's kind and
    /// device first; panics on a wrong shape like [`Self::encode`].
    pub fn decode(&self, latents: &Tensor) -> Tensor {
        let _no_grad = tch::no_grad_guard();
        let mut latents = latents.to_device(self.device()).to_kind(self.kind());
        if let Some(conv) = &self.post_quant_conv {
            latents = conv.forward(&latents);
        }
        self.decoder.forward(&latents).contiguous()
    }

    /// VAE latents → the denoiser's latents, in the tensor's kind and device: `z · scaling_factor`
    /// for SDXL; `(z − latents_mean) · scaling_factor / latents_std` where both are configured
    /// (the SDXL img2img pipeline's branch); `(z − shift_factor) · scaling_factor` where only a
    /// shift is (SD3's convention).
    pub fn scale_latents(&self, z: &Tensor) -> Tensor {
        let factor = self.config.scaling_factor;
        match self.normalization(z) {
            Some((mean, std)) => (z - mean) * factor / std,
            None => match self.config.shift_factor {
                Some(shift) => (z - shift) * factor,
                None => z * factor,
            },
        }
    }

    /// The inverse of [`Self::scale_latents`], as the text-to-image pipeline unscales before
    /// decoding: `latents / scaling_factor` for SDXL, `latents · latents_std / scaling_factor +
    /// latents_mean`, or `latents / scaling_factor + shift_factor`.
    pub fn unscale_latents(&self, latents: &Tensor) -> Tensor {
        let factor = self.config.scaling_factor;
        match self.normalization(latents) {
            Some((mean, std)) => latents * std / factor + mean,
            None => match self.config.shift_factor {
                Some(shift) => latents / factor + shift,
                None => latents / factor,
            },
        }
    }

    /// img2img's initial latents: encodes `images` (N, in_channels, H, W) in [-1, 1], H and W
    /// multiples of [`VaeConfig::vae_scale_factor`] (as the SDXL pipelines require), in the
    /// model's kind, takes `sample`, casts to `denoiser_kind`, and scales
    /// ([`Self::scale_latents`]) in that kind — the order of
    /// `StableDiffusionXLImg2ImgPipeline.prepare_latents`.
    pub fn latents_from_image(
        &self,
        images: &Tensor,
        sample: LatentSample<'_>,
        denoiser_kind: Kind,
    ) -> Result<Tensor> {
        let size = images.size();
        let factor = self.config.vae_scale_factor();
        let fits = size.len() == 4
            && size[1] == self.config.in_channels
            && size[2..].iter().all(|side| *side > 0 && side % factor == 0);
        if !fits {
            return Err(EngineError::InvalidInput {
                component: "vae",
                message: format!(
                    "images must be (N, {}, H, W) with H and W positive multiples of {factor}, got {size:?}",
                    self.config.in_channels
                ),
            });
        }
        let distribution = self.encode(images);
        let z = match sample {
            LatentSample::Mode => distribution.mode(),
            LatentSample::Noise(noise) => distribution.sample(noise)?,
            LatentSample::DefaultGenerator => {
                // diffusers' SDXL img2img encodes in f32 whenever the VAE asks for upcasting
                // (whatever the pipeline's dtype) and draws the sample's noise in that dtype.
                let draw_kind = if self.config.force_upcast {
                    Kind::Float
                } else {
                    distribution.mean().kind()
                };
                distribution.sample(&distribution.draw_noise(draw_kind))?
            }
        };
        Ok(self.scale_latents(&z.to_kind(denoiser_kind)))
    }

    /// The denoiser's final latents → images in about [-1, 1] in the model's kind: casts them
    /// to the model's kind and device, unscales ([`Self::unscale_latents`]) and decodes — the
    /// order of `StableDiffusionXLPipeline.__call__` (with its f32 upcast when the VAE runs in
    /// f32). Turn the result into pixels with [`tensor_to_image`].
    pub fn image_from_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let size = latents.size();
        if size.len() != 4 || size[1] != self.config.latent_channels || size[2] == 0 || size[3] == 0
        {
            return Err(EngineError::InvalidInput {
                component: "vae",
                message: format!(
                    "latents must be (N, {}, h, w), got {size:?}",
                    self.config.latent_channels
                ),
            });
        }
        let latents = latents.to_device(self.device()).to_kind(self.kind());
        Ok(self.decode(&self.unscale_latents(&latents)))
    }

    /// `latents_mean` and `latents_std` as (1, C, 1, 1) tensors in `like`'s kind and device,
    /// when both are configured (built as diffusers does: an f32 tensor, then `.to(dtype)`).
    fn normalization(&self, like: &Tensor) -> Option<(Tensor, Tensor)> {
        let as_tensor = |values: &[f64]| {
            let values: Vec<f32> = values.iter().map(|v| *v as f32).collect();
            Tensor::from_slice(&values)
                .view([1, -1, 1, 1])
                .to_device(like.device())
                .to_kind(like.kind())
        };
        match (&self.config.latents_mean, &self.config.latents_std) {
            (Some(mean), Some(std)) => Some((as_tensor(mean), as_tensor(std))),
            _ => None,
        }
    }
}

/// An [`AutoencoderKL`] together with the `VarStore` that owns its weights, so that it has its
/// own device and kind independent of the UNet's.
#[derive(Debug)]
pub struct Vae {
    var_store: nn::VarStore,
    model: AutoencoderKL,
}

impl Vae {
    /// Loads a diffusers `vae/` folder (`config.json` and `diffusion_pytorch_model.safetensors`)
    /// onto `device` in `kind` (choose it with [`VaeConfig::run_kind`]).
    pub fn load(folder: &Path, device: Device, kind: Kind) -> Result<Self> {
        let config = VaeConfig::from_file(&folder.join(CONFIG_FILE))?;
        Self::from_weights(&config, &folder.join(WEIGHTS_FILE), device, kind)
    }

    /// Builds the model for `config` in `kind` and fills it from a diffusers-named safetensors
    /// file through the engine's loader (memory-mapped; every parameter must be present with its
    /// shape, and a tensor no parameter takes is an error).
    pub fn from_weights(
        config: &VaeConfig,
        weights: &Path,
        device: Device,
        kind: Kind,
    ) -> Result<Self> {
        if !matches!(
            kind,
            Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double
        ) {
            return Err(EngineError::InvalidConfig {
                component: "vae",
                message: format!("the VAE cannot run in {kind:?}"),
            });
        }
        let mut var_store = nn::VarStore::new(device);
        // Before building, so every variable is created in `kind` (no cast pass afterwards).
        var_store.set_kind(kind);
        let model = AutoencoderKL::new(var_store.root(), config)?;
        crate::loader::load_var_store(
            &mut var_store,
            &[weights.to_owned()],
            &crate::loader::KeyMap::diffusers(crate::loader::Component::Vae),
            crate::loader::Component::Vae,
        )?;
        var_store.freeze();
        Ok(Self { var_store, model })
    }

    /// The model.
    pub fn model(&self) -> &AutoencoderKL {
        &self.model
    }

    /// The store that owns the weights.
    pub fn var_store(&self) -> &nn::VarStore {
        &self.var_store
    }
}
