//! The encoder's output: a Gaussian with diagonal covariance over the latents.
//!
//! Upstream: `DiagonalGaussianDistribution` in `diffusers/models/autoencoders/vae.py`
//! (Kingma & Welling, "Auto-Encoding Variational Bayes", <https://arxiv.org/abs/1312.6114>).

use tch::{Device, Kind, Tensor};

use crate::{EngineError, Result};

/// `N(mean, diag(std²))` over latents, from the encoder's `2 × latent_channels` output.
#[derive(Debug)]
pub struct DiagonalGaussian {
    mean: Tensor,
    logvar: Tensor,
    std: Tensor,
}

impl DiagonalGaussian {
    /// Splits `parameters` (N, 2C, H, W) along channels into mean and log-variance; the
    /// log-variance is clamped to [-30, 20] as diffusers does.
    pub fn new(parameters: &Tensor) -> Result<Self> {
        let size = parameters.size();
        if size.len() != 4 || size[1] % 2 != 0 {
            return Err(EngineError::InvalidInput {
                component: "vae",
                message: format!("Gaussian parameters must be (N, 2C, H, W), got {size:?}"),
            });
        }
        Ok(Self::from_parameters(parameters))
    }

    /// [`DiagonalGaussian::new`] for parameters known to be well-shaped (the encoder's).
    pub(crate) fn from_parameters(parameters: &Tensor) -> Self {
        let mut halves = parameters.chunk(2, 1).into_iter();
        let mean = halves.next().unwrap_or_else(|| parameters.shallow_clone());
        let logvar = halves
            .next()
            .unwrap_or_else(|| parameters.shallow_clone())
            .clamp(-30.0, 20.0);
        let std = (&logvar * 0.5).exp();
        Self { mean, logvar, std }
    }

    /// The mean (N, C, H, W).
    pub fn mean(&self) -> &Tensor {
        &self.mean
    }

    /// The clamped log-variance.
    pub fn logvar(&self) -> &Tensor {
        &self.logvar
    }

    /// The standard deviation, `exp(logvar / 2)`.
    pub fn std(&self) -> &Tensor {
        &self.std
    }

    /// The most likely latents: the mean (diffusers' `mode()`, `sample_mode="argmax"`).
    pub fn mode(&self) -> Tensor {
        self.mean.shallow_clone()
    }

    /// `mean + std · noise`, with `noise` shaped like the mean (cast to its kind and device).
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        if noise.size() != self.mean.size() {
            return Err(EngineError::InvalidInput {
                component: "vae",
                message: format!(
                    "noise of shape {:?} for latents of shape {:?}",
                    noise.size(),
                    self.mean.size()
                ),
            });
        }
        let noise = noise
            .to_device(self.mean.device())
            .to_kind(self.mean.kind());
        Ok(&self.mean + &self.std * noise)
    }

    /// Standard normal noise for [`DiagonalGaussian::sample`], drawn from libtorch's default CPU
    /// generator in `kind` and moved to the parameters' device.
    ///
    /// This is the draw `latent_dist.sample(generator)` makes with a CPU `torch.Generator`
    /// (`randn_tensor(mean.shape, generator, dtype=parameters.dtype)`): after
    /// `tch::manual_seed(s)` it equals torch's draw after `generator.manual_seed(s)`, provided
    /// nothing else draws from the default generator in between. The kind matters: libtorch
    /// draws different numbers for different dtypes, so `kind` must be the dtype diffusers'
    /// VAE has while encoding (see [`super::AutoencoderKL::latents_from_image`]).
    pub fn draw_noise(&self, kind: Kind) -> Tensor {
        Tensor::randn(self.mean.size(), (kind, Device::Cpu)).to_device(self.mean.device())
    }
}
