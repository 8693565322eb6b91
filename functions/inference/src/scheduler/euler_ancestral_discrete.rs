//! Ancestral Euler sampler (k-diffusion's `sample_euler_ancestral`, Karras et al.
//! <https://arxiv.org/abs/2206.00364>), after diffusers'
//! `schedulers/scheduling_euler_ancestral_discrete.py` (`EulerAncestralDiscreteScheduler`).
//!
//! Each step goes deterministically down to `sigma_down` and adds fresh noise of size
//! `sigma_up`, so it needs one standard-normal tensor per step; see the parent module for how
//! the pipeline draws it to match diffusers' seeds.

use tch::Tensor;

use super::{
    PredictionType, SchedulerConfig, Steps, TimestepSpacing, alphas_cumprod,
    euler_init_noise_sigma, euler_timesteps, np_interp_unit_grid, scalar, sqrt, squared,
    training_sigmas,
};
use crate::Result;

/// Euler ancestral's schedule and the position of one run in it.
#[derive(Debug)]
pub struct EulerAncestralDiscreteScheduler {
    prediction_type: PredictionType,
    sigmas: Vec<f32>,
    init_noise_sigma: f64,
    steps: Steps,
}

impl EulerAncestralDiscreteScheduler {
    /// diffusers' `EulerAncestralDiscreteScheduler.from_config(config)` followed by
    /// `set_timesteps(num_inference_steps)`. `timestep_spacing` defaults to `linspace`; the
    /// class reads no Karras, interpolation or final-sigma settings (linear interpolation, last
    /// sigma 0).
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        config.check(num_inference_steps)?;
        let spacing = config.timestep_spacing.unwrap_or(TimestepSpacing::Linspace);
        let alphas_cumprod = alphas_cumprod(config, true)?;
        let train_sigmas = training_sigmas(&alphas_cumprod)?;
        let timesteps = euler_timesteps(spacing, config, num_inference_steps);
        let mut sigmas: Vec<f32> = timesteps
            .iter()
            .map(|&t| np_interp_unit_grid(f64::from(t), &train_sigmas) as f32)
            .collect();
        sigmas.push(0.0);
        let init_noise_sigma = euler_init_noise_sigma(&sigmas, spacing)?;
        Ok(Self {
            prediction_type: config.prediction_type,
            steps: Steps::new(
                timesteps.into_iter().map(f64::from).collect(),
                num_inference_steps,
            ),
            sigmas,
            init_noise_sigma,
        })
    }

    /// The sigmas, one per timestep plus the final 0.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// `max sigma` (linspace, trailing) or `sqrt(max sigma² + 1)` (leading).
    pub fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    /// The timesteps and where the run is.
    pub fn steps(&self) -> &Steps {
        &self.steps
    }

    pub(crate) fn steps_mut(&mut self) -> &mut Steps {
        &mut self.steps
    }

    /// `sample / ((sigma ** 2 + 1) ** 0.5)`.
    pub fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        self.steps.check_index(step_index)?;
        let sigma = scalar(self.sigmas[step_index]);
        Ok(sample / sqrt(&(squared(&sigma) + 1.0)))
    }

    /// One ancestral step: Euler down to `sigma_down`, then `noise * sigma_up` added. `noise`
    /// is a standard-normal tensor shaped like `model_output` (see
    /// [`step_noise_like`](super::step_noise_like)). Computes in f32 and returns the model
    /// output's dtype.
    pub fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &Tensor,
    ) -> Result<Tensor> {
        self.steps.advance(step_index)?;
        let sigma = scalar(self.sigmas[step_index]);
        let sample = sample.f_to_kind(tch::Kind::Float)?;
        let pred_original_sample = match self.prediction_type {
            PredictionType::Epsilon => &sample - &sigma * model_output,
            PredictionType::VPrediction => {
                let c_out = -&sigma / sqrt(&(squared(&sigma) + 1.0));
                model_output * c_out + &sample / (squared(&sigma) + 1.0)
            }
        };
        let sigma_from = &sigma;
        let sigma_to = scalar(self.sigmas[step_index + 1]);
        let sigma_up = sqrt(
            &(squared(&sigma_to) * (squared(sigma_from) - squared(&sigma_to))
                / squared(sigma_from)),
        );
        let sigma_down = sqrt(&(squared(&sigma_to) - squared(&sigma_up)));

        let derivative = (&sample - pred_original_sample) / &sigma;
        let dt = sigma_down - &sigma;
        let prev_sample = sample + derivative * dt;
        let prev_sample = prev_sample + noise * sigma_up;
        Ok(prev_sample.f_to_kind(model_output.kind())?)
    }

    /// `original + noise * sigmas[step_index]`.
    pub fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        step_index: usize,
    ) -> Result<Tensor> {
        self.steps.check_index(step_index)?;
        let sigma = super::scalar_like(self.sigmas[step_index], original)?;
        Ok(original + noise * sigma)
    }
}
