//! DPM-Solver++ (Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
//! Probabilistic Models", <https://arxiv.org/abs/2211.01095>), multistep, second order, on
//! Karras sigmas ("DPM++ 2M Karras"), after diffusers'
//! `schedulers/scheduling_dpmsolver_multistep.py` (`DPMSolverMultistepScheduler` with
//! `solver_order=2`, `algorithm_type="dpmsolver++"`, `use_karras_sigmas=True`).
//!
//! The solver keeps the last two data predictions (x0) of the run: the first step, and the last
//! step when `final_sigmas_type` is `zero` (or with `euler_at_final`, or with
//! `lower_order_final` and fewer than 15 steps), are first order; the others are second order.

use tch::Tensor;

use super::{
    FinalSigmasType, PredictionType, SchedulerConfig, SolverType, Steps, alpha_sigma_t,
    alphas_cumprod, final_sigma, karras_sigmas, log_sigmas, scalar, sigma_to_t, training_sigmas,
};
use crate::Result;

/// DPM++ 2M Karras: the schedule, and one run's position and model-output history.
#[derive(Debug)]
pub struct DpmSolverMultistepScheduler {
    prediction_type: PredictionType,
    solver_type: SolverType,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_is_zero: bool,
    sigmas: Vec<f32>,
    /// The data predictions of the previous and the current step (`model_outputs`).
    model_outputs: [Option<Tensor>; 2],
    /// How many steps have run, capped at the solver order (`lower_order_nums`).
    lower_order_nums: usize,
    steps: Steps,
}

impl DpmSolverMultistepScheduler {
    /// diffusers' `DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True,
    /// algorithm_type="dpmsolver++", solver_order=2)` followed by
    /// `set_timesteps(num_inference_steps)`. With Karras sigmas the timestep spacing and
    /// `lambda_min_clipped` play no part; `solver_type`, `lower_order_final`, `euler_at_final`,
    /// `final_sigmas_type`, `sigma_min`/`sigma_max` and the prediction type come from `config`.
    pub fn dpmpp_2m_karras(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        config.check(num_inference_steps)?;
        let alphas_cumprod = alphas_cumprod(config, true)?;
        let train_sigmas = training_sigmas(&alphas_cumprod)?;
        let log_sigmas = log_sigmas(&train_sigmas);
        // _convert_to_karras reads the flipped (descending) training sigmas' ends.
        let sigma_min = config.sigma_min.unwrap_or(f64::from(train_sigmas[0]));
        let sigma_max = config
            .sigma_max
            .unwrap_or(f64::from(train_sigmas[train_sigmas.len() - 1]));
        let mut sigmas = karras_sigmas(sigma_min, sigma_max, num_inference_steps);
        let timesteps: Vec<f64> = sigmas
            .iter()
            .map(|&s| sigma_to_t(s, &log_sigmas).round_ties_even())
            .collect();
        sigmas.push(final_sigma(config, &alphas_cumprod)?);
        Ok(Self {
            prediction_type: config.prediction_type,
            solver_type: config.solver_type,
            lower_order_final: config.lower_order_final,
            euler_at_final: config.euler_at_final,
            final_sigma_is_zero: config.final_sigmas_type == FinalSigmasType::Zero,
            steps: Steps::new(timesteps, num_inference_steps),
            sigmas: sigmas.into_iter().map(|s| s as f32).collect(),
            model_outputs: [None, None],
            lower_order_nums: 0,
        })
    }

    /// The Karras sigmas plus the final one.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// Always 1: DPM-Solver works in the VP parametrisation.
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

    /// The identity (DPM-Solver needs no input scaling).
    pub fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        self.steps.check_index(step_index)?;
        Ok(sample.shallow_clone())
    }

    /// One multistep DPM-Solver++ step from `sigmas[i]` to `sigmas[i + 1]`. Computes in f32
    /// and returns the model output's dtype.
    pub fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
    ) -> Result<Tensor> {
        self.steps.advance(step_index)?;
        let len = self.steps.timesteps().len();
        let few_steps = self.lower_order_final && len < 15;
        let lower_order_final =
            step_index == len - 1 && (self.euler_at_final || few_steps || self.final_sigma_is_zero);

        let x0 = self.convert_model_output(model_output, step_index, sample);
        self.model_outputs[0] = self.model_outputs[1].take();
        self.model_outputs[1] = Some(x0.shallow_clone());

        let sample = sample.f_to_kind(tch::Kind::Float)?;
        let prev_sample = match (&self.model_outputs[0], self.lower_order_nums) {
            (Some(previous), nums) if nums >= 1 && !lower_order_final => {
                self.second_order_update(&x0, previous, step_index, &sample)
            }
            _ => self.first_order_update(&x0, step_index, &sample),
        };
        self.lower_order_nums = (self.lower_order_nums + 1).min(2);
        Ok(prev_sample.f_to_kind(model_output.kind())?)
    }

    /// The data prediction x0 (`convert_model_output` for `dpmsolver++`).
    fn convert_model_output(
        &self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
    ) -> Tensor {
        let (alpha_t, sigma_t) = alpha_sigma_t(&scalar(self.sigmas[step_index]));
        match self.prediction_type {
            PredictionType::Epsilon => (sample - sigma_t * model_output) / alpha_t,
            PredictionType::VPrediction => alpha_t * sample - sigma_t * model_output,
        }
    }

    /// The VP alpha and sigma of the sigma at `index`, and `lambda = log(alpha) - log(sigma)`.
    fn lambda(&self, index: usize) -> (Tensor, Tensor, Tensor) {
        let (alpha, sigma) = alpha_sigma_t(&scalar(self.sigmas[index]));
        let lambda = alpha.log() - sigma.log();
        (alpha, sigma, lambda)
    }

    /// `dpm_solver_first_order_update` (DDIM in x0 form).
    fn first_order_update(&self, x0: &Tensor, step_index: usize, sample: &Tensor) -> Tensor {
        let (alpha_t, sigma_t, lambda_t) = self.lambda(step_index + 1);
        let (_, sigma_s, lambda_s) = self.lambda(step_index);
        let h = lambda_t - lambda_s;
        (sigma_t / sigma_s) * sample - (alpha_t * ((-h).exp() - 1.0)) * x0
    }

    /// `multistep_dpm_solver_second_order_update`.
    fn second_order_update(
        &self,
        m0: &Tensor,
        m1: &Tensor,
        step_index: usize,
        sample: &Tensor,
    ) -> Tensor {
        let (alpha_t, sigma_t, lambda_t) = self.lambda(step_index + 1);
        let (_, sigma_s0, lambda_s0) = self.lambda(step_index);
        let (_, _, lambda_s1) = self.lambda(step_index - 1);
        let h = &lambda_t - &lambda_s0;
        let h_0 = lambda_s0 - lambda_s1;
        let r0 = h_0 / &h;
        // Python's `1.0 / r0` is `r0.reciprocal() * 1.0`.
        let d1 = (r0.reciprocal() * 1.0) * (m0 - m1);
        let exp_m1 = (-&h).exp() - 1.0;
        let base = (sigma_t / sigma_s0) * sample - (&alpha_t * &exp_m1) * m0;
        match self.solver_type {
            SolverType::Midpoint => base - ((alpha_t * exp_m1) * 0.5) * d1,
            SolverType::Heun => base + (alpha_t * (exp_m1 / &h + 1.0)) * d1,
        }
    }

    /// `alpha_t * original + sigma_t * noise` at `sigmas[step_index]` (VP form), in the
    /// original's dtype and device as diffusers computes it.
    pub fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        step_index: usize,
    ) -> Result<Tensor> {
        self.steps.check_index(step_index)?;
        let sigma = super::scalar_like(self.sigmas[step_index], original)?;
        let (alpha_t, sigma_t) = alpha_sigma_t(&sigma);
        Ok(alpha_t * original + sigma_t * noise)
    }
}
