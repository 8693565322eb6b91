//! Euler sampler of Karras et al., "Elucidating the Design Space of Diffusion-Based Generative
//! Models" (<https://arxiv.org/abs/2206.00364>, algorithm 2 without churn), after diffusers'
//! `schedulers/scheduling_euler_discrete.py` (`EulerDiscreteScheduler`), SDXL's default.

use tch::Tensor;

use super::{
    InterpolationType, PredictionType, SchedulerConfig, Steps, TimestepSpacing, TimestepType,
    alphas_cumprod, euler_init_noise_sigma, euler_timesteps, final_sigma, karras_sigmas,
    log_sigmas, np_interp_unit_grid, scalar, sigma_to_t, sqrt, squared, training_sigmas,
};
use crate::Result;

/// Euler's schedule and the position of one run in it.
#[derive(Debug)]
pub struct EulerDiscreteScheduler {
    prediction_type: PredictionType,
    sigmas: Vec<f32>,
    init_noise_sigma: f64,
    steps: Steps,
}

impl EulerDiscreteScheduler {
    /// diffusers' `EulerDiscreteScheduler.from_config(config)` followed by
    /// `set_timesteps(num_inference_steps)`. `timestep_spacing` defaults to `linspace`.
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        config.check(num_inference_steps)?;
        let spacing = config.timestep_spacing.unwrap_or(TimestepSpacing::Linspace);
        let alphas_cumprod = alphas_cumprod(config, true)?;
        let train_sigmas = training_sigmas(&alphas_cumprod)?;
        let mut timesteps: Vec<f32> = euler_timesteps(spacing, config, num_inference_steps);

        let mut sigmas: Vec<f64> = match config.interpolation_type {
            InterpolationType::Linear => timesteps
                .iter()
                .map(|&t| np_interp_unit_grid(f64::from(t), &train_sigmas))
                .collect(),
            InterpolationType::LogLinear => {
                // torch.linspace(log(sigmas[-1]), log(sigmas[0]), steps + 1).exp(), in f32.
                let high = f64::from(train_sigmas[train_sigmas.len() - 1]).ln() as f32;
                let low = f64::from(train_sigmas[0]).ln() as f32;
                let spaced = Tensor::f_linspace(
                    f64::from(high),
                    f64::from(low),
                    num_inference_steps as i64 + 1,
                    (tch::Kind::Float, tch::Device::Cpu),
                )?
                .f_exp()?;
                Vec::<f32>::try_from(spaced)?
                    .into_iter()
                    .map(f64::from)
                    .collect()
            }
        };
        if config.use_karras_sigmas {
            let log_sigmas = log_sigmas(&train_sigmas);
            let sigma_min = config.sigma_min.unwrap_or(sigmas[sigmas.len() - 1]);
            let sigma_max = config.sigma_max.unwrap_or(sigmas[0]);
            sigmas = karras_sigmas(sigma_min, sigma_max, num_inference_steps);
            timesteps = sigmas
                .iter()
                .map(|&s| sigma_to_t(s, &log_sigmas) as f32)
                .collect();
        }
        sigmas.push(final_sigma(config, &alphas_cumprod)?);
        let sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();

        let timesteps: Vec<f64> = if config.timestep_type == TimestepType::Continuous
            && config.prediction_type == PredictionType::VPrediction
        {
            // torch.Tensor([0.25 * sigma.log() for sigma in sigmas[:-1]])
            sigmas[..sigmas.len() - 1]
                .iter()
                .map(|&s| (scalar(s).log() * 0.25).double_value(&[]))
                .collect()
        } else {
            timesteps.into_iter().map(f64::from).collect()
        };

        let init_noise_sigma = euler_init_noise_sigma(&sigmas, spacing)?;
        Ok(Self {
            prediction_type: config.prediction_type,
            steps: Steps::new(timesteps, num_inference_steps),
            sigmas,
            init_noise_sigma,
        })
    }

    /// The sigmas, one per timestep plus the final one.
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

    /// `sample / ((sigma ** 2 + 1) ** 0.5)`: the UNet sees unit-variance input.
    pub fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        self.steps.check_index(step_index)?;
        let sigma = scalar(self.sigmas[step_index]);
        Ok(sample / sqrt(&(squared(&sigma) + 1.0)))
    }

    /// One Euler step from `sigmas[i]` to `sigmas[i + 1]` (no churn: diffusers' pipelines pass
    /// none). Computes in f32 and returns the model output's dtype, as diffusers does.
    pub fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
    ) -> Result<Tensor> {
        self.steps.advance(step_index)?;
        let sample = sample.f_to_kind(tch::Kind::Float)?;
        let sigma = scalar(self.sigmas[step_index]);
        // gamma = 0: sigma_hat = sigma * (gamma + 1) = sigma.
        let sigma_hat = &sigma * 1.0;
        let pred_original_sample = match self.prediction_type {
            PredictionType::Epsilon => &sample - &sigma_hat * model_output,
            PredictionType::VPrediction => {
                let c_out = -&sigma / sqrt(&(squared(&sigma) + 1.0));
                model_output * c_out + &sample / (squared(&sigma) + 1.0)
            }
        };
        let derivative = (&sample - pred_original_sample) / &sigma_hat;
        let dt = scalar(self.sigmas[step_index + 1]) - &sigma_hat;
        let prev_sample = sample + derivative * dt;
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
