//! Darkroom's GPU function: SDXL on libtorch through `tch`, in one long-lived process.
//!
//! The engine knows nothing of NATS, S3 or events. Its pieces, one module per component:
//! [`device`] (device and precision, with typed errors for what the machine cannot do),
//! [`loader`] (diffusers folders and single-file checkpoints into `tch` variable stores), the CLIP
//! [`tokenizer`], the CLIP text encoders in [`clip`], [`text_encoder`] (a prompt to SDXL's
//! conditioning), the denoising [`unet`], the [`vae`] between pixels and latents, and the
//! diffusion [`scheduler`]s, [`lora`] adapters fused into the weights, and the [`controlnet`]s
//! that steer the UNet with a control image, with the estimators that draw control images from a
//! photo: [`depth`] (Depth Anything) and [`pose`] (the OpenPose body model). [`pipeline`] puts them
//! together (txt2img, img2img,
//! ControlNets, LoRA sets). With the `cuda` feature, `cuda` binds what `tch` lacks (CUDA graphs,
//! allocator statistics, NVRTC-compiled kernels), the pipeline replays each denoising step as a
//! recorded CUDA graph, and [`kernels`] can run GroupNorm+SiLU and GEGLU as fused kernels.
//! [`profile`] runs code under libtorch's profiler: where an image's time goes.

use std::path::PathBuf;

pub mod clip;
pub mod controlnet;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod depth;
pub mod device;
pub mod kernels;
mod layers;
pub mod loader;
pub mod lora;
mod memo;
pub mod pipeline;
pub mod pose;
pub mod profile;
mod prompt_cache;
pub mod scheduler;
mod shim;
#[cfg(feature = "cuda")]
mod step_graph;
pub mod text_encoder;
pub mod tokenizer;
pub mod unet;
pub mod vae;

/// Errors of the inference engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A device name that is not `cpu`, `cuda` or `cuda:N`.
    #[error("unknown device {0:?} (expected cpu, cuda or cuda:N)")]
    UnknownDevice(String),
    /// A CUDA runtime call of the graph/allocator shim failed.
    #[error("CUDA {what}: {message}")]
    Cuda {
        /// What was being done.
        what: &'static str,
        /// libtorch's or the driver's account.
        message: String,
    },
    /// A dtype name that is not `f32`, `f16` or `bf16`.
    #[error("unknown dtype {0:?} (expected f32, f16 or bf16)")]
    UnknownDType(String),
    /// CUDA was asked for but this process sees no such GPU.
    #[error(
        "CUDA device {requested} requested but {available} CUDA device(s) are visible (is this a `cuda` build, and is the driver present?)"
    )]
    CudaUnavailable {
        /// The device index asked for.
        requested: usize,
        /// How many CUDA devices libtorch sees.
        available: usize,
    },
    /// f16 on the CPU: many kernels lack half-precision CPU implementations.
    #[error("f16 is not supported on the CPU; use f32 or bf16")]
    HalfOnCpu,
    /// A scheduler name that is not `euler`, `euler-a`, `dpmpp-2m-karras` or `ddim`.
    #[error("unknown scheduler {0:?} (expected euler, euler-a, dpmpp-2m-karras or ddim)")]
    UnknownScheduler(String),
    /// A scheduler was asked for something its schedule cannot do (zero steps, a strength that
    /// leaves no step, a step out of order, a missing noise tensor).
    #[error("scheduler: {0}")]
    InvalidSchedule(String),
    /// Model weights or configs could not be found or loaded.
    #[error(transparent)]
    Model(#[from] loader::ModelError),
    /// A model file that could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A configuration (a `config.json`, tokenizer files, request options) that does not describe
    /// a model this engine can build. Not retryable.
    #[error("invalid {component} configuration: {message}")]
    InvalidConfig {
        /// The component whose configuration is wrong, e.g. `unet`.
        component: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// An input tensor or image of the wrong shape, kind or size for a component. Not retryable.
    #[error("invalid input to {component}: {message}")]
    InvalidInput {
        /// The component that refused the input, e.g. `vae`.
        component: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// The tokenizer library failed to build a tokenizer or to encode a text.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A LoRA that cannot be read, does not fit the model, or could not be fused. Not
    /// retryable.
    #[error(transparent)]
    Lora(#[from] lora::LoraError),
    /// The caller stopped a generation between two denoising steps.
    #[error("stopped after step {step} of {steps}")]
    Stopped {
        /// Steps done.
        step: usize,
        /// Steps the generation would have run.
        steps: usize,
    },
    /// libtorch's profiler could not start or stop ([`profile::record`]).
    #[error("profiler: {0}")]
    Profiler(String),
    /// libtorch reported an error.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// Result alias for this crate.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
