//! The OpenPose body network (the CMU "body_pose_model", COCO 18 parts): the first ten layers
//! of VGG-19 and two CPM layers give stride-8 features, then six stages refine two maps side by
//! side: branch L1 the 19 limbs' part affinity fields (38 channels, x and y per limb), branch L2
//! the 18 parts' heatmaps plus background (19 channels). Stages 2–6 read the previous stage's
//! two maps and the features.
//!
//! Parameter names are those of the published `body_pose_model.pth` (`conv1_1.weight`,
//! `Mconv7_stage6_L2.bias`, …).

use tch::{Tensor, nn};

use crate::layers::conv2d;

/// Part affinity field channels (x and y for each of 19 limbs).
pub const PAF_CHANNELS: i64 = 38;
/// Heatmap channels (18 parts and the background).
pub const HEATMAP_CHANNELS: i64 = 19;
/// Input pixels per output cell, along each side.
pub const STRIDE: i64 = 8;

const FEATURES: i64 = 128;
const STAGES: usize = 6;

/// A chain of convolutions, each followed by a ReLU but the last when `last_relu` is false.
#[derive(Debug)]
struct ConvChain {
    layers: Vec<nn::Conv2D>,
    last_relu: bool,
}

impl ConvChain {
    /// `(name, in, out, kernel)` with "same" padding.
    fn new(path: &nn::Path, layers: &[(String, i64, i64, i64)], last_relu: bool) -> Self {
        ConvChain {
            layers: layers
                .iter()
                .map(|(name, in_dim, out_dim, kernel)| {
                    conv2d(
                        path / name.as_str(),
                        *in_dim,
                        *out_dim,
                        *kernel,
                        1,
                        kernel / 2,
                    )
                })
                .collect(),
            last_relu,
        }
    }

    fn forward(&self, input: &Tensor) -> Tensor {
        let last = self.layers.len() - 1;
        let mut x = input.shallow_clone();
        for (i, layer) in self.layers.iter().enumerate() {
            x = x.apply(layer);
            if i < last || self.last_relu {
                x = x.relu();
            }
        }
        x
    }
}

/// The VGG-19 front (conv1_1 … conv4_2, three 2×2 max-pools) and the two CPM layers.
#[derive(Debug)]
struct Backbone {
    blocks: Vec<ConvChain>,
}

impl Backbone {
    fn new(path: &nn::Path) -> Self {
        let layer = |name: &str, in_dim, out_dim| (name.to_owned(), in_dim, out_dim, 3);
        let blocks = [
            vec![layer("conv1_1", 3, 64), layer("conv1_2", 64, 64)],
            vec![layer("conv2_1", 64, 128), layer("conv2_2", 128, 128)],
            vec![
                layer("conv3_1", 128, 256),
                layer("conv3_2", 256, 256),
                layer("conv3_3", 256, 256),
                layer("conv3_4", 256, 256),
            ],
            vec![
                layer("conv4_1", 256, 512),
                layer("conv4_2", 512, 512),
                layer("conv4_3_CPM", 512, 256),
                layer("conv4_4_CPM", 256, FEATURES),
            ],
        ];
        Backbone {
            blocks: blocks
                .iter()
                .map(|layers| ConvChain::new(path, layers, true))
                .collect(),
        }
    }

    fn forward(&self, pixels: &Tensor) -> Tensor {
        let mut x = pixels.shallow_clone();
        for (i, block) in self.blocks.iter().enumerate() {
            if i > 0 {
                x = x.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false);
            }
            x = block.forward(&x);
        }
        x
    }
}

/// One branch of one stage: L1 (affinity fields) or L2 (heatmaps).
fn branch(path: &nn::Path, stage: usize, branch: u8, out_dim: i64) -> ConvChain {
    let suffix = format!("L{branch}");
    let layers: Vec<(String, i64, i64, i64)> = if stage == 1 {
        vec![
            (format!("conv5_1_CPM_{suffix}"), FEATURES, 128, 3),
            (format!("conv5_2_CPM_{suffix}"), 128, 128, 3),
            (format!("conv5_3_CPM_{suffix}"), 128, 128, 3),
            (format!("conv5_4_CPM_{suffix}"), 128, 512, 1),
            (format!("conv5_5_CPM_{suffix}"), 512, out_dim, 1),
        ]
    } else {
        let input = PAF_CHANNELS + HEATMAP_CHANNELS + FEATURES;
        (1..=7)
            .map(|i| {
                let (in_dim, out_dim, kernel) = match i {
                    1 => (input, 128, 7),
                    2..=5 => (128, 128, 7),
                    6 => (128, 128, 1),
                    _ => (128, out_dim, 1),
                };
                (
                    format!("Mconv{i}_stage{stage}_{suffix}"),
                    in_dim,
                    out_dim,
                    kernel,
                )
            })
            .collect()
    };
    // The last stage's heatmaps go through a ReLU: the network the annotator (and so the
    // ControlNets' training images) ran lists `Mconv7_stage6_L1` twice among the layers without
    // one, and `Mconv7_stage6_L2` not at all.
    let last_relu = stage == STAGES && branch == 2;
    ConvChain::new(path, &layers, last_relu)
}

/// The body network.
#[derive(Debug)]
pub struct BodyPoseNetwork {
    backbone: Backbone,
    /// `(L1, L2)` of stage 1, from the features.
    first: (ConvChain, ConvChain),
    /// `(L1, L2)` of stages 2–6, from the previous maps and the features.
    refinements: Vec<(ConvChain, ConvChain)>,
}

impl BodyPoseNetwork {
    /// Builds the network's variables under `path` (the checkpoint's names, no prefix).
    pub fn new(path: &nn::Path) -> Self {
        let stage = |stage| {
            (
                branch(path, stage, 1, PAF_CHANNELS),
                branch(path, stage, 2, HEATMAP_CHANNELS),
            )
        };
        BodyPoseNetwork {
            backbone: Backbone::new(path),
            first: stage(1),
            refinements: (2..=STAGES).map(stage).collect(),
        }
    }

    /// Normalised BGR pixels `[b, 3, H, W]` (`value / 256 − 0.5`; sides multiples of
    /// [`STRIDE`]) → `(part affinity fields [b, 38, H/8, W/8], heatmaps [b, 19, H/8, W/8])`.
    pub fn forward(&self, pixels: &Tensor) -> (Tensor, Tensor) {
        let _no_grad = tch::no_grad_guard();
        let features = self.backbone.forward(pixels);
        let (l1, l2) = &self.first;
        let mut maps = (l1.forward(&features), l2.forward(&features));
        for (l1, l2) in &self.refinements {
            let input = Tensor::cat(&[&maps.0, &maps.1, &features], 1);
            maps = (l1.forward(&input), l2.forward(&input));
        }
        maps
    }
}
