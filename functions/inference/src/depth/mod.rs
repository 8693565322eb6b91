//! Depth maps for depth ControlNets: Depth Anything ("Depth Anything: Unleashing the Power of
//! Large-Scale Unlabeled Data", Yang et al., 2024, <https://arxiv.org/abs/2401.10891>, and its V2),
//! as transformers' `DepthAnythingForDepthEstimation` builds it — a DINOv2 backbone
//! ([`dinov2`]) and a DPT neck and head ([`dpt`]) — loaded from a transformers model folder
//! (`config.json`, `model.safetensors`, optionally `preprocessor_config.json`), e.g.
//! `depth-anything/Depth-Anything-V2-Small-hf`.
//!
//! [`DepthEstimator::depth_map`] turns a photo into the control image SDXL depth ControlNets
//! take: the image resized as transformers' processor does (aspect kept, sides multiples of the
//! patch, the side closer to the target scale at `size`), the relative depth predicted, resized
//! back bicubically and normalised to `[0, 255]` (near is bright).

pub mod dinov2;
pub mod dpt;

use std::path::{Path, PathBuf};

use image::{GrayImage, RgbImage};
use serde::Deserialize;
use tch::{Device, Kind, Tensor, nn};

use crate::device::DType;
use crate::loader::{Component, KeyMap, load_var_store};
use crate::{EngineError, Result};
use dinov2::{Dinov2Backbone, Dinov2Config};
use dpt::{DepthHead, DptNeck};

const COMPONENT: &str = "depth estimator";

/// transformers' `DepthAnythingConfig`, the fields the model reads (defaults: transformers').
#[derive(Debug, Clone, Deserialize)]
pub struct DepthAnythingConfig {
    /// The DINOv2 backbone.
    pub backbone_config: Dinov2Config,
    /// Side of a patch in pixels.
    #[serde(default = "default_patch")]
    pub patch_size: i64,
    /// Width of the backbone's tokens the neck reassembles.
    #[serde(default = "default_reassemble")]
    pub reassemble_hidden_size: i64,
    /// Spatial factor of each reassembled map relative to the patch grid.
    #[serde(default = "default_factors")]
    pub reassemble_factors: Vec<f64>,
    /// Channels of each reassembled map.
    #[serde(default = "default_neck")]
    pub neck_hidden_sizes: Vec<i64>,
    /// Channels of the fusion stage.
    #[serde(default = "default_fusion")]
    pub fusion_hidden_size: i64,
    /// Which fused map the head reads (`-1`: the finest).
    #[serde(default = "default_head_in")]
    pub head_in_index: i64,
    /// Channels of the head's second convolution.
    #[serde(default = "default_head")]
    pub head_hidden_size: i64,
    /// `relative` (ReLU output) or `metric` (sigmoid × `max_depth`).
    #[serde(default = "default_type")]
    pub depth_estimation_type: String,
    /// Scale of metric depth (`None`: 1).
    #[serde(default)]
    pub max_depth: Option<f64>,
}

fn default_patch() -> i64 {
    14
}
fn default_reassemble() -> i64 {
    384
}
fn default_factors() -> Vec<f64> {
    vec![4.0, 2.0, 1.0, 0.5]
}
fn default_neck() -> Vec<i64> {
    vec![48, 96, 192, 384]
}
fn default_fusion() -> i64 {
    64
}
fn default_head_in() -> i64 {
    -1
}
fn default_head() -> i64 {
    32
}
fn default_type() -> String {
    "relative".to_owned()
}

impl DepthAnythingConfig {
    /// Parses a `config.json`.
    pub fn from_json(json: &str) -> Result<Self> {
        let config: DepthAnythingConfig =
            serde_json::from_str(json).map_err(|e| EngineError::InvalidConfig {
                component: COMPONENT,
                message: e.to_string(),
            })?;
        if config.backbone_config.patch_size != config.patch_size {
            return Err(EngineError::InvalidConfig {
                component: COMPONENT,
                message: format!(
                    "patch_size {} differs from the backbone's {}",
                    config.patch_size, config.backbone_config.patch_size
                ),
            });
        }
        if config.backbone_config.out_indices.len() != config.neck_hidden_sizes.len() {
            return Err(EngineError::InvalidConfig {
                component: COMPONENT,
                message: format!(
                    "the backbone returns {} stages for {} neck levels",
                    config.backbone_config.out_indices.len(),
                    config.neck_hidden_sizes.len()
                ),
            });
        }
        Ok(config)
    }
}

/// transformers' `DepthAnythingForDepthEstimation`: backbone, neck, head.
#[derive(Debug)]
pub struct DepthAnything {
    backbone: Dinov2Backbone,
    neck: DptNeck,
    head: DepthHead,
    patch_size: i64,
}

impl DepthAnything {
    /// Builds `backbone.…`, `neck.…` and `head.…` under `path`.
    pub fn new(path: nn::Path, config: &DepthAnythingConfig) -> Result<Self> {
        Ok(DepthAnything {
            backbone: Dinov2Backbone::new(&path / "backbone", &config.backbone_config)?,
            neck: DptNeck::new(&path / "neck", config)?,
            head: DepthHead::new(&path / "head", config)?,
            patch_size: config.patch_size,
        })
    }

    /// Normalised pixels `[b, 3, H, W]` (sides multiples of the patch size) → depth
    /// `[b, H, W]`.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let size = pixels.size();
        let [_, 3, height, width] = size[..] else {
            return Err(invalid_input(format!(
                "pixels must be [b, 3, H, W], got {size:?}"
            )));
        };
        if height % self.patch_size != 0
            || width % self.patch_size != 0
            || height == 0
            || width == 0
        {
            return Err(invalid_input(format!(
                "{width}×{height} is not a positive multiple of the {} px patch",
                self.patch_size
            )));
        }
        let _no_grad = tch::no_grad_guard();
        let (rows, cols) = (height / self.patch_size, width / self.patch_size);
        let stages = self.backbone.forward(pixels);
        let fused = self.neck.forward(&stages, rows, cols);
        self.head.forward(&fused, rows, cols)
    }
}

fn invalid_input(message: String) -> EngineError {
    EngineError::InvalidInput {
        component: COMPONENT,
        message,
    }
}

/// transformers' image processor settings for the model (`preprocessor_config.json`; absent:
/// Depth Anything's defaults).
#[derive(Debug, Clone, Deserialize)]
pub struct DepthPreprocessing {
    /// The target size; the aspect ratio is kept (see the module docs).
    #[serde(default = "default_size")]
    pub size: TargetSize,
    /// Sides are rounded to multiples of this.
    #[serde(default = "default_patch")]
    pub ensure_multiple_of: i64,
    /// Per-channel mean subtracted after scaling to `[0, 1]`.
    #[serde(default = "default_mean")]
    pub image_mean: [f64; 3],
    /// Per-channel standard deviation divided by.
    #[serde(default = "default_std")]
    pub image_std: [f64; 3],
}

/// `{"height": …, "width": …}`.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct TargetSize {
    /// Target height.
    pub height: i64,
    /// Target width.
    pub width: i64,
}

fn default_size() -> TargetSize {
    TargetSize {
        height: 518,
        width: 518,
    }
}
fn default_mean() -> [f64; 3] {
    [0.485, 0.456, 0.406]
}
fn default_std() -> [f64; 3] {
    [0.229, 0.224, 0.225]
}

impl Default for DepthPreprocessing {
    fn default() -> Self {
        DepthPreprocessing {
            size: default_size(),
            ensure_multiple_of: default_patch(),
            image_mean: default_mean(),
            image_std: default_std(),
        }
    }
}

impl DepthPreprocessing {
    /// The model's input size for an image of `height × width`: scaled as little as possible
    /// towards the target (the side whose scale is closer to 1 decides), each side rounded to
    /// the nearest multiple (half to even, as Python's `round`), at least one multiple.
    pub fn input_size(&self, height: i64, width: i64) -> (i64, i64) {
        let scale_height = self.size.height as f64 / height as f64;
        let scale_width = self.size.width as f64 / width as f64;
        let scale = if (1.0 - scale_width).abs() < (1.0 - scale_height).abs() {
            scale_width
        } else {
            scale_height
        };
        let multiple = self.ensure_multiple_of.max(1);
        let constrain = |value: f64| {
            let rounded = (value / multiple as f64).round_ties_even() as i64 * multiple;
            rounded.max(multiple)
        };
        (
            constrain(scale * height as f64),
            constrain(scale * width as f64),
        )
    }
}

/// A depth estimator loaded from a transformers model folder.
#[derive(Debug)]
pub struct DepthEstimator {
    model: DepthAnything,
    preprocessing: DepthPreprocessing,
    _vs: nn::VarStore,
    device: Device,
    kind: Kind,
    path: PathBuf,
}

impl DepthEstimator {
    /// Loads `dir` (`config.json`, `model.safetensors`, optionally `preprocessor_config.json`)
    /// onto `device` in `dtype`. Every tensor is checked before any is copied (a missing,
    /// unexpected, misshaped or truncated tensor is a typed error naming it).
    pub fn load(dir: &Path, device: Device, dtype: DType) -> Result<Self> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| EngineError::Io { path, source })
        };
        let config = DepthAnythingConfig::from_json(&read("config.json")?)?;
        let preprocessing = match dir.join("preprocessor_config.json").exists() {
            true => serde_json::from_str(&read("preprocessor_config.json")?).map_err(|e| {
                EngineError::InvalidConfig {
                    component: COMPONENT,
                    message: format!("preprocessor_config.json: {e}"),
                }
            })?,
            false => DepthPreprocessing::default(),
        };
        let mut vs = nn::VarStore::new(device);
        vs.set_kind(dtype.kind());
        let model = DepthAnything::new(vs.root(), &config)?;
        load_var_store(
            &mut vs,
            &[dir.join("model.safetensors")],
            &KeyMap::diffusers(Component::DepthEstimator),
            Component::DepthEstimator,
        )?;
        vs.freeze();
        Ok(DepthEstimator {
            model,
            preprocessing,
            _vs: vs,
            device,
            kind: dtype.kind(),
            path: dir.to_owned(),
        })
    }

    /// The model folder it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The model.
    pub fn model(&self) -> &DepthAnything {
        &self.model
    }

    /// The model's input for `image`: resized as transformers' processor does (PIL-style
    /// antialiased bicubic on 8-bit values), scaled to `[0, 1]` and normalised, `[1, 3, h, w]`
    /// on the model's device in its dtype.
    pub fn pixels(&self, image: &RgbImage) -> Result<Tensor> {
        let (width, height) = image.dimensions();
        if width == 0 || height == 0 {
            return Err(invalid_input("an empty image".to_owned()));
        }
        let p = &self.preprocessing;
        let (input_height, input_width) = p.input_size(i64::from(height), i64::from(width));
        let _no_grad = tch::no_grad_guard();
        let pixels = Tensor::from_slice(image.as_raw())
            .view([1, i64::from(height), i64::from(width), 3])
            .permute([0, 3, 1, 2])
            .to_kind(Kind::Float)
            .to_device(self.device);
        let resized = pixels
            .internal_upsample_bicubic2d_aa([input_height, input_width], false, None, None)
            .clamp(0.0, 255.0)
            .round();
        let mean = Tensor::from_slice(&p.image_mean)
            .to_kind(Kind::Float)
            .view([1, 3, 1, 1])
            .to_device(self.device);
        let std = Tensor::from_slice(&p.image_std)
            .to_kind(Kind::Float)
            .view([1, 3, 1, 1])
            .to_device(self.device);
        Ok(((resized / 255.0 - mean) / std).to_kind(self.kind))
    }

    /// The photo's depth map at the photo's size, normalised to `[0, 255]` (min-max; near is
    /// bright), what SDXL depth ControlNets take (as RGB with three equal channels).
    pub fn depth_map(&self, image: &RgbImage) -> Result<GrayImage> {
        let (width, height) = image.dimensions();
        let normalised = self.pixels(image)?;
        let _no_grad = tch::no_grad_guard();
        let depth = self.model.forward(&normalised)?.to_kind(Kind::Float);
        let full = depth
            .unsqueeze(1)
            .upsample_bicubic2d([i64::from(height), i64::from(width)], false, None, None)
            .squeeze_dim(1);
        let (low, high) = (full.min(), full.max());
        let range = (&high - &low).clamp_min(1e-6);
        let unit = ((full - low) / range).clamp(0.0, 1.0);
        let bytes = Vec::<u8>::try_from(
            (unit * 255.0)
                .round()
                .to_kind(Kind::Uint8)
                .to_device(Device::Cpu)
                .flatten(0, -1),
        )?;
        GrayImage::from_raw(width, height, bytes)
            .ok_or_else(|| invalid_input("the depth map has the wrong size".to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_sizes_follow_transformers() {
        let p = DepthPreprocessing::default();
        // 1024×768 landscape: the height's scale (0.674) is closer to 1 than the width's.
        assert_eq!(p.input_size(768, 1024), (518, 686));
        assert_eq!(p.input_size(518, 518), (518, 518));
        // Portrait 1152×896 (the portrait bucket).
        assert_eq!(p.input_size(1152, 896), (672, 518));
        // Tiny images never round to zero.
        assert_eq!(p.input_size(2, 2), (518, 518));
    }
}
