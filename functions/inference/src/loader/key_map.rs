//! From the tensor names stored in a file to the parameter names of the engine's modules.

use std::path::Path;

use super::single_file::Rules;
use super::{Component, ModelError};

/// How a stored tensor becomes a parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transform {
    /// Taken as stored.
    Identity,
    /// Part `index` of `count` equal parts along the first dimension (OpenCLIP's fused
    /// `in_proj_weight`/`in_proj_bias`, split into q, k and v).
    Chunk {
        /// Which part, from 0.
        index: usize,
        /// Into how many parts.
        count: usize,
    },
    /// The transpose of a 2-D tensor (OpenCLIP stores `text_projection` as `(in, out)`; a linear
    /// weight is `(out, in)`).
    Transpose,
    /// A 1×1 convolution weight `(out, in, 1, 1)` (or `(out, in, 1)`) as the linear weight
    /// `(out, in)` (the original VAE's attention uses convolutions, diffusers' linear layers).
    /// Tensors of at most two dimensions pass unchanged.
    SqueezeConv1x1,
}

impl Transform {
    /// The shape of the result for a stored shape, or `None` when the transform cannot apply.
    pub fn output_shape(self, stored: &[i64]) -> Option<Vec<i64>> {
        match self {
            Transform::Identity => Some(stored.to_vec()),
            Transform::Chunk { index, count } => {
                let count = i64::try_from(count).ok()?;
                let (&first, rest) = stored.split_first()?;
                if count == 0 || i64::try_from(index).ok()? >= count || first % count != 0 {
                    return None;
                }
                let mut shape = vec![first / count];
                shape.extend_from_slice(rest);
                Some(shape)
            }
            Transform::Transpose => match stored {
                [rows, cols] => Some(vec![*cols, *rows]),
                _ => None,
            },
            Transform::SqueezeConv1x1 => match stored {
                [out, input, rest @ ..] if rest.iter().all(|&d| d == 1) => Some(vec![*out, *input]),
                [_] | [] => Some(stored.to_vec()),
                _ => None,
            },
        }
    }
}

/// A parameter a stored tensor provides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The parameter's name (diffusers/transformers naming).
    pub name: String,
    /// How the stored tensor becomes the parameter.
    pub transform: Transform,
}

impl Target {
    pub(crate) fn new(name: impl Into<String>, transform: Transform) -> Self {
        Target {
            name: name.into(),
            transform,
        }
    }
}

/// What a [`KeyMap`] makes of one stored tensor name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mapped {
    /// The tensor provides these parameters (several when it is split).
    Targets(Vec<Target>),
    /// The tensor is not this component's, or is known not to be a parameter (buffers such as
    /// CLIP's `position_ids`, training state such as `denoiser.sigmas` or EMA weights).
    Ignored,
    /// The tensor belongs to this component but nothing takes it: an error when loading.
    Unknown,
}

#[derive(Debug, Clone)]
enum Rename {
    /// Names are stored as the modules use them (diffusers folders).
    Identity,
    /// Original Stability naming of a single-file checkpoint.
    SingleFile(Rules),
}

/// The naming of one component in one file layout: stored tensor name → parameter name(s).
///
/// Built by [`super::ModelSource`] for each component, or directly with [`KeyMap::diffusers`] and
/// [`KeyMap::single_file`]. `CLIPTextModel` parameters are matched with or without the
/// `text_model.` prefix (transformers ≥ 5 dropped it from that class, older saves, such as the
/// SDXL base repository's, carry it), so the map works whichever naming the module uses.
#[derive(Debug, Clone)]
pub struct KeyMap {
    rename: Rename,
    /// Parameter-name prefix that may be present or not (see the type's docs).
    optional_prefix: Option<&'static str>,
    /// Stored names that are known buffers, not parameters.
    ignored: &'static [&'static str],
    /// Parameter-name prefixes the caller chose not to load.
    skipped: Vec<String>,
}

impl KeyMap {
    /// The naming of a diffusers folder: stored names are parameter names. Also ignores the
    /// `position_ids` buffer older transformers versions saved with CLIP text models.
    pub fn diffusers(component: Component) -> Self {
        let (optional_prefix, ignored): (_, &'static [&'static str]) = match component {
            Component::TextEncoder => (Some("text_model."), &["embeddings.position_ids"]),
            Component::TextEncoder2 => (None, &["text_model.embeddings.position_ids"]),
            Component::Unet
            | Component::Vae
            | Component::ControlNet
            | Component::DepthEstimator
            | Component::PoseEstimator => (None, &[]),
        };
        KeyMap {
            rename: Rename::Identity,
            optional_prefix,
            ignored,
            skipped: Vec::new(),
        }
    }

    /// The naming of a single-file SDXL checkpoint for `component`, given that component's
    /// diffusers `config.json` (`None`: the SDXL base values). See [`super::single_file`] for
    /// what is read from the config and which stored names are ignored.
    pub fn single_file(
        component: Component,
        config: Option<&serde_json::Value>,
    ) -> Result<Self, ModelError> {
        Self::single_file_from(component, config, Path::new("<in-memory config>"))
    }

    pub(crate) fn single_file_from(
        component: Component,
        config: Option<&serde_json::Value>,
        config_path: &Path,
    ) -> Result<Self, ModelError> {
        let rules = Rules::new(component, config)
            .map_err(|message| ModelError::invalid_config(config_path, message))?;
        Ok(KeyMap {
            rename: Rename::SingleFile(rules),
            optional_prefix: match component {
                Component::TextEncoder => Some("text_model."),
                _ => None,
            },
            ignored: &[],
            skipped: Vec::new(),
        })
    }

    /// Leaves parameters whose (mapped) name starts with `prefix` out of loading: stored
    /// tensors for them are ignored, and a variable store need not have them (e.g. `"encoder."`
    /// for a decode-only VAE).
    pub fn skipping(mut self, prefix: impl Into<String>) -> Self {
        self.skipped.push(prefix.into());
        self
    }

    /// What the stored tensor `key` provides.
    pub fn map(&self, key: &str) -> Mapped {
        let mapped = match &self.rename {
            Rename::Identity => {
                let name = self.canonical(key);
                if self.ignored.contains(&name) {
                    Mapped::Ignored
                } else {
                    Mapped::Targets(vec![Target::new(name, Transform::Identity)])
                }
            }
            Rename::SingleFile(rules) => rules.map(key),
        };
        match mapped {
            Mapped::Targets(targets) => {
                let targets: Vec<Target> = targets
                    .into_iter()
                    .filter(|t| !self.is_skipped(&t.name))
                    .collect();
                if targets.is_empty() {
                    Mapped::Ignored
                } else {
                    Mapped::Targets(targets)
                }
            }
            other => other,
        }
    }

    /// The name a variable of the module goes by in this map's targets (the name itself, or
    /// without the optional `text_model.` prefix for `CLIPTextModel`).
    pub fn canonical<'a>(&self, name: &'a str) -> &'a str {
        self.optional_prefix
            .and_then(|prefix| name.strip_prefix(prefix))
            .unwrap_or(name)
    }

    /// Whether the caller chose to leave this parameter out ([`KeyMap::skipping`]).
    pub fn is_skipped(&self, name: &str) -> bool {
        self.skipped.iter().any(|prefix| name.starts_with(prefix))
    }
}
