//! Diffusion schedulers: the noise schedule and the update rule of the denoising loop.
//!
//! One file per scheduler, named after diffusers' `src/diffusers/schedulers/scheduling_*.py`
//! (diffusers 0.42): [`euler_discrete`], [`euler_ancestral_discrete`], [`dpmsolver_multistep`]
//! (configured as DPM++ 2M Karras) and [`ddim`]. On f32 CPU tensors they reproduce diffusers bit
//! for bit (tests/scheduler.rs): the training schedule (`alphas_cumprod`, training sigmas) is
//! computed with libtorch exactly as diffusers does, the NumPy parts of `set_timesteps`
//! (`linspace`, `arange`, `interp`, Karras sigmas, `_sigma_to_t`) in f64 as NumPy does, and each
//! step's scalar arithmetic on 0-dim libtorch tensors with the same operations, because
//! libtorch's `sqrt`/`log`/`exp` differ from libm's in the last bit. The one known difference:
//! Euler's fractional Karras timesteps can be one f32 ulp off, as NumPy takes the logs of the
//! training sigmas with its own SIMD `log`.
//!
//! # Driving a scheduler (what diffusers' SDXL pipelines do)
//!
//! ```text
//! let mut s = Scheduler::new(kind, &config, steps)?;
//! // txt2img: begin_index() == 0.  img2img: let begin = s.set_strength(strength)?;
//! //   latents = s.add_noise(&image_latents, &noise, begin)?   (noise drawn before any step noise)
//! // txt2img: latents = noise * s.init_noise_sigma()
//! for i in s.begin_index()..s.timesteps().len() {
//!     let t = s.timesteps()[i];                        // fed to the UNet
//!     let x = s.scale_model_input(&latents, i)?;       // (guidance: scale the doubled batch)
//!     let model_output = unet(&x, t, …);               // after classifier-free guidance
//!     let noise = s.needs_step_noise().then(|| step_noise_like(&model_output));
//!     latents = s.step(&model_output, i, &latents, noise.as_ref())?;
//! }
//! ```
//!
//! # Random numbers
//!
//! Only Euler ancestral draws noise in its step. diffusers draws it inside `step` with
//! `randn_tensor(model_output.shape, generator=generator, dtype=model_output.dtype)`; with a CPU
//! `torch.Generator` that is `torch.randn` on the CPU, then a move to the model's device. tch and
//! torch share libtorch's CPU generator, so a pipeline that calls `tch::manual_seed(seed)`, draws
//! its initial latents (or img2img noise) with `Tensor::randn` on the CPU, and then calls
//! [`step_noise_like`] once per step right before [`Scheduler::step`] reproduces the images of
//! `generator=torch.Generator("cpu").manual_seed(seed)`, provided nothing else draws from the
//! default generator in between (dropout is off in eval mode; other jobs must not run in parallel
//! in the same process). The order of draws in `StableDiffusionXLImg2ImgPipeline` is: the VAE's
//! `latent_dist.sample(generator)` (shape of the latents, the VAE's dtype), then `add_noise`'s
//! noise (the latents' dtype), then one draw per Euler-ancestral step. A list of per-image
//! generators (batch > 1) draws each image's noise separately and is not modelled here.

pub mod ddim;
pub mod dpmsolver_multistep;
pub mod euler_ancestral_discrete;
pub mod euler_discrete;

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};
use tch::{Device, Kind, Tensor};

use crate::{EngineError, Result};

pub use ddim::DdimScheduler;
pub use dpmsolver_multistep::DpmSolverMultistepScheduler;
pub use euler_ancestral_discrete::EulerAncestralDiscreteScheduler;
pub use euler_discrete::EulerDiscreteScheduler;

/// How the betas of the training noise schedule are spaced (`beta_schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// `linear`: betas evenly spaced from `beta_start` to `beta_end` (diffusers' default).
    #[default]
    Linear,
    /// `scaled_linear`: square roots evenly spaced, then squared (Stable Diffusion, SDXL).
    ScaledLinear,
}

/// What the model predicts (`prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// `epsilon`: the added noise (SDXL base).
    #[default]
    Epsilon,
    /// `v_prediction`: the velocity `alpha_t * noise - sigma_t * x0`.
    VPrediction,
}

/// How inference timesteps are picked from the training timesteps (`timestep_spacing`).
///
/// See table 2 of "Common Diffusion Noise Schedules and Sample Steps are Flawed"
/// (<https://arxiv.org/abs/2305.08891>).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    /// `linspace`: evenly from `num_train_timesteps - 1` down to 0.
    Linspace,
    /// `leading`: multiples of `num_train_timesteps / steps` from 0, plus `steps_offset` (SDXL).
    Leading,
    /// `trailing`: evenly from `num_train_timesteps` down, minus one.
    Trailing,
}

/// How Euler interpolates its sigmas between training timesteps (`interpolation_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InterpolationType {
    /// `linear`: `np.interp` of the training sigmas at the (fractional) timesteps.
    #[default]
    Linear,
    /// `log_linear`: `steps + 1` sigmas evenly spaced in log space between the extremes.
    LogLinear,
}

/// The sigma the last step goes to (`final_sigmas_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalSigmasType {
    /// `zero`: the last step lands on a noise-free sample.
    #[default]
    Zero,
    /// `sigma_min`: the last step lands on the smallest training sigma.
    SigmaMin,
}

/// What Euler feeds the UNet as the timestep (`timestep_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepType {
    /// `discrete`: the (interpolated) training timestep.
    #[default]
    Discrete,
    /// `continuous`: `0.25 * ln(sigma)`, used only together with `v_prediction`.
    Continuous,
}

/// Which second-order update DPM-Solver++ uses (`solver_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SolverType {
    /// `midpoint` (diffusers' default).
    #[default]
    Midpoint,
    /// `heun`.
    Heun,
}

/// A model folder's `scheduler/scheduler_config.json`, read the way diffusers 0.42's
/// `SchedulerMixin.from_pretrained` reads it into each scheduler class.
///
/// Unknown keys are ignored; a missing key takes diffusers' default. Keys whose default differs
/// between scheduler classes are `Option`s resolved by each scheduler (e.g. `timestep_spacing`:
/// `linspace` for Euler and DPM-Solver, `leading` for DDIM). Keys that a file lists in
/// `_use_default_values` are treated as missing, as diffusers does. `solver_order` and
/// `algorithm_type` are not read: [`SchedulerKind::DpmPlusPlus2MKarras`] fixes them (2,
/// `dpmsolver++`) and turns Karras sigmas on, as
/// `DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True)` does for SDXL.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    /// Number of diffusion steps the model was trained with.
    pub num_train_timesteps: usize,
    /// First beta of the training schedule.
    pub beta_start: f64,
    /// Last beta of the training schedule.
    pub beta_end: f64,
    /// How the betas are spaced.
    pub beta_schedule: BetaSchedule,
    /// Explicit betas, overriding `beta_start`/`beta_end`/`beta_schedule` when present.
    pub trained_betas: Option<Vec<f64>>,
    /// What the model predicts.
    pub prediction_type: PredictionType,
    /// Timestep spacing; `None` takes the scheduler class's default.
    pub timestep_spacing: Option<TimestepSpacing>,
    /// Added to `leading` timesteps (1 for SDXL).
    pub steps_offset: usize,
    /// Karras sigmas for Euler (always on for DPM++ 2M Karras).
    #[serde(deserialize_with = "null_as_false")]
    pub use_karras_sigmas: bool,
    /// Exponential sigmas (not supported: must be false).
    #[serde(deserialize_with = "null_as_false")]
    pub use_exponential_sigmas: bool,
    /// Beta sigmas (not supported: must be false).
    #[serde(deserialize_with = "null_as_false")]
    pub use_beta_sigmas: bool,
    /// Flow-matching sigmas of DPM-Solver (not supported: must be false).
    #[serde(deserialize_with = "null_as_false")]
    pub use_flow_sigmas: bool,
    /// Smallest sigma of a Karras schedule; `None`: the schedule's own smallest.
    pub sigma_min: Option<f64>,
    /// Largest sigma of a Karras schedule; `None`: the schedule's own largest.
    pub sigma_max: Option<f64>,
    /// Euler's sigma interpolation.
    pub interpolation_type: InterpolationType,
    /// Where the last step lands (Euler, DPM-Solver).
    pub final_sigmas_type: FinalSigmasType,
    /// Euler's timestep type.
    pub timestep_type: TimestepType,
    /// Rescale betas to zero terminal SNR (<https://arxiv.org/abs/2305.08891>).
    #[serde(deserialize_with = "null_as_false")]
    pub rescale_betas_zero_snr: bool,
    /// DDIM: clamp the predicted clean sample to `±clip_sample_range` (diffusers' default: true).
    #[serde(deserialize_with = "null_as_false")]
    pub clip_sample: bool,
    /// DDIM: the clamp range.
    pub clip_sample_range: f64,
    /// DDIM: the "previous" alpha product of the last step is 1 (else the first training one).
    #[serde(deserialize_with = "null_as_false")]
    pub set_alpha_to_one: bool,
    /// Dynamic thresholding (not supported: must be false).
    #[serde(deserialize_with = "null_as_false")]
    pub thresholding: bool,
    /// DPM-Solver's second-order update.
    pub solver_type: SolverType,
    /// DPM-Solver: first-order final steps when there are fewer than 15 steps.
    #[serde(deserialize_with = "null_as_false")]
    pub lower_order_final: bool,
    /// DPM-Solver: an Euler (first-order) last step regardless of the step count.
    #[serde(deserialize_with = "null_as_false")]
    pub euler_at_final: bool,
    /// DPM-Solver's learned variance (not supported: must be absent).
    pub variance_type: Option<String>,
}

impl Default for SchedulerConfig {
    /// diffusers' defaults (the `__init__` defaults of the scheduler classes).
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: None,
            steps_offset: 0,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_flow_sigmas: false,
            sigma_min: None,
            sigma_max: None,
            interpolation_type: InterpolationType::Linear,
            final_sigmas_type: FinalSigmasType::Zero,
            timestep_type: TimestepType::Discrete,
            rescale_betas_zero_snr: false,
            clip_sample: true,
            clip_sample_range: 1.0,
            set_alpha_to_one: true,
            thresholding: false,
            solver_type: SolverType::Midpoint,
            lower_order_final: true,
            euler_at_final: false,
            variance_type: None,
        }
    }
}

impl SchedulerConfig {
    /// SDXL 1.0 base's `scheduler/scheduler_config.json` (stabilityai/stable-diffusion-xl-base-1.0):
    /// `EulerDiscreteScheduler`, scaled-linear betas 0.00085…0.012 over 1000 steps, epsilon
    /// prediction, `leading` spacing with `steps_offset` 1, `clip_sample` and `set_alpha_to_one`
    /// false, linear interpolation, no Karras sigmas.
    pub fn sdxl_base() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: Some(TimestepSpacing::Leading),
            steps_offset: 1,
            use_karras_sigmas: false,
            interpolation_type: InterpolationType::Linear,
            clip_sample: false,
            set_alpha_to_one: false,
            ..Self::default()
        }
    }

    /// Parses a `scheduler_config.json` text.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let mut value: serde_json::Value = serde_json::from_str(text).map_err(invalid_json)?;
        if let Some(object) = value.as_object_mut() {
            // diffusers drops the keys a saved config marks as defaults, so the loading class's
            // own defaults apply (configuration_utils.extract_init_dict).
            let defaults: Vec<String> = object
                .get("_use_default_values")
                .and_then(|v| v.as_array())
                .map(|keys| {
                    keys.iter()
                        .filter_map(|k| k.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            for key in defaults {
                object.remove(&key);
            }
        }
        serde_json::from_value(value).map_err(invalid_json)
    }

    /// Reads a `scheduler_config.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| EngineError::InvalidConfig {
            component: "scheduler",
            message: format!("read {}: {e}", path.display()),
        })?;
        Self::from_json_str(&text)
    }

    /// Reads `scheduler/scheduler_config.json` of a diffusers model folder.
    pub fn from_model_dir(model_dir: &Path) -> Result<Self> {
        Self::from_file(&model_dir.join("scheduler").join("scheduler_config.json"))
    }

    /// Rejects settings the schedulers do not implement, and impossible step counts.
    fn check(&self, num_inference_steps: usize) -> Result<()> {
        let unsupported = [
            (self.use_exponential_sigmas, "use_exponential_sigmas"),
            (self.use_beta_sigmas, "use_beta_sigmas"),
            (self.use_flow_sigmas, "use_flow_sigmas"),
            (self.thresholding, "thresholding"),
        ];
        if let Some((_, name)) = unsupported.iter().find(|(on, _)| *on) {
            return Err(invalid_config(format!("{name} = true is not supported")));
        }
        if let Some(variance) = &self.variance_type {
            return Err(invalid_config(format!(
                "variance_type {variance:?} is not supported"
            )));
        }
        if self.num_train_timesteps < 2 {
            return Err(invalid_config(format!(
                "num_train_timesteps must be at least 2, got {}",
                self.num_train_timesteps
            )));
        }
        if let Some(betas) = &self.trained_betas
            && betas.len() != self.num_train_timesteps
        {
            return Err(invalid_config(format!(
                "trained_betas has {} values for {} training timesteps",
                betas.len(),
                self.num_train_timesteps
            )));
        }
        if num_inference_steps == 0 || num_inference_steps > self.num_train_timesteps {
            return Err(EngineError::InvalidSchedule(format!(
                "num_inference_steps must be in 1..={}, got {num_inference_steps}",
                self.num_train_timesteps
            )));
        }
        Ok(())
    }
}

/// A JSON `null` is Python's `None`, which diffusers' `if flag:` reads as false (a missing key
/// still takes the default).
fn null_as_false<'de, D: Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(deserializer)?.unwrap_or(false))
}

fn invalid_json(error: serde_json::Error) -> EngineError {
    invalid_config(error.to_string())
}

fn invalid_config(message: String) -> EngineError {
    EngineError::InvalidConfig {
        component: "scheduler",
        message,
    }
}

/// The schedulers the engine offers, by the names jobs use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SchedulerKind {
    /// `euler`: [`EulerDiscreteScheduler`], SDXL's default.
    #[serde(rename = "euler")]
    Euler,
    /// `euler-a`: [`EulerAncestralDiscreteScheduler`] (draws noise every step).
    #[serde(rename = "euler-a")]
    EulerAncestral,
    /// `dpmpp-2m-karras`: [`DpmSolverMultistepScheduler`] as DPM++ 2M with Karras sigmas.
    #[serde(rename = "dpmpp-2m-karras")]
    DpmPlusPlus2MKarras,
    /// `ddim`: [`DdimScheduler`] with eta = 0.
    #[serde(rename = "ddim")]
    Ddim,
}

impl SchedulerKind {
    /// Every kind, in the order of its name list.
    pub const ALL: [SchedulerKind; 4] = [
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::DpmPlusPlus2MKarras,
        SchedulerKind::Ddim,
    ];

    /// The name jobs use.
    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerAncestral => "euler-a",
            SchedulerKind::DpmPlusPlus2MKarras => "dpmpp-2m-karras",
            SchedulerKind::Ddim => "ddim",
        }
    }
}

impl FromStr for SchedulerKind {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Self> {
        let name = s.trim().to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|kind| kind.name() == name)
            .ok_or_else(|| EngineError::UnknownScheduler(s.to_owned()))
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One scheduler of any kind, holding the state of one denoising run.
///
/// Build a new one for every run (construction resets all state: step position, begin index,
/// DPM-Solver's model-output history). Steps are addressed by their index in [`timesteps`]
/// and must be taken in order, starting at [`begin_index`].
///
/// [`timesteps`]: Scheduler::timesteps
/// [`begin_index`]: Scheduler::begin_index
#[derive(Debug)]
pub enum Scheduler {
    /// Euler.
    Euler(EulerDiscreteScheduler),
    /// Euler ancestral.
    EulerAncestral(EulerAncestralDiscreteScheduler),
    /// DPM++ 2M Karras.
    DpmPlusPlus2MKarras(DpmSolverMultistepScheduler),
    /// DDIM.
    Ddim(DdimScheduler),
}

macro_rules! each {
    ($self:expr, $s:ident => $body:expr) => {
        match $self {
            Scheduler::Euler($s) => $body,
            Scheduler::EulerAncestral($s) => $body,
            Scheduler::DpmPlusPlus2MKarras($s) => $body,
            Scheduler::Ddim($s) => $body,
        }
    };
}

impl Scheduler {
    /// A scheduler of `kind` for a model with this config, set to `num_inference_steps` steps
    /// (diffusers' `Cls.from_config(config)` then `set_timesteps(num_inference_steps)`).
    pub fn new(
        kind: SchedulerKind,
        config: &SchedulerConfig,
        num_inference_steps: usize,
    ) -> Result<Self> {
        Ok(match kind {
            SchedulerKind::Euler => {
                Scheduler::Euler(EulerDiscreteScheduler::new(config, num_inference_steps)?)
            }
            SchedulerKind::EulerAncestral => Scheduler::EulerAncestral(
                EulerAncestralDiscreteScheduler::new(config, num_inference_steps)?,
            ),
            SchedulerKind::DpmPlusPlus2MKarras => Scheduler::DpmPlusPlus2MKarras(
                DpmSolverMultistepScheduler::dpmpp_2m_karras(config, num_inference_steps)?,
            ),
            SchedulerKind::Ddim => {
                Scheduler::Ddim(DdimScheduler::new(config, num_inference_steps)?)
            }
        })
    }

    /// Which kind this is.
    pub fn kind(&self) -> SchedulerKind {
        match self {
            Scheduler::Euler(_) => SchedulerKind::Euler,
            Scheduler::EulerAncestral(_) => SchedulerKind::EulerAncestral,
            Scheduler::DpmPlusPlus2MKarras(_) => SchedulerKind::DpmPlusPlus2MKarras,
            Scheduler::Ddim(_) => SchedulerKind::Ddim,
        }
    }

    /// The whole schedule: the timestep fed to the UNet at each step (diffusers'
    /// `scheduler.timesteps`; Euler's may be fractional, the others' are integers).
    pub fn timesteps(&self) -> &[f64] {
        each!(self, s => s.steps().timesteps())
    }

    /// The timesteps a run visits: `timesteps()[begin_index()..]` (img2img's `get_timesteps`).
    pub fn denoising_timesteps(&self) -> &[f64] {
        &self.timesteps()[self.begin_index()..]
    }

    /// The noise levels, one more than the timesteps (the last is where the run ends); `None`
    /// for DDIM, which works on `alphas_cumprod` instead.
    pub fn sigmas(&self) -> Option<&[f32]> {
        match self {
            Scheduler::Euler(s) => Some(s.sigmas()),
            Scheduler::EulerAncestral(s) => Some(s.sigmas()),
            Scheduler::DpmPlusPlus2MKarras(s) => Some(s.sigmas()),
            Scheduler::Ddim(_) => None,
        }
    }

    /// The number of inference steps asked for.
    pub fn num_inference_steps(&self) -> usize {
        each!(self, s => s.steps().num_inference_steps())
    }

    /// The factor txt2img's initial unit-variance noise is multiplied by.
    pub fn init_noise_sigma(&self) -> f64 {
        each!(self, s => s.init_noise_sigma())
    }

    /// Model evaluations per step (diffusers' `scheduler.order`; 1 for all four).
    pub fn order(&self) -> usize {
        1
    }

    /// Whether [`step`](Scheduler::step) needs a noise tensor (Euler ancestral only).
    pub fn needs_step_noise(&self) -> bool {
        matches!(self, Scheduler::EulerAncestral(_))
    }

    /// The index of the first step of the run (0 unless set for img2img).
    pub fn begin_index(&self) -> usize {
        each!(self, s => s.steps().begin_index())
    }

    /// The index the next [`step`](Scheduler::step) must have.
    pub fn step_index(&self) -> usize {
        each!(self, s => s.steps().step_index())
    }

    /// Starts the run at `begin_index` (diffusers' `set_begin_index`); only before the first step.
    pub fn set_begin_index(&mut self, begin_index: usize) -> Result<()> {
        each!(self, s => s.steps_mut().set_begin_index(begin_index))
    }

    /// img2img: skips the first steps as `StableDiffusionXLImg2ImgPipeline.get_timesteps`
    /// does for `strength` (without `denoising_start`) and returns the begin index.
    ///
    /// `init_timestep = min(int(steps * strength), steps)`, `t_start = max(steps -
    /// init_timestep, 0)`, begin index `t_start * order`; the run visits
    /// `timesteps()[begin..]`, and [`add_noise`](Scheduler::add_noise) with that index noises
    /// the image latents to the first visited step's level. `steps` is the number asked for
    /// (diffusers' `retrieve_timesteps` passes it through), not `timesteps().len()`.
    pub fn set_strength(&mut self, strength: f64) -> Result<usize> {
        if !(0.0..=1.0).contains(&strength) {
            return Err(EngineError::InvalidSchedule(format!(
                "strength must be in [0, 1], got {strength}"
            )));
        }
        let steps = self.num_inference_steps();
        // Python's int() truncates toward zero.
        let init_timestep = ((steps as f64 * strength).trunc() as usize).min(steps);
        let t_start = steps - init_timestep;
        let begin = t_start * self.order();
        if begin >= self.timesteps().len() {
            return Err(EngineError::InvalidSchedule(format!(
                "strength {strength} with {steps} steps leaves no step to run"
            )));
        }
        self.set_begin_index(begin)?;
        Ok(begin)
    }

    /// Scales the denoising model's input for step `step_index` (identity except for Euler's).
    pub fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        each!(self, s => s.scale_model_input(sample, step_index))
    }

    /// One denoising step: from `sample` at step `step_index`, given the model's output there,
    /// returns the sample at the next step. `noise` (same shape as `model_output`) is required
    /// when [`needs_step_noise`](Scheduler::needs_step_noise) and ignored otherwise.
    pub fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        match self {
            Scheduler::Euler(s) => s.step(model_output, step_index, sample),
            Scheduler::EulerAncestral(s) => {
                let noise = noise.ok_or_else(|| {
                    EngineError::InvalidSchedule(
                        "euler-a needs a noise tensor for every step".to_owned(),
                    )
                })?;
                s.step(model_output, step_index, sample, noise)
            }
            Scheduler::DpmPlusPlus2MKarras(s) => s.step(model_output, step_index, sample),
            Scheduler::Ddim(s) => s.step(model_output, step_index, sample),
        }
    }

    /// Noises clean `original` latents to the level of step `step_index` with `noise` (img2img;
    /// diffusers' `add_noise(original, noise, timesteps[step_index])`, which for the sigma
    /// schedulers reads the sigma at the begin index).
    pub fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        step_index: usize,
    ) -> Result<Tensor> {
        each!(self, s => s.add_noise(original, noise, step_index))
    }
}

/// Draws one step's noise as diffusers' `randn_tensor(model_output.shape, generator=<CPU
/// generator>, dtype=model_output.dtype)` does: on the CPU from libtorch's default generator,
/// in the model output's dtype, then moved to its device. See the module docs for seeding.
pub fn step_noise_like(model_output: &Tensor) -> Tensor {
    Tensor::randn(model_output.size(), (model_output.kind(), Device::Cpu))
        .to_device(model_output.device())
}

/// A scheduler's timesteps and where a run is in them: the begin index and the next step,
/// checked on every call.
#[derive(Debug, Clone)]
pub struct Steps {
    timesteps: Vec<f64>,
    num_inference_steps: usize,
    begin: usize,
    next: usize,
}

impl Steps {
    pub(crate) fn new(timesteps: Vec<f64>, num_inference_steps: usize) -> Self {
        Self {
            timesteps,
            num_inference_steps,
            begin: 0,
            next: 0,
        }
    }

    /// The timesteps fed to the UNet, one per step.
    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// The number of inference steps asked for.
    pub fn num_inference_steps(&self) -> usize {
        self.num_inference_steps
    }

    /// The index of the run's first step.
    pub fn begin_index(&self) -> usize {
        self.begin
    }

    /// The index the next step must have.
    pub fn step_index(&self) -> usize {
        self.next
    }

    pub(crate) fn set_begin_index(&mut self, begin: usize) -> Result<()> {
        if self.next != self.begin {
            return Err(EngineError::InvalidSchedule(
                "set_begin_index after the run started".to_owned(),
            ));
        }
        if begin >= self.timesteps.len() {
            return Err(EngineError::InvalidSchedule(format!(
                "begin index {begin} is past the {} steps",
                self.timesteps.len()
            )));
        }
        self.begin = begin;
        self.next = begin;
        Ok(())
    }

    /// Checks that `index` addresses a step of the schedule.
    pub(crate) fn check_index(&self, index: usize) -> Result<()> {
        if index >= self.timesteps.len() {
            return Err(EngineError::InvalidSchedule(format!(
                "step index {index} is past the {} steps",
                self.timesteps.len()
            )));
        }
        Ok(())
    }

    /// Checks that `index` is the next step, then moves past it.
    pub(crate) fn advance(&mut self, index: usize) -> Result<()> {
        self.check_index(index)?;
        if index != self.next {
            return Err(EngineError::InvalidSchedule(format!(
                "step {index} taken out of order (expected step {})",
                self.next
            )));
        }
        self.next += 1;
        Ok(())
    }
}

/// The training schedule's cumulative alpha products as a 1-D f32 CPU tensor, computed with
/// libtorch exactly as diffusers' scheduler `__init__` computes them (linspace, pow, cumprod).
/// `zero_snr_terminal`: with `rescale_betas_zero_snr`, set the last to 2⁻²⁴ (Euler and
/// DPM-Solver do, DDIM does not).
pub(crate) fn alphas_cumprod(config: &SchedulerConfig, zero_snr_terminal: bool) -> Result<Tensor> {
    let n = config.num_train_timesteps as i64;
    let options = (Kind::Float, Device::Cpu);
    let betas = match &config.trained_betas {
        Some(betas) => {
            let betas: Vec<f32> = betas.iter().map(|&b| b as f32).collect();
            Tensor::from_slice(&betas)
        }
        None => match config.beta_schedule {
            BetaSchedule::Linear => {
                Tensor::f_linspace(config.beta_start, config.beta_end, n, options)?
            }
            BetaSchedule::ScaledLinear => {
                Tensor::f_linspace(config.beta_start.sqrt(), config.beta_end.sqrt(), n, options)?
                    .f_pow_tensor_scalar(2)?
            }
        },
    };
    let betas = if config.rescale_betas_zero_snr {
        rescale_zero_terminal_snr(&betas)?
    } else {
        betas
    };
    let alphas = betas.f_neg()?.f_add_scalar(1.0)?;
    let cumprod = alphas.f_cumprod(0, Kind::Float)?;
    if config.rescale_betas_zero_snr && zero_snr_terminal {
        let mut values = Vec::<f32>::try_from(&cumprod)?;
        if let Some(last) = values.last_mut() {
            *last = 2f32.powi(-24);
        }
        return Ok(Tensor::from_slice(&values));
    }
    Ok(cumprod)
}

/// diffusers' `rescale_zero_terminal_snr` (Algorithm 1 of <https://arxiv.org/abs/2305.08891>).
fn rescale_zero_terminal_snr(betas: &Tensor) -> Result<Tensor> {
    let alphas = betas.f_neg()?.f_add_scalar(1.0)?;
    let alphas_cumprod = alphas.f_cumprod(0, Kind::Float)?;
    let sqrt = alphas_cumprod.f_sqrt()?;
    let first = sqrt.f_get(0)?;
    let last = sqrt.f_get(-1)?;
    let shifted = sqrt.f_sub(&last)?;
    let scale = first.f_div(&first.f_sub(&last)?)?;
    let rescaled = shifted.f_mul(&scale)?;
    let alphas_bar = rescaled.f_pow_tensor_scalar(2)?;
    let n = alphas_bar.size()[0];
    let ratios = alphas_bar
        .f_narrow(0, 1, n - 1)?
        .f_div(&alphas_bar.f_narrow(0, 0, n - 1)?)?;
    let alphas = Tensor::f_cat(&[alphas_bar.f_narrow(0, 0, 1)?, ratios], 0)?;
    Ok(alphas.f_neg()?.f_add_scalar(1.0)?)
}

/// `((1 - ᾱ) / ᾱ) ** 0.5` computed by libtorch, elementwise or on a 0-dim tensor: the training
/// sigmas, ascending with the timestep.
fn sigma_of(alphas_cumprod: &Tensor) -> Result<Tensor> {
    Ok(alphas_cumprod
        .f_neg()?
        .f_add_scalar(1.0)?
        .f_div(alphas_cumprod)?
        .f_pow_tensor_scalar(0.5)?)
}

/// The training sigmas as f32 values (diffusers' `np.array(((1 - ac) / ac) ** 0.5)`).
pub(crate) fn training_sigmas(alphas_cumprod: &Tensor) -> Result<Vec<f32>> {
    Ok(Vec::<f32>::try_from(sigma_of(alphas_cumprod)?)?)
}

/// `np.linspace(start, stop, num)`: `i * ((stop - start) / (num - 1)) + start`, the last value
/// exactly `stop`.
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut values: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    if let Some(last) = values.last_mut() {
        *last = stop;
    }
    values
}

/// `np.arange(start, 0, -step)` for float steps: length `ceil(-start / -step)`, values
/// `start + i * delta` with `delta = (start - step) - start`, as NumPy fills them.
pub(crate) fn np_arange_down_to_zero(start: f64, step: f64) -> Vec<f64> {
    let len = ((0.0 - start) / -step).ceil().max(0.0) as usize;
    let delta = (start + -step) - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => start + -step,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `np.interp(x, np.arange(len(fp)), fp)`.
pub(crate) fn np_interp_unit_grid(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x.is_nan() {
        return x;
    }
    if x <= 0.0 {
        return f64::from(fp[0]);
    }
    if x >= last as f64 {
        return f64::from(fp[last]);
    }
    let j = x.floor() as usize;
    if j as f64 == x {
        return f64::from(fp[j]);
    }
    let (lo, hi) = (f64::from(fp[j]), f64::from(fp[j + 1]));
    let slope = (hi - lo) / 1.0;
    slope * (x - j as f64) + lo
}

/// Karras et al. (2022) sigmas, eq. 5 of <https://arxiv.org/abs/2206.00364> with rho = 7, as
/// diffusers' `_convert_to_karras` computes them in f64.
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, num: usize) -> Vec<f64> {
    let rho = 7.0_f64;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, num)
        .into_iter()
        .map(|ramp| (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

/// diffusers' `_sigma_to_t`: the fractional training timestep of `sigma`, interpolating
/// linearly in log-sigma between the two neighbouring training sigmas. `log_sigmas` are the
/// f32 logs of the ascending training sigmas.
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // The last index whose log-sigma is <= log_sigma (argmax of the cumulative count), or 0.
    let low = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - f64::from(l) >= 0.0)
        .unwrap_or(0)
        .min(log_sigmas.len() - 2);
    let (lo, hi) = (log_sigmas[low], log_sigmas[low + 1]);
    let w = ((f64::from(lo) - log_sigma) / f64::from(lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// f32 logs of the training sigmas (`np.log` of the f32 array). NumPy's SIMD float32 `log`
/// is not correctly rounded and neither is libtorch's; this one (f64 log, rounded) differs from
/// NumPy's in the last bit for some sigmas, which can move a fractional Karras timestep by one
/// f32 ulp (DPM-Solver rounds its timesteps to integers, so it is unaffected in practice).
pub(crate) fn log_sigmas(sigmas: &[f32]) -> Vec<f32> {
    sigmas.iter().map(|&s| f64::from(s).ln() as f32).collect()
}

/// The sigma diffusers appends after the schedule: 0, or for `final_sigmas_type = "sigma_min"`
/// the smallest training sigma `((1 - ᾱ₀) / ᾱ₀) ** 0.5`.
pub(crate) fn final_sigma(config: &SchedulerConfig, alphas_cumprod: &Tensor) -> Result<f64> {
    Ok(match config.final_sigmas_type {
        FinalSigmasType::Zero => 0.0,
        FinalSigmasType::SigmaMin => sigma_of(&alphas_cumprod.f_get(0)?)?.f_double_value(&[])?,
    })
}

/// Inference timesteps of the Euler schedulers before any sigma conversion, as f32 (their
/// `set_timesteps` builds them with NumPy in float32).
pub(crate) fn euler_timesteps(
    spacing: TimestepSpacing,
    config: &SchedulerConfig,
    num_inference_steps: usize,
) -> Vec<f32> {
    let train = config.num_train_timesteps;
    match spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (train - 1) as f64, num_inference_steps)
            .into_iter()
            .rev()
            .map(|t| t as f32)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = train / num_inference_steps;
            (0..num_inference_steps)
                .rev()
                .map(|i| (i * ratio) as f32 + config.steps_offset as f32)
                .collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = train as f64 / num_inference_steps as f64;
            np_arange_down_to_zero(train as f64, ratio)
                .into_iter()
                .map(|t| t.round_ties_even() as f32 - 1.0)
                .collect()
        }
    }
}

// Scalar arithmetic of the steps runs on float32 0-dim CPU tensors, as in diffusers (where
// `self.sigmas[i]` is one): libtorch's sqrt, log, exp and reciprocal are not libm's and differ
// in the last bit, and a 0-dim tensor takes part in type promotion as a scalar does (an f16
// model output times an f32 sigma stays f16). Helpers below mirror diffusers' expressions.

/// `value` as a float32 0-dim CPU tensor.
pub(crate) fn scalar(value: f32) -> Tensor {
    Tensor::from(value)
}

/// `x ** 2` as torch computes it.
pub(crate) fn squared(x: &Tensor) -> Tensor {
    x.pow_tensor_scalar(2)
}

/// `x ** 0.5` as torch computes it.
pub(crate) fn sqrt(x: &Tensor) -> Tensor {
    x.pow_tensor_scalar(0.5)
}

/// diffusers' `_sigma_to_alpha_sigma_t`: `alpha_t = 1 / ((sigma ** 2 + 1) ** 0.5)` (Python's
/// `1 / tensor` is `tensor.reciprocal() * 1`), `sigma_t = sigma * alpha_t`.
pub(crate) fn alpha_sigma_t(sigma: &Tensor) -> (Tensor, Tensor) {
    let alpha = sqrt(&(squared(sigma) + 1.0)).reciprocal();
    let sigma_t = sigma * &alpha;
    (alpha, sigma_t)
}

/// `sigma` as a 0-dim tensor in `like`'s dtype and device (diffusers' `sigmas.to(dtype)` in
/// `add_noise`).
pub(crate) fn scalar_like(value: f32, like: &Tensor) -> Result<Tensor> {
    Ok(scalar(value)
        .f_to_kind(like.kind())?
        .f_to_device(like.device())?)
}

/// `max sigma` (linspace, trailing) or `(max sigma ** 2 + 1) ** 0.5` (leading): the Euler
/// schedulers' `init_noise_sigma`.
pub(crate) fn euler_init_noise_sigma(sigmas: &[f32], spacing: TimestepSpacing) -> Result<f64> {
    let max = Tensor::from_slice(sigmas).f_max()?;
    let init = match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
        TimestepSpacing::Leading => sqrt(&(squared(&max) + 1.0)),
    };
    Ok(init.f_double_value(&[])?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_and_print() {
        for kind in SchedulerKind::ALL {
            assert_eq!(kind.name().parse::<SchedulerKind>().unwrap(), kind);
            assert_eq!(kind.to_string(), kind.name());
        }
        assert_eq!(
            " Euler-A ".parse::<SchedulerKind>().unwrap(),
            SchedulerKind::EulerAncestral
        );
        for bad in ["", "dpm", "euler_a", "lms"] {
            assert!(
                matches!(
                    bad.parse::<SchedulerKind>(),
                    Err(EngineError::UnknownScheduler(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn numpy_helpers_follow_numpy() {
        assert_eq!(np_linspace(0.0, 1.0, 1), vec![0.0]);
        assert_eq!(np_linspace(0.0, 10.0, 3), vec![0.0, 5.0, 10.0]);
        assert_eq!(
            np_arange_down_to_zero(1000.0, 250.0),
            vec![1000.0, 750.0, 500.0, 250.0]
        );
        // 1000 / 61 rounds so that NumPy's arange yields 62 values.
        assert_eq!(np_arange_down_to_zero(1000.0, 1000.0 / 61.0).len(), 62);
        let fp = [1.0f32, 3.0, 7.0];
        assert_eq!(np_interp_unit_grid(0.5, &fp), 2.0);
        assert_eq!(np_interp_unit_grid(1.25, &fp), 4.0);
        assert_eq!(np_interp_unit_grid(2.0, &fp), 7.0);
        assert_eq!(np_interp_unit_grid(-1.0, &fp), 1.0);
    }
}
