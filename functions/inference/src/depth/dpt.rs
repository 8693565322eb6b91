//! The DPT neck and head of Depth Anything, after transformers'
//! `models/depth_anything/modeling_depth_anything.py` and "Vision Transformers for Dense
//! Prediction" (Ranftl et al., 2021, <https://arxiv.org/abs/2103.13413>): the backbone's token
//! grids reassembled into four feature maps at 4×, 2×, 1× and ½× the patch grid, fused coarse
//! to fine, and a convolutional head up to the input resolution.

use tch::Tensor;
use tch::nn::{self, Module};

use super::DepthAnythingConfig;
use crate::layers;
use crate::{EngineError, Result};

/// Spatial resampling of one reassembled map.
#[derive(Debug)]
enum Resize {
    /// Transposed convolution, kernel = stride = the factor.
    Up(nn::ConvTranspose2D),
    Identity,
    /// 3×3 convolution with stride `1 / factor`.
    Down(nn::Conv2D),
}

/// One token grid → a feature map: 1×1 projection, then the resize.
#[derive(Debug)]
struct ReassembleLayer {
    projection: nn::Conv2D,
    resize: Resize,
}

impl ReassembleLayer {
    fn new(path: nn::Path, input: i64, channels: i64, factor: f64) -> Result<Self> {
        let resize = if factor > 1.0 && factor.fract() == 0.0 {
            let k = factor as i64;
            Resize::Up(layers::conv_transpose2d(
                &path / "resize",
                channels,
                channels,
                k,
                k,
            ))
        } else if factor == 1.0 {
            Resize::Identity
        } else if factor > 0.0 && factor < 1.0 && (1.0 / factor).fract() == 0.0 {
            Resize::Down(layers::conv2d(
                &path / "resize",
                channels,
                channels,
                3,
                (1.0 / factor) as i64,
                1,
            ))
        } else {
            return Err(EngineError::InvalidConfig {
                component: "depth neck",
                message: format!("reassemble factor {factor} is not n or 1/n"),
            });
        };
        Ok(ReassembleLayer {
            projection: layers::conv2d(&path / "projection", input, channels, 1, 1, 0),
            resize,
        })
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let projected = self.projection.forward(xs);
        match &self.resize {
            Resize::Up(conv) => conv.forward(&projected),
            Resize::Identity => projected,
            Resize::Down(conv) => conv.forward(&projected),
        }
    }
}

/// ReLU → 3×3 conv → ReLU → 3×3 conv, plus the input.
#[derive(Debug)]
struct ResidualUnit {
    convolution1: nn::Conv2D,
    convolution2: nn::Conv2D,
}

impl ResidualUnit {
    fn new(path: nn::Path, features: i64) -> Self {
        ResidualUnit {
            convolution1: layers::conv2d(&path / "convolution1", features, features, 3, 1, 1),
            convolution2: layers::conv2d(&path / "convolution2", features, features, 3, 1, 1),
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let ys = self.convolution1.forward(&xs.relu());
        self.convolution2.forward(&ys.relu()) + xs
    }
}

/// Merges the coarser fused map with this level's map, refines, upsamples (bilinear, corners
/// aligned) to the next level's size (or 2×), then a 1×1 projection.
#[derive(Debug)]
struct FusionLayer {
    projection: nn::Conv2D,
    residual_layer1: ResidualUnit,
    residual_layer2: ResidualUnit,
}

impl FusionLayer {
    fn new(path: nn::Path, features: i64) -> Self {
        FusionLayer {
            projection: layers::conv2d(&path / "projection", features, features, 1, 1, 0),
            residual_layer1: ResidualUnit::new(&path / "residual_layer1", features),
            residual_layer2: ResidualUnit::new(&path / "residual_layer2", features),
        }
    }

    fn forward(&self, xs: &Tensor, residual: Option<&Tensor>, size: Option<[i64; 2]>) -> Tensor {
        let hidden = match residual {
            Some(residual) => {
                let residual = if residual.size() == xs.size() {
                    residual.shallow_clone()
                } else {
                    let [_, _, h, w] = size4(xs);
                    residual.upsample_bilinear2d([h, w], false, None, None)
                };
                xs + self.residual_layer1.forward(&residual)
            }
            None => xs.shallow_clone(),
        };
        let hidden = self.residual_layer2.forward(&hidden);
        let [_, _, h, w] = size4(&hidden);
        let target = size.unwrap_or([2 * h, 2 * w]);
        self.projection
            .forward(&hidden.upsample_bilinear2d(target, true, None, None))
    }
}

fn size4(xs: &Tensor) -> [i64; 4] {
    let size = xs.size();
    [size[0], size[1], size[2], size[3]]
}

/// transformers' `DepthAnythingNeck` (parameters under `neck.`).
#[derive(Debug)]
pub struct DptNeck {
    reassemble: Vec<ReassembleLayer>,
    convs: Vec<nn::Conv2D>,
    fusion: Vec<FusionLayer>,
}

impl DptNeck {
    /// Builds `reassemble_stage.layers.N`, `convs.N` and `fusion_stage.layers.N` under `path`.
    pub fn new(path: nn::Path, config: &DepthAnythingConfig) -> Result<Self> {
        let c = config;
        if c.neck_hidden_sizes.len() != c.reassemble_factors.len() {
            return Err(EngineError::InvalidConfig {
                component: "depth neck",
                message: format!(
                    "{} neck_hidden_sizes for {} reassemble_factors",
                    c.neck_hidden_sizes.len(),
                    c.reassemble_factors.len()
                ),
            });
        }
        let reassemble = (0_i64..)
            .zip(c.neck_hidden_sizes.iter().zip(&c.reassemble_factors))
            .map(|(i, (&channels, &factor))| {
                ReassembleLayer::new(
                    &path / "reassemble_stage" / "layers" / i,
                    c.reassemble_hidden_size,
                    channels,
                    factor,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let convs = (0_i64..)
            .zip(&c.neck_hidden_sizes)
            .map(|(i, &channels)| {
                layers::conv2d_no_bias(&path / "convs" / i, channels, c.fusion_hidden_size, 3, 1)
            })
            .collect();
        let fusion = (0..c.neck_hidden_sizes.len() as i64)
            .map(|i| FusionLayer::new(&path / "fusion_stage" / "layers" / i, c.fusion_hidden_size))
            .collect();
        Ok(DptNeck {
            reassemble,
            convs,
            fusion,
        })
    }

    /// The backbone's stages (`[b, 1 + rows·cols, hidden]` each) → the fused maps, coarsest
    /// first (as transformers returns them; the last is the finest, at 8× the patch grid).
    pub fn forward(&self, stages: &[Tensor], rows: i64, cols: i64) -> Vec<Tensor> {
        let features: Vec<Tensor> = stages
            .iter()
            .zip(self.reassemble.iter().zip(&self.convs))
            .map(|(stage, (reassemble, conv))| {
                let (batch, _, width) = stage.size3().unwrap_or((0, 0, 0));
                let grid = stage
                    .narrow(1, 1, rows * cols)
                    .reshape([batch, rows, cols, width])
                    .permute([0, 3, 1, 2])
                    .contiguous();
                conv.forward(&reassemble.forward(&grid))
            })
            .collect();
        let reversed: Vec<&Tensor> = features.iter().rev().collect();
        let mut fused: Vec<Tensor> = Vec::with_capacity(reversed.len());
        for (index, (map, layer)) in reversed.iter().zip(&self.fusion).enumerate() {
            let size = reversed.get(index + 1).map(|next| {
                let [_, _, h, w] = size4(next);
                [h, w]
            });
            let next = match fused.last() {
                None => layer.forward(map, None, size),
                Some(previous) => layer.forward(previous, Some(map), size),
            };
            fused.push(next);
        }
        fused
    }
}

/// transformers' `DepthAnythingDepthEstimationHead` (parameters under `head.`).
#[derive(Debug)]
pub struct DepthHead {
    conv1: nn::Conv2D,
    conv2: nn::Conv2D,
    conv3: nn::Conv2D,
    metric: bool,
    max_depth: f64,
    patch_size: i64,
    head_in_index: i64,
}

impl DepthHead {
    /// Builds `conv1`, `conv2`, `conv3` under `path`.
    pub fn new(path: nn::Path, config: &DepthAnythingConfig) -> Result<Self> {
        let c = config;
        let features = c.fusion_hidden_size;
        let metric = match c.depth_estimation_type.as_str() {
            "relative" => false,
            "metric" => true,
            other => {
                return Err(EngineError::InvalidConfig {
                    component: "depth head",
                    message: format!(
                        "depth_estimation_type {other:?} (expected relative or metric)"
                    ),
                });
            }
        };
        Ok(DepthHead {
            conv1: layers::conv2d(&path / "conv1", features, features / 2, 3, 1, 1),
            conv2: layers::conv2d(&path / "conv2", features / 2, c.head_hidden_size, 3, 1, 1),
            conv3: layers::conv2d(&path / "conv3", c.head_hidden_size, 1, 1, 1, 0),
            metric,
            max_depth: c.max_depth.unwrap_or(1.0),
            patch_size: c.patch_size,
            head_in_index: c.head_in_index,
        })
    }

    /// The fused maps → depth `[b, rows·patch, cols·patch]`.
    pub fn forward(&self, fused: &[Tensor], rows: i64, cols: i64) -> Result<Tensor> {
        let count = fused.len() as i64;
        let index = if self.head_in_index < 0 {
            count + self.head_in_index
        } else {
            self.head_in_index
        };
        let Some(map) = usize::try_from(index).ok().and_then(|i| fused.get(i)) else {
            return Err(EngineError::InvalidConfig {
                component: "depth head",
                message: format!("head_in_index {} of {count} maps", self.head_in_index),
            });
        };
        let hidden = self.conv1.forward(map).upsample_bilinear2d(
            [rows * self.patch_size, cols * self.patch_size],
            true,
            None,
            None,
        );
        let hidden = self.conv3.forward(&self.conv2.forward(&hidden).relu());
        let depth = if self.metric {
            hidden.sigmoid()
        } else {
            hidden.relu()
        } * self.max_depth;
        Ok(depth.squeeze_dim(1))
    }
}
