//! SDXL txt2img and img2img, step for step as diffusers 0.42's `StableDiffusionXLPipeline` and
//! `StableDiffusionXLImg2ImgPipeline` run them, so the same seed gives the same image; with
//! ControlNets ([`GenerateRequest::controls`]) as `StableDiffusionXLControlNetPipeline` and
//! `StableDiffusionXLControlNetImg2ImgPipeline` do.
//!
//! ControlNets are loaded once next to the base model ([`SdxlPipeline::load_controlnet`]) and
//! named in requests by their [`ControlNetId`]. Each runs only on the steps inside its guidance
//! window: diffusers runs it on every step and multiplies its residuals by 0 outside the window,
//! which adds exactly nothing, so skipping it gives the same result and saves its cost.
//!
//! Random draws come from libtorch's default CPU generator (the one `torch.Generator("cpu")`
//! wraps), in diffusers' order: txt2img draws the initial latents, then Euler ancestral draws one
//! noise tensor per step; img2img draws the VAE's latent sample, then the noise the image latents
//! are noised with, then the per-step noise. That generator is process-wide, so generations
//! take a process-wide lock: one at a time per process (a GPU serves one job at a time anyway).

use std::collections::BTreeMap;
use std::fmt;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use image::RgbImage;
use serde::Deserialize;
use tch::{Device, Kind, Tensor, nn};

use crate::clip::{ClipTextConfig, ClipTextModel, ClipTextModelWithProjection};
use crate::controlnet::{ControlNet, ControlNetOutput, control_image_to_tensor};
use crate::device::DType;
use crate::loader::{Component, Layout, ModelSource, SourceOptions};
use crate::lora::{LoraFuser, LoraSwitch, LoraTarget, LoraWeights};
use crate::prompt_cache::{self, PromptCache, PromptKey};
use crate::scheduler::{Scheduler, SchedulerConfig, SchedulerKind, step_noise_like};
#[cfg(feature = "cuda")]
use crate::step_graph::StepGraphs;
use crate::text_encoder::{PromptRequest, SdxlTextEncoders, TextConditioning};
use crate::tokenizer::ClipTokenizer;
use crate::unet::{AddedConditioning, Timestep, UNet2DConditionModel, UNetConfig};
use crate::vae::{AutoencoderKL, LatentSample, VaeConfig, image_to_tensor, tensor_to_image};
use crate::{EngineError, Result};

/// What to render.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// The prompt.
    pub prompt: String,
    /// What the image should not show; `None` gives zero embeddings (SDXL's
    /// `force_zeros_for_empty_prompt`), `Some("")` encodes the empty text.
    pub negative_prompt: Option<String>,
    /// Output width in pixels (a multiple of 8; ignored with an init image, whose size is used).
    pub width: u32,
    /// Output height in pixels.
    pub height: u32,
    /// Denoising steps asked for (img2img runs `int(steps × strength)` of them).
    pub steps: usize,
    /// Classifier-free guidance scale; ≤ 1 turns guidance off.
    pub guidance: f64,
    /// Seed of libtorch's CPU generator.
    pub seed: i64,
    /// The sampler.
    pub scheduler: SchedulerKind,
    /// img2img: the starting image and how much of it to repaint.
    pub init: Option<InitImage>,
    /// ControlNets to steer the UNet with; their residuals are summed (diffusers'
    /// `MultiControlNetModel`). Empty: the plain pipelines.
    pub controls: Vec<ControlInput>,
}

impl Default for GenerateRequest {
    fn default() -> Self {
        GenerateRequest {
            prompt: String::new(),
            negative_prompt: None,
            width: 1024,
            height: 1024,
            steps: 30,
            guidance: 5.0,
            seed: 0,
            scheduler: SchedulerKind::Euler,
            init: None,
            controls: Vec::new(),
        }
    }
}

/// img2img's starting point.
#[derive(Debug, Clone)]
pub struct InitImage {
    /// The image; its sides must be multiples of 8.
    pub image: RgbImage,
    /// 0 keeps the image, 1 repaints it entirely (diffusers' `strength`).
    pub strength: f64,
}

/// A ControlNet loaded into an [`SdxlPipeline`] ([`SdxlPipeline::load_controlnet`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ControlNetId(u64);

impl fmt::Display for ControlNetId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "controlnet#{}", self.0)
    }
}

/// One ControlNet of a generation: diffusers' `image`/`control_image`,
/// `controlnet_conditioning_scale` and `control_guidance_start`/`end` for that net.
#[derive(Debug, Clone)]
pub struct ControlInput {
    /// Which loaded ControlNet.
    pub controlnet: ControlNetId,
    /// The control image (edges, depth, pose…), at the output size: the init image's for
    /// img2img, `width × height` for txt2img. Resizing is the caller's (diffusers resizes with
    /// PIL's Lanczos filter, which this engine does not reproduce).
    pub image: RgbImage,
    /// Multiplies the ControlNet's residuals (diffusers' default 1.0).
    pub conditioning_scale: f64,
    /// Fraction of the steps run before the ControlNet starts acting, in `[0, 1)`.
    pub guidance_start: f64,
    /// Fraction of the steps after which it stops acting, in `(start, 1]`.
    pub guidance_end: f64,
}

impl ControlInput {
    /// `image` through `controlnet` at scale 1 over every step (diffusers' defaults).
    pub fn new(controlnet: ControlNetId, image: RgbImage) -> Self {
        ControlInput {
            controlnet,
            image,
            conditioning_scale: 1.0,
            guidance_start: 0.0,
            guidance_end: 1.0,
        }
    }

    /// [`controlnet_keep`] for this input's window.
    pub fn keep(&self, step: usize, steps: usize) -> f64 {
        controlnet_keep(step, steps, self.guidance_start, self.guidance_end)
    }
}

/// diffusers' `controlnet_keep[i]`: 1 while step `step` (from 0) of the `steps` a run takes lies
/// inside the window `[start, end]`, 0 outside:
/// `1.0 - float(i / len(timesteps) < s or (i + 1) / len(timesteps) > e)`. For img2img `steps`
/// counts the steps actually run (after `strength`).
pub fn controlnet_keep(step: usize, steps: usize, start: f64, end: f64) -> f64 {
    let n = steps as f64;
    let outside = (step as f64) / n < start || (step as f64 + 1.0) / n > end;
    if outside { 0.0 } else { 1.0 }
}

/// A control input checked against its ControlNet and made a tensor.
struct PreparedControl<'a> {
    net: &'a ControlNet,
    /// `[batch, 3, H, W]` in `[0, 1]`, duplicated for CFG.
    image: Tensor,
    input: &'a ControlInput,
}

/// The tensors one denoising step reads.
pub(crate) struct StepInputs<'a> {
    /// The scaled model input, `[batch, 4, h, w]`.
    pub(crate) sample: &'a Tensor,
    /// The timestep, on the device for graphs (`[]` or `[1]`).
    pub(crate) timestep: Timestep<'a>,
    /// Text hidden states, `[batch, 77, 2048]`.
    pub(crate) hidden: &'a Tensor,
    /// Pooled text embeddings, `[batch, 1280]`.
    pub(crate) pooled: &'a Tensor,
    /// Size and crop conditioning, `[batch, 6]`.
    pub(crate) time_ids: &'a Tensor,
}

/// A ControlNet inside its guidance window at this step.
pub(crate) struct ActiveControl<'a> {
    /// Its id in the pipeline (keys the step's CUDA graph).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) id: ControlNetId,
    /// The model.
    pub(crate) net: &'a ControlNet,
    /// Its conditioning image, `[batch, 3, H, W]`.
    pub(crate) image: &'a Tensor,
    /// Conditioning scale × the window's keep factor.
    pub(crate) scale: f64,
}

/// Held while a generation seeds and draws from libtorch's process-wide CPU generator, and while
/// a model is built (layer construction draws from it too).
static GENERATOR: Mutex<()> = Mutex::new(());

/// A rendered image and how it was made.
#[derive(Debug)]
pub struct Generated {
    /// The picture.
    pub image: RgbImage,
    /// Final latents before the VAE decode, `[1, 4, h/8, w/8]`, f32 on the CPU.
    pub latents: Tensor,
    /// Where the time went.
    pub timings: Timings,
}

/// Wall-clock time per stage of one generation.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    /// Prompt encoding.
    pub text: Duration,
    /// VAE encode of the init image and noising (img2img).
    pub prepare: Duration,
    /// The denoising loop.
    pub denoise: Duration,
    /// VAE decode and conversion to pixels.
    pub decode: Duration,
    /// Denoising steps run.
    pub steps: usize,
    /// The prompt's text conditioning was remembered from an earlier generation
    /// ([`SdxlPipeline::set_prompt_cache`]): no text encoder ran.
    pub prompt_remembered: bool,
}

/// SDXL base loaded once: text encoders, UNet and VAE resident on one device.
pub struct SdxlPipeline {
    text: SdxlTextEncoders,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    /// The weights of each component, shared with the modules: editing a variable in place
    /// (LoRA fusing) changes the module.
    stores: Vec<(Component, nn::VarStore)>,
    controlnets: BTreeMap<ControlNetId, ControlNet>,
    next_controlnet: u64,
    /// Pristine copies of LoRA-adapted weights and the current LoRA set.
    loras: LoraFuser,
    /// The text conditioning of recent prompts (cleared when LoRAs change the text encoders).
    prompts: Mutex<PromptCache>,
    /// The LoRAs fused into the text encoders, as (id, weight bits) in the order given; `None`
    /// after a failed switch.
    text_loras: Option<Vec<(u64, u64)>>,
    scheduler_config: SchedulerConfig,
    device: Device,
    kind: Kind,
    /// The UNet's, the VAE's and the ControlNets' convolution weights are stored channels-last.
    channels_last: bool,
    /// Denoising steps recorded as CUDA graphs (CUDA builds on a CUDA device).
    #[cfg(feature = "cuda")]
    graphs: Mutex<GraphState>,
}

/// Whether denoising steps run as CUDA graphs.
#[cfg(feature = "cuda")]
enum GraphState {
    /// Eager execution (the CPU, or turned off).
    Off,
    /// Steps replay recorded graphs.
    On(StepGraphs),
    /// A recording failed; steps run eagerly. The message says why.
    Failed(String),
}

/// How to load a pipeline, beyond the model, device and precision.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// For a single-file checkpoint that is not SDXL base-shaped: a diffusers folder whose
    /// configs, tokenizers and scheduler config are used (its weights are not read).
    pub config_dir: Option<PathBuf>,
    /// The VAE's precision. Default: the pipeline's, except next to an f16 denoiser when the
    /// VAE asks for `force_upcast` (the stock SDXL VAE overflows in f16): there diffusers runs
    /// it in f32 ([`VaeConfig::run_kind`]), Darkroom in bf16, which has f32's range at half the
    /// memory and time (the f32 decode of a 1024² image is the largest memory peak of a
    /// generation). `Some(DType::F32)` gives diffusers' choice.
    pub vae_dtype: Option<DType>,
}

/// The parts of `model_index.json` the pipeline reads.
#[derive(Debug, Deserialize)]
struct ModelIndex {
    #[serde(default = "yes")]
    force_zeros_for_empty_prompt: bool,
}

fn yes() -> bool {
    true
}

impl SdxlPipeline {
    /// Loads a diffusers folder or a single-file checkpoint onto `device` in `dtype`.
    ///
    /// `config_dir` describes a single-file checkpoint that is not SDXL base-shaped: a diffusers
    /// folder whose configs, tokenizers and scheduler config are used (its weights are not read).
    /// The VAE runs in bf16 next to an f16 UNet when its config asks for upcasting
    /// (`force_upcast`, the stock SDXL VAE overflows in f16; see [`LoadOptions::vae_dtype`]); a
    /// fp16-safe VAE (`force_upcast: false`) runs in f16.
    pub fn load(
        model: &Path,
        config_dir: Option<&Path>,
        device: Device,
        dtype: DType,
    ) -> Result<Self> {
        let options = LoadOptions {
            config_dir: config_dir.map(Path::to_path_buf),
            ..LoadOptions::default()
        };
        Self::load_with(model, device, dtype, &options)
    }

    /// [`load`](Self::load) with every option.
    pub fn load_with(
        model: &Path,
        device: Device,
        dtype: DType,
        load_options: &LoadOptions,
    ) -> Result<Self> {
        let mut options = SourceOptions::new(dtype);
        if let Some(dir) = &load_options.config_dir {
            options = options.with_config_dir(dir);
        }
        let source = ModelSource::open(model, &options)?;
        let kind = dtype.kind();
        // Building `tch::nn` layers draws their (overwritten) initial values from the generator.
        let _generator = GENERATOR.lock().unwrap_or_else(|e| e.into_inner());

        let te_config: ClipTextConfig = config_or(
            &source,
            Component::TextEncoder,
            ClipTextConfig::sdxl_text_encoder,
        )?;
        let te2_config: ClipTextConfig = config_or(
            &source,
            Component::TextEncoder2,
            ClipTextConfig::sdxl_text_encoder_2,
        )?;
        let unet_config: UNetConfig = config_or(&source, Component::Unet, UNetConfig::sdxl_base)?;
        let vae_config: VaeConfig = config_or(&source, Component::Vae, VaeConfig::sdxl)?;
        vae_config.validate()?;

        let mut stores = Vec::new();
        let text_encoder = build(
            &source,
            Component::TextEncoder,
            device,
            kind,
            &mut stores,
            |p| ClipTextModel::new(p, &te_config),
        )?;
        let text_encoder_2 = build(
            &source,
            Component::TextEncoder2,
            device,
            kind,
            &mut stores,
            |p| ClipTextModelWithProjection::new(p, &te2_config),
        )?;
        let unet = build(&source, Component::Unet, device, kind, &mut stores, |p| {
            UNet2DConditionModel::new(p, &unet_config)
        })?;
        let vae_kind = match load_options.vae_dtype {
            Some(vae_dtype) => vae_dtype.kind(),
            // bf16 where diffusers upcasts to f32: the same range, half the memory and time.
            None if vae_config.run_kind(kind) != kind => Kind::BFloat16,
            None => kind,
        };
        let vae = build(
            &source,
            Component::Vae,
            device,
            vae_kind,
            &mut stores,
            |p| AutoencoderKL::new(p, &vae_config),
        )?;

        let tokenizer = match source.tokenizer() {
            Some(folder) => ClipTokenizer::from_folder(folder)?,
            None => ClipTokenizer::bundled_sdxl_tokenizer()?,
        };
        let tokenizer_2 = match source.tokenizer_2() {
            Some(folder) => ClipTokenizer::from_folder(folder)?,
            None => ClipTokenizer::bundled_sdxl_tokenizer_2()?,
        };
        for (tokenizer, config, name) in [
            (&tokenizer, &te_config, "text_encoder"),
            (&tokenizer_2, &te2_config, "text_encoder_2"),
        ] {
            // An id past the embedding table would abort inside libtorch.
            if usize::try_from(config.vocab_size).unwrap_or(0) < tokenizer.vocab_size() {
                return Err(EngineError::InvalidConfig {
                    component: "pipeline",
                    message: format!(
                        "{name} has a vocabulary of {} tokens but its tokenizer produces ids up to {}",
                        config.vocab_size,
                        tokenizer.vocab_size()
                    ),
                });
            }
        }
        let scheduler_config = match source.scheduler_config() {
            Some(path) => SchedulerConfig::from_file(path)?,
            None => SchedulerConfig::sdxl_base(),
        };
        let force_zeros_for_empty_prompt = match source.layout() {
            Layout::Diffusers => {
                let path = source.path().join("model_index.json");
                let text = std::fs::read_to_string(&path).map_err(|source| EngineError::Io {
                    path: path.clone(),
                    source,
                })?;
                serde_json::from_str::<ModelIndex>(&text)
                    .map_err(|e| EngineError::InvalidConfig {
                        component: "model_index.json",
                        message: e.to_string(),
                    })?
                    .force_zeros_for_empty_prompt
            }
            Layout::SingleFile => true,
        };
        Ok(SdxlPipeline {
            text: SdxlTextEncoders {
                tokenizer,
                text_encoder,
                tokenizer_2,
                text_encoder_2,
                force_zeros_for_empty_prompt,
            },
            unet,
            vae,
            stores,
            controlnets: BTreeMap::new(),
            next_controlnet: 0,
            loras: LoraFuser::new(),
            prompts: Mutex::new(PromptCache::new(prompt_cache::DEFAULT_ENTRIES)),
            text_loras: Some(Vec::new()),
            scheduler_config,
            device,
            kind,
            channels_last: false,
            #[cfg(feature = "cuda")]
            graphs: Mutex::new(match device {
                Device::Cuda(index) => GraphState::On(StepGraphs::new(index)),
                _ => GraphState::Off,
            }),
        })
    }

    /// Turns CUDA graphs for the denoising steps on or off (on by default on CUDA devices; no
    /// effect on the CPU). Results are the same either way; graphs remove the host's per-kernel
    /// launch cost, which bounds SDXL's step time on fast GPUs.
    #[cfg(feature = "cuda")]
    pub fn set_cuda_graphs(&self, enabled: bool) {
        let mut state = self.graphs.lock().unwrap_or_else(|e| e.into_inner());
        let previous = std::mem::replace(
            &mut *state,
            match (enabled, self.device) {
                (true, Device::Cuda(index)) => GraphState::On(StepGraphs::new(index)),
                _ => GraphState::Off,
            },
        );
        drop(state);
        if let GraphState::On(graphs) = previous {
            self.forget_graph_buffers(graphs.into_buffers());
        }
    }

    /// Has the models forget what they remembered of dropped graphs' buffers.
    #[cfg(feature = "cuda")]
    fn forget_graph_buffers(&self, dropped: Vec<crate::step_graph::GraphBuffers>) {
        for buffers in dropped {
            self.unet.forget_context(&buffers.hidden);
            for (id, image) in &buffers.images {
                if let Some(net) = self.controlnets.get(id) {
                    net.model().forget_context(&buffers.hidden);
                    net.model().forget_condition(image);
                }
            }
        }
    }

    /// Whether denoising steps are replayed as CUDA graphs (which remember the conditioning
    /// of their own buffers).
    fn records_steps(&self) -> bool {
        #[cfg(feature = "cuda")]
        {
            matches!(
                *self.graphs.lock().unwrap_or_else(|e| e.into_inner()),
                GraphState::On(_)
            )
        }
        #[cfg(not(feature = "cuda"))]
        false
    }

    /// Stores the convolution weights of the UNet, the VAE and the ControlNets (those loaded
    /// later too) channels-last, or back in the default layout. Convolutions then produce
    /// channels-last maps, which cuDNN takes without the transposes it adds around NCHW
    /// convolutions on recent GPUs, and which the fused GroupNorm ([`crate::kernels`]) reads in
    /// place; with libtorch's GroupNorm on CUDA, which makes its input contiguous first, it is
    /// slower. The UNet's prediction and the VAE's latents and images come back contiguous
    /// either way. Results are the same up to the convolution algorithms' rounding. Recorded
    /// CUDA graphs are dropped (they read the old weights); LoRA sets stay fused.
    pub fn set_channels_last(&mut self, enabled: bool) {
        if enabled == self.channels_last {
            return;
        }
        self.channels_last = enabled;
        let relaid = [Component::Unet, Component::Vae]
            .into_iter()
            .filter_map(|component| self.var_store(component))
            .flat_map(|vs| vs.variables().into_values())
            .collect::<Vec<_>>();
        for mut var in relaid {
            relayout(&mut var, enabled);
        }
        for net in self.controlnets.values() {
            for mut var in net.var_store().variables().into_values() {
                relayout(&mut var, enabled);
            }
        }
        self.drop_recorded_graphs();
    }

    /// Runs on `choice`'s kernels and layout: the fused kernels are compiled for the pipeline's
    /// CUDA device (once per process) and switched on or off process-wide, convolution weights
    /// relaid ([`Self::set_channels_last`]), recorded CUDA graphs dropped.
    ///
    /// # Errors
    /// [`EngineError::InvalidConfig`] for the fused kernels on the CPU or in a build without the
    /// `cuda` feature; [`EngineError::Cuda`] when they cannot be compiled for the device.
    pub fn use_kernels(&mut self, choice: crate::kernels::KernelChoice) -> Result<()> {
        use crate::kernels::{self, KernelChoice};
        match (choice, self.device) {
            (KernelChoice::Stock, _) => kernels::disable_fused_kernels(),
            #[cfg(feature = "cuda")]
            (_, Device::Cuda(index)) => kernels::enable_fused_kernels(index)?,
            (_, device) => {
                return Err(EngineError::InvalidConfig {
                    component: "kernels",
                    message: format!(
                        "the {choice} kernels need a CUDA device and a build with the `cuda` \
                         feature (the pipeline runs on {device:?})"
                    ),
                });
            }
        }
        self.set_channels_last(choice == KernelChoice::FusedNhwc);
        self.drop_recorded_graphs();
        Ok(())
    }

    /// Forgets the recorded CUDA graphs (they hold the kernels and weights of when they were
    /// recorded); steps record new ones, unless graphs are off.
    fn drop_recorded_graphs(&self) {
        #[cfg(feature = "cuda")]
        {
            let graphs_on = !matches!(
                *self.graphs.lock().unwrap_or_else(|e| e.into_inner()),
                GraphState::Off
            );
            self.set_cuda_graphs(graphs_on);
        }
    }

    /// Whether convolution weights are stored channels-last ([`Self::set_channels_last`]).
    pub fn channels_last(&self) -> bool {
        self.channels_last
    }

    /// Whether steps run as CUDA graphs: `Ok(true)` when on, `Ok(false)` when off, `Err` with
    /// the reason when a recording failed and steps fell back to eager execution.
    pub fn cuda_graphs(&self) -> std::result::Result<bool, String> {
        #[cfg(feature = "cuda")]
        {
            match &*self.graphs.lock().unwrap_or_else(|e| e.into_inner()) {
                GraphState::Off => Ok(false),
                GraphState::On(_) => Ok(true),
                GraphState::Failed(reason) => Err(reason.clone()),
            }
        }
        #[cfg(not(feature = "cuda"))]
        Ok(false)
    }

    /// The variable store holding `component`'s weights (shared with the module).
    pub fn var_store(&self, component: Component) -> Option<&nn::VarStore> {
        self.stores
            .iter()
            .find(|(c, _)| *c == component)
            .map(|(_, vs)| vs)
    }

    /// The precision the UNet and text encoders run in.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The device the model is on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Renders one image. `on_step(done, total)` is called after every denoising step.
    pub fn generate(
        &self,
        request: &GenerateRequest,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<Generated> {
        self.generate_until(request, &mut |done, total| {
            on_step(done, total);
            ControlFlow::Continue(())
        })
    }

    /// [`generate`](Self::generate) that can be stopped: when `on_step(done, total)` answers
    /// [`ControlFlow::Break`] after a step, the generation ends there with
    /// [`EngineError::Stopped`] (a long-lived worker cancelling a job between steps).
    pub fn generate_until(
        &self,
        request: &GenerateRequest,
        on_step: &mut dyn FnMut(usize, usize) -> ControlFlow<()>,
    ) -> Result<Generated> {
        // A panic elsewhere cannot leave the generator in a state a new seed would not reset.
        let _generator = GENERATOR.lock().unwrap_or_else(|e| e.into_inner());
        tch::no_grad(|| self.generate_inner(request, on_step))
    }

    fn generate_inner(
        &self,
        request: &GenerateRequest,
        on_step: &mut dyn FnMut(usize, usize) -> ControlFlow<()>,
    ) -> Result<Generated> {
        let mut timings = Timings::default();
        let guided = request.guidance > 1.0;
        let started = Instant::now();
        let controls = self.prepare_controls(request, guided)?;
        timings.prepare = started.elapsed();
        tch::manual_seed(request.seed);

        let started = Instant::now();
        let (hidden, pooled, remembered) = self.text_conditioning(request, guided)?;
        timings.prompt_remembered = remembered;
        // The text's keys and values and the control images' embeddings, once for all steps
        // (forgotten when this returns). Recorded steps read their own buffers' instead.
        let _remembered =
            (!self.records_steps()).then(|| Remembered::new(&self.unet, &controls, &hidden));
        timings.text = started.elapsed();

        let started = Instant::now();
        let mut scheduler =
            Scheduler::new(request.scheduler, &self.scheduler_config, request.steps)?;
        let scale = self.vae.config().vae_scale_factor();
        let (mut latents, height, width) = match &request.init {
            None => {
                let (height, width) = check_size(request.height, request.width, scale)?;
                let shape = [1, 4, height / scale, width / scale];
                // diffusers' randn_tensor: on the CPU generator, in the model's dtype.
                let noise = Tensor::randn(shape, (self.kind, Device::Cpu)).to_device(self.device);
                (noise * scheduler.init_noise_sigma(), height, width)
            }
            Some(init) => {
                let (height, width) = check_size(init.image.height(), init.image.width(), scale)?;
                let begin = scheduler.set_strength(init.strength)?;
                let pixels = image_to_tensor(&init.image, self.device);
                let image_latents = self.vae.latents_from_image(
                    &pixels,
                    LatentSample::DefaultGenerator,
                    self.kind,
                )?;
                let noise = Tensor::randn(image_latents.size(), (self.kind, Device::Cpu))
                    .to_device(self.device);
                (
                    scheduler.add_noise(&image_latents, &noise, begin)?,
                    height,
                    width,
                )
            }
        };
        // original_size + crops_coords_top_left + target_size, the same for both CFG halves.
        let time_ids = Tensor::from_slice(&[
            height as f32,
            width as f32,
            0.0,
            0.0,
            height as f32,
            width as f32,
        ])
        .view([1, 6])
        .to_device(self.device)
        .to_kind(self.kind);
        let time_ids = if guided {
            time_ids.repeat([2, 1])
        } else {
            time_ids
        };
        timings.prepare += started.elapsed();

        let started = Instant::now();
        let first = scheduler.begin_index();
        let timesteps = scheduler.timesteps().to_vec();
        let total = timesteps.len() - first;
        // For recorded steps the timestep is an input buffer on the device: upload them once.
        let device_timesteps =
            Tensor::from_slice(&timesteps.iter().map(|&t| t as f32).collect::<Vec<f32>>())
                .to_device(self.device);
        #[cfg(feature = "cuda")]
        if let GraphState::On(graphs) = &mut *self.graphs.lock().unwrap_or_else(|e| e.into_inner())
        {
            graphs.begin_generation();
        }
        for (done, index) in (first..timesteps.len()).enumerate() {
            let model_input = if guided {
                Tensor::cat(&[&latents, &latents], 0)
            } else {
                latents.shallow_clone()
            };
            let model_input = scheduler.scale_model_input(&model_input, index)?;
            // StableDiffusionXLControlNet(Img2Img)Pipeline: every ControlNet in its window sees
            // the UNet's input and text conditioning; `cond_scale = scale × keep`.
            let active: Vec<ActiveControl<'_>> = controls
                .iter()
                .filter_map(|prepared| {
                    let keep = prepared.input.keep(done, total);
                    (keep != 0.0).then_some(ActiveControl {
                        id: prepared.input.controlnet,
                        net: prepared.net,
                        image: &prepared.image,
                        scale: prepared.input.conditioning_scale * keep,
                    })
                })
                .collect();
            let timestep = device_timesteps.get(index as i64);
            let inputs = StepInputs {
                sample: &model_input,
                timestep: Timestep::Value(timesteps[index]),
                hidden: &hidden,
                pooled: &pooled,
                time_ids: &time_ids,
            };
            let prediction = self.predict_step(&inputs, &timestep, &active)?;
            let prediction = if guided {
                let halves = prediction.chunk(2, 0);
                let (uncond, text) = (&halves[0], &halves[1]);
                uncond + (text - uncond) * request.guidance
            } else {
                prediction
            };
            let noise = scheduler
                .needs_step_noise()
                .then(|| step_noise_like(&prediction));
            latents = scheduler.step(&prediction, index, &latents, noise.as_ref())?;
            if on_step(done + 1, total).is_break() {
                return Err(EngineError::Stopped {
                    step: done + 1,
                    steps: total,
                });
            }
        }
        timings.steps = total;
        timings.denoise = started.elapsed();

        let started = Instant::now();
        let decoded = self.vae.image_from_latents(&latents)?;
        let image = tensor_to_image(&decoded)?
            .into_iter()
            .next()
            .ok_or_else(|| EngineError::InvalidInput {
                component: "vae",
                message: "the decoder returned no image".to_owned(),
            })?;
        timings.decode = started.elapsed();
        Ok(Generated {
            image,
            latents: latents.to_kind(Kind::Float).to_device(Device::Cpu),
            timings,
        })
    }

    /// The noise prediction of one step: through its CUDA graph when graphs are on (`timestep`
    /// is `inputs.timestep` as a device tensor), else eagerly.
    fn predict_step(
        &self,
        inputs: &StepInputs<'_>,
        timestep: &Tensor,
        controls: &[ActiveControl<'_>],
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        {
            let mut state = self.graphs.lock().unwrap_or_else(|e| e.into_inner());
            if let GraphState::On(graphs) = &mut *state {
                let on_device = StepInputs {
                    timestep: Timestep::Tensor(timestep),
                    ..*inputs
                };
                let remember = |hidden: &Tensor, controls: &[ActiveControl<'_>]| {
                    self.unet.remember_context(hidden);
                    for control in controls {
                        control.net.model().remember_context(hidden);
                        control.net.model().remember_condition(control.image);
                    }
                };
                match graphs.predict(
                    &on_device,
                    controls,
                    &|i, c| self.predict_eager(i, c),
                    &remember,
                ) {
                    Ok(prediction) => return Ok(prediction),
                    Err(error) => *state = GraphState::Failed(error.to_string()),
                }
            }
        }
        #[cfg(not(feature = "cuda"))]
        let _ = timestep;
        self.predict_eager(inputs, controls)
    }

    /// The ControlNets' residuals, summed as diffusers' `MultiControlNetModel` does, then the
    /// UNet's noise prediction.
    fn predict_eager(
        &self,
        inputs: &StepInputs<'_>,
        controls: &[ActiveControl<'_>],
    ) -> Result<Tensor> {
        let added = AddedConditioning {
            text_embeds: inputs.pooled,
            time_ids: inputs.time_ids,
        };
        let timestep = || match inputs.timestep {
            Timestep::Value(value) => Timestep::Value(value),
            Timestep::Tensor(tensor) => Timestep::Tensor(tensor),
        };
        let mut control: Option<ControlNetOutput> = None;
        for active in controls {
            let output = active.net.model().forward(
                inputs.sample,
                timestep(),
                inputs.hidden,
                active.image,
                active.scale,
                Some(&added),
            )?;
            match &mut control {
                Some(sum) => sum.accumulate(&output)?,
                None => control = Some(output),
            }
        }
        let residuals = control.as_ref().map(ControlNetOutput::residuals);
        self.unet.forward_with_control(
            inputs.sample,
            timestep(),
            inputs.hidden,
            Some(&added),
            residuals.as_ref(),
        )
    }

    /// The model LoRAs are resolved against (the UNet's and text encoders' weights).
    pub fn lora_target(&self) -> Result<LoraTarget> {
        let config =
            serde_json::to_value(self.unet.config()).map_err(|e| EngineError::InvalidConfig {
                component: "unet",
                message: e.to_string(),
            })?;
        Ok(LoraTarget::new(&self.store_refs(), Some(&config)))
    }

    /// Reads a LoRA file for this model (factors on its device); see [`LoraWeights::load`].
    pub fn load_lora(&self, path: &Path) -> Result<LoraWeights> {
        Ok(LoraWeights::load(path, &self.lora_target()?)?)
    }

    /// Fuses `loras` (each with its weight) into the weights, replacing the previous set; an
    /// empty set restores the base model exactly. Nothing changes when a LoRA does not fit.
    /// See [`LoraFuser::apply`].
    pub fn set_loras(&mut self, loras: &[(&LoraWeights, f64)]) -> Result<LoraSwitch> {
        let text_loras: Vec<(u64, u64)> = loras
            .iter()
            .filter(|(lora, weight)| *weight != 0.0 && lora.adapts_text_encoders())
            .map(|(lora, weight)| (lora.id(), weight.to_bits()))
            .collect();
        let stores: Vec<(Component, &nn::VarStore)> =
            self.stores.iter().map(|(c, vs)| (*c, vs)).collect();
        let switched = self.loras.apply(&stores, loras);
        let now = switched.is_ok().then_some(text_loras);
        if now.is_none() || now != self.text_loras {
            self.prompt_cache().clear();
        }
        self.text_loras = now;
        Ok(switched?)
    }

    /// Keeps the text conditioning of the `entries` most recently used prompts (16 by default;
    /// 0 turns the cache off). A remembered prompt skips both text encoders; a LoRA switch
    /// ([`Self::set_loras`]) that changes what is fused into the text encoders forgets every
    /// entry. Weights edited by other means (through [`Self::var_store`]) need
    /// `set_prompt_cache(0)` first.
    pub fn set_prompt_cache(&self, entries: usize) {
        self.prompt_cache().set_capacity(entries);
    }

    fn prompt_cache(&self) -> std::sync::MutexGuard<'_, PromptCache> {
        self.prompts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The UNet's text inputs for `request` and whether they were remembered (else they are
    /// encoded and remembered).
    fn text_conditioning(
        &self,
        request: &GenerateRequest,
        guided: bool,
    ) -> Result<(Tensor, Tensor, bool)> {
        let key = PromptKey {
            prompt: request.prompt.clone(),
            negative_prompt: request.negative_prompt.clone(),
            guided,
        };
        if let Some((hidden, pooled)) = self.prompt_cache().get(&key) {
            return Ok((hidden, pooled, true));
        }
        let conditioning = self.text.encode_prompt(&PromptRequest {
            negative_prompt: request.negative_prompt.clone(),
            classifier_free_guidance: guided,
            ..PromptRequest::new(request.prompt.clone())
        })?;
        let (hidden, pooled) = conditioning_batch(&conditioning, self.device, self.kind);
        self.prompt_cache().insert(key, &hidden, &pooled);
        Ok((hidden, pooled, false))
    }

    fn store_refs(&self) -> Vec<(Component, &nn::VarStore)> {
        self.stores.iter().map(|(c, vs)| (*c, vs)).collect()
    }
}

impl SdxlPipeline {
    /// Loads a diffusers ControlNet folder (`config.json` + `diffusion_pytorch_model.safetensors`,
    /// or its fp16 variant) onto the pipeline's device in its precision, for requests to name.
    /// Refuses a ControlNet made for another base model ([`EngineError::InvalidConfig`] listing
    /// what differs).
    pub fn load_controlnet(&mut self, dir: &Path) -> Result<ControlNetId> {
        let net = ControlNet::load(dir, self.device, dtype_of(self.kind))?;
        self.add_controlnet(net)
    }

    /// Adds a ControlNet loaded elsewhere; it must be on the pipeline's device, in its
    /// precision, and made for its UNet.
    pub fn add_controlnet(&mut self, net: ControlNet) -> Result<ControlNetId> {
        let config = net.config();
        config.check_compatible(self.unet.config())?;
        if config.global_pool_conditions {
            return Err(EngineError::InvalidConfig {
                component: "controlnet",
                message: "global_pool_conditions is not supported (diffusers runs such \
                          ControlNets in guess mode; no SDXL ControlNet uses it)"
                    .to_owned(),
            });
        }
        if net.device() != self.device || net.kind() != self.kind {
            return Err(EngineError::InvalidConfig {
                component: "controlnet",
                message: format!(
                    "loaded on {:?} in {:?}, the pipeline runs on {:?} in {:?}",
                    net.device(),
                    net.kind(),
                    self.device,
                    self.kind
                ),
            });
        }
        if self.channels_last {
            for mut var in net.var_store().variables().into_values() {
                relayout(&mut var, true);
            }
        }
        let id = ControlNetId(self.next_controlnet);
        self.next_controlnet += 1;
        self.controlnets.insert(id, net);
        Ok(id)
    }

    /// A loaded ControlNet.
    pub fn controlnet(&self, id: ControlNetId) -> Option<&ControlNet> {
        self.controlnets.get(&id)
    }

    /// The loaded ControlNets' ids, oldest first.
    pub fn controlnet_ids(&self) -> Vec<ControlNetId> {
        self.controlnets.keys().copied().collect()
    }

    /// Unloads a ControlNet (its memory is freed when the returned value is dropped).
    pub fn remove_controlnet(&mut self, id: ControlNetId) -> Option<ControlNet> {
        #[cfg(feature = "cuda")]
        {
            let dropped = match &mut *self.graphs.lock().unwrap_or_else(|e| e.into_inner()) {
                GraphState::On(graphs) => graphs.forget_controlnet(id),
                _ => Vec::new(),
            };
            self.forget_graph_buffers(dropped);
        }
        self.controlnets.remove(&id)
    }

    /// Checks the request's control inputs (known ControlNet, scale, window, image at the output
    /// size) and converts their images as diffusers' `prepare_image` does: `[0, 1]` floats in
    /// the ControlNet's precision, twice for classifier-free guidance.
    fn prepare_controls<'a>(
        &'a self,
        request: &'a GenerateRequest,
        guided: bool,
    ) -> Result<Vec<PreparedControl<'a>>> {
        let (width, height) = match &request.init {
            Some(init) => init.image.dimensions(),
            None => (request.width, request.height),
        };
        let invalid = |message: String| EngineError::InvalidInput {
            component: "controlnet",
            message,
        };
        request
            .controls
            .iter()
            .enumerate()
            .map(|(i, input)| {
                let net = self.controlnets.get(&input.controlnet).ok_or_else(|| {
                    invalid(format!(
                        "control {i}: {} is not loaded in this pipeline",
                        input.controlnet
                    ))
                })?;
                if !input.conditioning_scale.is_finite() {
                    return Err(invalid(format!(
                        "control {i}: conditioning scale {} is not finite",
                        input.conditioning_scale
                    )));
                }
                let (start, end) = (input.guidance_start, input.guidance_end);
                // diffusers' check_inputs.
                if !(0.0..=1.0).contains(&start) || !(0.0..=1.0).contains(&end) || start >= end {
                    return Err(invalid(format!(
                        "control {i}: guidance window {start}–{end} must satisfy \
                         0 ≤ start < end ≤ 1"
                    )));
                }
                if input.image.dimensions() != (width, height) {
                    return Err(invalid(format!(
                        "control {i}: the control image is {}×{}, the output {width}×{height} \
                         (resize it to the output size first)",
                        input.image.width(),
                        input.image.height()
                    )));
                }
                let image = control_image_to_tensor(&input.image, net.device()).to_kind(net.kind());
                let image = if guided {
                    Tensor::cat(&[&image, &image], 0)
                } else {
                    image
                };
                Ok(PreparedControl { net, image, input })
            })
            .collect()
    }
}

fn dtype_of(kind: Kind) -> DType {
    match kind {
        Kind::Half => DType::F16,
        Kind::BFloat16 => DType::Bf16,
        _ => DType::F32,
    }
}

/// Reads `component`'s config, or uses `default` when the checkpoint has none (single file).
fn config_or<T: serde::de::DeserializeOwned>(
    source: &ModelSource,
    component: Component,
    default: impl FnOnce() -> T,
) -> Result<T> {
    match source.config_json(component)? {
        Some(json) => serde_json::from_value(json).map_err(|e| EngineError::InvalidConfig {
            component: component.name(),
            message: e.to_string(),
        }),
        None => Ok(default()),
    }
}

/// Builds a module on a fresh var store in `kind` on `device`, fills it from disk and keeps the
/// store in `stores`.
fn build<M>(
    source: &ModelSource,
    component: Component,
    device: Device,
    kind: Kind,
    stores: &mut Vec<(Component, nn::VarStore)>,
    new: impl FnOnce(nn::Path) -> Result<M>,
) -> Result<M> {
    let mut vs = nn::VarStore::new(device);
    // Set before building, so every variable is created in `kind` (an f32 copy of SDXL first would
    // double the peak memory and add a conversion pass).
    vs.set_kind(kind);
    let module = new(vs.root())?;
    source.load(&mut vs, component)?;
    vs.freeze();
    stores.push((component, vs));
    Ok(module)
}

/// What the models remember for one eager generation while it lives: the text states'
/// cross-attention keys and values in the UNet and the generation's ControlNets
/// ([`UNet2DConditionModel::remember_context`]), and each control image's conditioning
/// embedding ([`ControlNetModel::remember_condition`](crate::controlnet::ControlNetModel::remember_condition)).
struct Remembered<'a> {
    unet: &'a UNet2DConditionModel,
    controls: &'a [PreparedControl<'a>],
    hidden: &'a Tensor,
}

impl<'a> Remembered<'a> {
    fn new(
        unet: &'a UNet2DConditionModel,
        controls: &'a [PreparedControl<'a>],
        hidden: &'a Tensor,
    ) -> Self {
        unet.remember_context(hidden);
        for control in controls {
            control.net.model().remember_context(hidden);
            control.net.model().remember_condition(&control.image);
        }
        Remembered {
            unet,
            controls,
            hidden,
        }
    }
}

impl Drop for Remembered<'_> {
    fn drop(&mut self) {
        self.unet.forget_context(self.hidden);
        for control in self.controls {
            control.net.model().forget_context(self.hidden);
            control.net.model().forget_condition(&control.image);
        }
    }
}

/// The UNet's text inputs: `[negative; positive]` when guided.
fn conditioning_batch(
    conditioning: &TextConditioning,
    device: Device,
    kind: Kind,
) -> (Tensor, Tensor) {
    let to = |t: &Tensor| t.to_device(device).to_kind(kind);
    match (
        &conditioning.negative_prompt_embeds,
        &conditioning.negative_pooled_prompt_embeds,
    ) {
        (Some(negative), Some(negative_pooled)) => (
            Tensor::cat(&[to(negative), to(&conditioning.prompt_embeds)], 0),
            Tensor::cat(
                &[to(negative_pooled), to(&conditioning.pooled_prompt_embeds)],
                0,
            ),
        ),
        _ => (
            to(&conditioning.prompt_embeds),
            to(&conditioning.pooled_prompt_embeds),
        ),
    }
}

fn check_size(height: u32, width: u32, scale: i64) -> Result<(i64, i64)> {
    let (height, width) = (i64::from(height), i64::from(width));
    // The UNet halves the latents twice more (SDXL: three levels), so sides must be multiples
    // of 8 latent pixels' worth after the VAE's factor too; diffusers rounds to 8 pixels.
    if height <= 0 || width <= 0 || height % scale != 0 || width % scale != 0 {
        return Err(EngineError::InvalidInput {
            component: "pipeline",
            message: format!("{width}×{height} is not a positive multiple of {scale} pixels"),
        });
    }
    Ok((height, width))
}

/// Moves a 4-d (convolution) weight's values into the channels-last layout or back, in place:
/// every module sharing the variable sees the new layout.
fn relayout(var: &mut Tensor, channels_last: bool) {
    if var.dim() != 4 {
        return;
    }
    let moved = if channels_last {
        crate::kernels::to_channels_last(var)
    } else {
        var.contiguous()
    };
    tch::no_grad(|| var.set_data(&moved));
}
