//! Denoising Diffusion Implicit Models (Song et al., <https://arxiv.org/abs/2010.02502>) with
//! eta = 0 (deterministic), after diffusers' `schedulers/scheduling_ddim.py` (`DDIMScheduler`).
//!
//! DDIM works on the training schedule's `alphas_cumprod` at integer timesteps: each step goes
//! from timestep `t` to `t - num_train_timesteps / steps` (integer division, whatever the
//! spacing, as diffusers does), and below 0 to `final_alpha_cumprod` (1 with
//! `set_alpha_to_one`, else the first training value).

use tch::Tensor;

use super::{
    PredictionType, SchedulerConfig, Steps, TimestepSpacing, alphas_cumprod,
    np_arange_down_to_zero, np_linspace, scalar, sqrt,
};
use crate::Result;

/// DDIM's schedule and the position of one run in it.
#[derive(Debug)]
pub struct DdimScheduler {
    prediction_type: PredictionType,
    clip_sample: Option<f64>,
    num_train_timesteps: usize,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    steps: Steps,
}

impl DdimScheduler {
    /// diffusers' `DDIMScheduler.from_config(config)` followed by
    /// `set_timesteps(num_inference_steps)`. `timestep_spacing` defaults to `leading`,
    /// `clip_sample` and `set_alpha_to_one` to true.
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        config.check(num_inference_steps)?;
        let alphas_cumprod = Vec::<f32>::try_from(alphas_cumprod(config, false)?)?;
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let train = config.num_train_timesteps;
        let timesteps: Vec<f64> = match config.timestep_spacing.unwrap_or(TimestepSpacing::Leading)
        {
            TimestepSpacing::Linspace => np_linspace(0.0, (train - 1) as f64, num_inference_steps)
                .into_iter()
                .rev()
                .map(f64::round_ties_even)
                .collect(),
            TimestepSpacing::Leading => {
                let ratio = train / num_inference_steps;
                (0..num_inference_steps)
                    .rev()
                    .map(|i| (i * ratio + config.steps_offset) as f64)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = train as f64 / num_inference_steps as f64;
                np_arange_down_to_zero(train as f64, ratio)
                    .into_iter()
                    .map(|t| t.round_ties_even() - 1.0)
                    .collect()
            }
        };
        if let Some(&t) = timesteps.iter().find(|&&t| t < 0.0 || t >= train as f64) {
            return Err(super::invalid_config(format!(
                "timestep {t} is outside the {train} training timesteps (steps_offset {})",
                config.steps_offset
            )));
        }
        Ok(Self {
            prediction_type: config.prediction_type,
            clip_sample: config.clip_sample.then_some(config.clip_sample_range),
            num_train_timesteps: train,
            alphas_cumprod,
            final_alpha_cumprod,
            steps: Steps::new(timesteps, num_inference_steps),
        })
    }

    /// Always 1.
    pub fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// The timesteps and where the run is.
    pub fn steps(&self) -> &Steps {
        &self.steps
    }

    pub(crate) fn steps_mut(&mut self) -> &mut Steps {
        &mut self.steps
    }

    /// The identity (DDIM needs no input scaling).
    pub fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        self.steps.check_index(step_index)?;
        Ok(sample.shallow_clone())
    }

    /// The training timestep of step `step_index`.
    fn timestep(&self, step_index: usize) -> usize {
        self.steps.timesteps()[step_index] as usize
    }

    /// One deterministic DDIM step (eta = 0), in the sample's dtype as diffusers computes it.
    pub fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
    ) -> Result<Tensor> {
        self.steps.advance(step_index)?;
        let timestep = self.timestep(step_index);
        let prev_timestep =
            timestep as i64 - (self.num_train_timesteps / self.steps.num_inference_steps()) as i64;
        let alpha_prod_t = scalar(self.alphas_cumprod[timestep]);
        let alpha_prod_t_prev = scalar(
            usize::try_from(prev_timestep)
                .map(|t| self.alphas_cumprod[t])
                .unwrap_or(self.final_alpha_cumprod),
        );
        let beta_prod_t = -&alpha_prod_t + 1.0;

        let (pred_original_sample, pred_epsilon) = match self.prediction_type {
            PredictionType::Epsilon => (
                (sample - sqrt(&beta_prod_t) * model_output) / sqrt(&alpha_prod_t),
                model_output.shallow_clone(),
            ),
            PredictionType::VPrediction => (
                sqrt(&alpha_prod_t) * sample - sqrt(&beta_prod_t) * model_output,
                sqrt(&alpha_prod_t) * model_output + sqrt(&beta_prod_t) * sample,
            ),
        };
        let pred_original_sample = match self.clip_sample {
            Some(range) => pred_original_sample.f_clamp(-range, range)?,
            None => pred_original_sample,
        };
        // eta = 0: std_dev_t = 0, so `1 - alpha_prod_t_prev - std_dev_t ** 2` and no noise.
        let pred_sample_direction = sqrt(&(-&alpha_prod_t_prev + 1.0)) * pred_epsilon;
        Ok(sqrt(&alpha_prod_t_prev) * pred_original_sample + pred_sample_direction)
    }

    /// `ᾱ_t ** 0.5 * original + (1 - ᾱ_t) ** 0.5 * noise` at the timestep of step
    /// `step_index`, in the original's dtype and device as diffusers computes it.
    pub fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        step_index: usize,
    ) -> Result<Tensor> {
        self.steps.check_index(step_index)?;
        let alpha = super::scalar_like(self.alphas_cumprod[self.timestep(step_index)], original)?;
        Ok(sqrt(&alpha) * original + sqrt(&(-&alpha + 1.0)) * noise)
    }
}
