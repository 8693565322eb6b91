//! Darkroom's GPU function: SDXL on libtorch through `tch`, in one long-lived process.
//!
//! The engine knows nothing of NATS, S3 or events. So far it holds [`device`]: choosing the
//! device and precision a model runs in, with typed errors for what the machine cannot do; and
//! [`loader`]: finding SDXL weights on disk (diffusers folders, single-file checkpoints) and
//! loading them into `tch` variable stores.

pub mod device;
pub mod loader;

/// Errors of the inference engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A device name that is not `cpu`, `cuda` or `cuda:N`.
    #[error("unknown device {0:?} (expected cpu, cuda or cuda:N)")]
    UnknownDevice(String),
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
    /// Model weights or configs could not be found or loaded.
    #[error(transparent)]
    Model(#[from] loader::ModelError),
    /// libtorch reported an error.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// Result alias for this crate.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
