//! Loading SDXL weights from disk into `tch` variable stores.
//!
//! Two layouts are read, both only as [safetensors](https://huggingface.co/docs/safetensors)
//! (pickled `.bin`/`.ckpt` files can run code when loaded and are refused):
//!
//! - a **diffusers folder** (`model_index.json` with `unet/`, `vae/`, `text_encoder/`,
//!   `text_encoder_2/`, `tokenizer/`, `tokenizer_2/`, `scheduler/`), as `save_pretrained` writes it
//!   and the `stabilityai/stable-diffusion-xl-base-1.0` repository ships it, including the `fp16`
//!   variant files and sharded weights (`*.safetensors.index.json`);
//! - a **single-file checkpoint** in the original Stability naming (`sd_xl_base_1.0.safetensors`
//!   and its fine-tunes), whose keys [`single_file`] maps to the diffusers/transformers names the
//!   way diffusers' `loaders/single_file_utils.py` does.
//!
//! [`ModelSource::open`] finds out which layout a path holds and which files and `config.json`
//! belong to each [`Component`]. The modules of the engine are built on a `tch::nn::Path` with the
//! upstream parameter names; [`load_var_store`] then fills their `VarStore` from the memory-mapped
//! files through the component's [`KeyMap`]: every name, shape, dtype and offset is checked before
//! the first value is copied, so a bad file never leaves a half-loaded model behind.
//!
//! ```no_run
//! use darkroom_inference::device::DType;
//! use darkroom_inference::loader::{Component, ModelSource, SourceOptions};
//!
//! # fn build_unet(_: tch::nn::Path, _: Option<serde_json::Value>) {}
//! # fn main() -> Result<(), darkroom_inference::loader::ModelError> {
//! // A diffusers folder, or a single file (then `.with_config_dir(folder)` for non-base models).
//! let source = ModelSource::open("/models/sdxl-base", &SourceOptions::new(DType::F16))?;
//! let mut vs = tch::nn::VarStore::new(tch::Device::Cuda(0));
//! // The run dtype first, so the module's variables are created in it (the loader converts).
//! vs.set_kind(tch::Kind::Half);
//! // The module, built with the upstream names from its config (`None`: SDXL base defaults).
//! build_unet(vs.root(), source.config_json(Component::Unet)?);
//! source.load(&mut vs, Component::Unet)?;
//! # Ok(()) }
//! ```

mod key_map;
mod layout;
mod safetensors;
pub mod single_file;
mod upload;

use std::fmt;
use std::path::PathBuf;

pub use key_map::{KeyMap, Mapped, Target, Transform};
pub use layout::{ComponentSource, Layout, ModelSource, SourceOptions, WeightVariant};
pub(crate) use safetensors::{MappedFile, kind_of};
pub use safetensors::{load_var_store, read_tensors};

/// A weight-bearing component of an SDXL pipeline, named as its diffusers subfolder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    /// `UNet2DConditionModel`.
    Unet,
    /// `AutoencoderKL`.
    Vae,
    /// `CLIPTextModel` (OpenAI CLIP ViT-L/14).
    TextEncoder,
    /// `CLIPTextModelWithProjection` (OpenCLIP ViT-bigG/14).
    TextEncoder2,
    /// `ControlNetModel`: not part of [`Component::ALL`]; read from its own diffusers model
    /// folder with [`ComponentSource::model_folder`].
    ControlNet,
    /// `DepthAnythingForDepthEstimation` (transformers), the depth-map estimator: not part of
    /// [`Component::ALL`]; its own model folder (`config.json`, `model.safetensors`).
    DepthEstimator,
    /// The OpenPose body model, the pose-map estimator: not part of [`Component::ALL`]; one
    /// safetensors file (`body_pose_model.safetensors`).
    PoseEstimator,
}

impl Component {
    /// The components of an SDXL pipeline, in the order a pipeline usually loads them.
    pub const ALL: [Component; 4] = [
        Component::TextEncoder,
        Component::TextEncoder2,
        Component::Unet,
        Component::Vae,
    ];

    /// The diffusers subfolder (and `model_index.json` entry) of this component.
    pub fn name(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::Vae => "vae",
            Component::TextEncoder => "text_encoder",
            Component::TextEncoder2 => "text_encoder_2",
            Component::ControlNet => "controlnet",
            Component::DepthEstimator => "depth_estimator",
            Component::PoseEstimator => "pose_estimator",
        }
    }

    /// Position in [`Component::ALL`], if there.
    pub(crate) fn slot(self) -> Option<usize> {
        match self {
            Component::TextEncoder => Some(0),
            Component::TextEncoder2 => Some(1),
            Component::Unet => Some(2),
            Component::Vae => Some(3),
            Component::ControlNet | Component::DepthEstimator | Component::PoseEstimator => None,
        }
    }

    /// The weights file name without extension: diffusers models write
    /// `diffusion_pytorch_model.safetensors`, transformers models `model.safetensors`.
    pub(crate) fn weights_stem(self) -> &'static str {
        match self {
            Component::Unet | Component::Vae | Component::ControlNet => "diffusion_pytorch_model",
            Component::TextEncoder | Component::TextEncoder2 | Component::DepthEstimator => "model",
            Component::PoseEstimator => "body_pose_model",
        }
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What can go wrong finding and loading model weights. None of these is retryable: the files
/// on disk have to change first (an [`ModelError::Io`] error may be a transient read failure of
/// a network file system; it is the only one worth a second attempt).
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A path that should exist does not.
    #[error("{} does not exist", path.display())]
    NotFound {
        /// The missing file or folder.
        path: PathBuf,
    },
    /// The path exists but holds nothing this engine reads.
    #[error("{}: unsupported model format: {hint}", path.display())]
    UnsupportedFormat {
        /// The file or folder.
        path: PathBuf,
        /// What to do instead.
        hint: String,
    },
    /// Reading or mapping a file failed.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A weights file whose header or size is broken (bad header, truncated data, tensors that
    /// appear twice).
    #[error("{} is corrupt: {message}", path.display())]
    CorruptFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A parameter of the model that no weights file provides.
    #[error("{component}: no tensor for parameter {name} in {}", file.display())]
    MissingTensor {
        /// The component being loaded.
        component: Component,
        /// The weights file (or, for several shards, their folder).
        file: PathBuf,
        /// The parameter's name (diffusers/transformers naming).
        name: String,
    },
    /// A tensor in a weights file that no parameter of the model takes.
    #[error("{component}: {} holds tensor {name}, which the model has no parameter for", file.display())]
    UnexpectedTensor {
        /// The component being loaded.
        component: Component,
        /// The file holding the tensor.
        file: PathBuf,
        /// The tensor's name as stored in the file.
        name: String,
    },
    /// A tensor whose shape differs from its parameter's.
    #[error(
        "{component}: tensor {name} in {} has shape {found:?}, the model expects {expected:?}",
        file.display()
    )]
    ShapeMismatch {
        /// The component being loaded.
        component: Component,
        /// The file holding the tensor.
        file: PathBuf,
        /// The parameter's name.
        name: String,
        /// The parameter's shape.
        expected: Vec<i64>,
        /// The stored shape (after the key map's transform).
        found: Vec<i64>,
    },
    /// A tensor stored in a dtype that is not a float (f16, bf16, f32 or f64).
    #[error("tensor {name} in {} has dtype {dtype}; only f16, bf16, f32 and f64 are supported", file.display())]
    DTypeUnsupported {
        /// The file holding the tensor.
        file: PathBuf,
        /// The tensor's name as stored.
        name: String,
        /// The stored dtype.
        dtype: String,
    },
    /// A `model_index.json`, `config.json` or shard index that cannot be used.
    #[error("invalid config {}: {message}", path.display())]
    InvalidConfig {
        /// The file (or, for a config given in memory, a description of it).
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// libtorch failed while copying a validated tensor into its variable (for instance out of
    /// device memory). The variable store is then partly written and must be dropped.
    #[error("{component}: libtorch failed copying {name}: {source}")]
    Torch {
        /// The component being loaded.
        component: Component,
        /// The parameter being written.
        name: String,
        /// libtorch's error.
        #[source]
        source: tch::TchError,
    },
}

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            ModelError::NotFound { path }
        } else {
            ModelError::Io { path, source }
        }
    }

    pub(crate) fn invalid_config(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        ModelError::InvalidConfig {
            path: path.into(),
            message: message.into(),
        }
    }
}
