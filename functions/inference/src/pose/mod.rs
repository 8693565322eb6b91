//! Pose maps for OpenPose ControlNets: the OpenPose body model ("Realtime Multi-Person 2D Pose
//! Estimation using Part Affinity Fields", Cao et al., CVPR 2017; COCO's 18 parts) run the way
//! the annotator that drew those ControlNets' training images runs it (lllyasviel's, as in
//! `controlnet_aux`'s `OpenposeDetector`, body only).
//!
//! [`PoseEstimator::pose_map`] turns a photo into the control image: the photo is measured at a
//! detection size (short side 512, sides multiples of 64), the [`network`] reads it at 184 px
//! high (half its 368 px training box), its stride-8 maps are upsampled back to the detection
//! size, [`skeleton`] parses them into people, [`draw`] draws them on black at the detection
//! size, and that drawing is resized to the photo's size.
//!
//! Weights: the published `body_pose_model.pth` converted to safetensors with its tensor names
//! (pickles are never read: they can run code). CMU licenses those weights for non-commercial
//! use only; operators deploying pose presets commercially need their own licence or weights.

pub mod draw;
pub mod network;
pub mod skeleton;

use std::path::{Path, PathBuf};

use image::RgbImage;
use image::imageops::{self, FilterType};
use tch::{Device, Kind, Tensor, nn};

use crate::device::DType;
use crate::loader::{Component, KeyMap, load_var_store};
use crate::{EngineError, Result};
use draw::Keypoints;
use network::{BodyPoseNetwork, HEATMAP_CHANNELS, PAF_CHANNELS, STRIDE};
use skeleton::{PARTS, PartMaps};

const COMPONENT: &str = "pose estimator";

/// The weights file looked for when the model path is a folder.
pub const WEIGHTS_FILE: &str = "body_pose_model.safetensors";

/// The published weights' name (a pickle): found in a folder without [`WEIGHTS_FILE`], it is
/// refused with the command that converts it.
const PICKLED_WEIGHTS_FILE: &str = "body_pose_model.pth";

/// The short side of the detection size (the annotator's `detect_resolution`).
pub const DETECT_RESOLUTION: u32 = 512;

/// The longest detection side accepted (an aspect ratio of 8:1 at the 512 px short side): the
/// maps hold 57 floats per pixel of it, and a photo much longer than that is no portrait.
pub const MAX_DETECTION_SIDE: u32 = 4096;

/// The network's input height: half the 368 px box of its training (the annotator's single
/// scale, 0.5).
pub const NETWORK_HEIGHT: f64 = 184.0;

/// The detection size for a photo of `width × height`: scaled so the short side is
/// [`DETECT_RESOLUTION`], each side then rounded to a multiple of 64 (half to even, as numpy).
pub fn detection_size(width: u32, height: u32) -> (u32, u32) {
    let scale = f64::from(DETECT_RESOLUTION) / f64::from(width.min(height).max(1));
    let side = |value: u32| {
        let rounded = (f64::from(value) * scale / 64.0).round_ties_even() * 64.0;
        (rounded as u32).max(64)
    };
    (side(width), side(height))
}

/// The OpenPose body model, loaded.
#[derive(Debug)]
pub struct PoseEstimator {
    network: BodyPoseNetwork,
    _vs: nn::VarStore,
    device: Device,
    kind: Kind,
    path: PathBuf,
}

impl PoseEstimator {
    /// Loads the body model from `path`: a safetensors file, or a folder holding
    /// [`WEIGHTS_FILE`], onto `device` in `dtype`. Every tensor is checked before any is copied
    /// (a missing, unexpected, misshaped or truncated tensor is a typed error naming it).
    pub fn load(path: &Path, device: Device, dtype: DType) -> Result<Self> {
        let weights = if path.is_dir() {
            match path.join(PICKLED_WEIGHTS_FILE) {
                pickled if !path.join(WEIGHTS_FILE).exists() && pickled.exists() => pickled,
                _ => path.join(WEIGHTS_FILE),
            }
        } else {
            path.to_owned()
        };
        if weights
            .extension()
            .is_some_and(|ext| ["pth", "pt", "ckpt", "bin"].iter().any(|p| ext == *p))
        {
            return Err(EngineError::InvalidConfig {
                component: COMPONENT,
                message: format!(
                    "{} is a PyTorch pickle, which is never loaded (unpickling can run code); \
                     convert it once to safetensors: python -c \"import torch; from \
                     safetensors.torch import save_file; save_file(torch.load('{}', \
                     weights_only=True), '{}')\"",
                    weights.display(),
                    weights.display(),
                    weights.with_extension("safetensors").display()
                ),
            });
        }
        let mut vs = nn::VarStore::new(device);
        vs.set_kind(dtype.kind());
        let network = BodyPoseNetwork::new(&vs.root());
        load_var_store(
            &mut vs,
            std::slice::from_ref(&weights),
            &KeyMap::diffusers(Component::PoseEstimator),
            Component::PoseEstimator,
        )?;
        vs.freeze();
        Ok(PoseEstimator {
            network,
            _vs: vs,
            device,
            kind: dtype.kind(),
            path: weights,
        })
    }

    /// The weights file it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The network.
    pub fn network(&self) -> &BodyPoseNetwork {
        &self.network
    }

    /// The network's input for `image`: resized to [`NETWORK_HEIGHT`] (sides truncated, aspect
    /// kept), channels in BGR order, `value / 256 − 0.5`, padded right and down to multiples of
    /// the stride with mid-grey (0) — `[1, 3, H, W]` on the model's device in its dtype — and
    /// the resized size `(height, width)` before the padding.
    pub fn pixels(&self, image: &RgbImage) -> Result<(Tensor, (i64, i64))> {
        let (width, height) = image.dimensions();
        if width == 0 || height == 0 {
            return Err(invalid_input("an empty image".to_owned()));
        }
        let scale = NETWORK_HEIGHT / f64::from(height);
        let (new_width, new_height) = (
            ((f64::from(width) * scale) as u32).max(1),
            ((f64::from(height) * scale) as u32).max(1),
        );
        let resized = if (new_width, new_height) == (width, height) {
            image.clone()
        } else {
            // Area-like when shrinking, Lanczos when enlarging, as the annotator's OpenCV.
            let filter = if new_height < height {
                FilterType::Triangle
            } else {
                FilterType::Lanczos3
            };
            imageops::resize(image, new_width, new_height, filter)
        };
        let (h, w) = (i64::from(new_height), i64::from(new_width));
        let (padded_h, padded_w) = (round_up(h, STRIDE), round_up(w, STRIDE));
        let _no_grad = tch::no_grad_guard();
        let bgr = Tensor::from_slice(resized.as_raw())
            .view([1, h, w, 3])
            .flip([3])
            .permute([0, 3, 1, 2])
            .to_kind(Kind::Float)
            / 256.0
            - 0.5;
        let padded = bgr.constant_pad_nd([0, padded_w - w, 0, padded_h - h]);
        Ok((padded.to_device(self.device).to_kind(self.kind), (h, w)))
    }

    /// The network's maps for `image` at `image`'s own size: the stride-8 outputs upsampled
    /// to the padded input, the padding cut off, and resized to the image (both with OpenCV's
    /// Lanczos-4, as the annotator).
    pub fn maps(&self, image: &RgbImage) -> Result<PartMaps> {
        let (width, height) = image.dimensions();
        let (pixels, (h, w)) = self.pixels(image)?;
        let size = pixels.size();
        let (padded_h, padded_w) = (size[2], size[3]);
        let _no_grad = tch::no_grad_guard();
        let (fields, heatmaps) = self.network.forward(&pixels);
        let both = Tensor::cat(&[fields, heatmaps], 1).to_kind(Kind::Float);
        let upsampled = resize_lanczos4(&both, padded_h, padded_w)
            .narrow(2, 0, h)
            .narrow(3, 0, w);
        let full = resize_lanczos4(&upsampled, i64::from(height), i64::from(width));
        let values = Vec::<f32>::try_from(full.to_device(Device::Cpu).contiguous().flatten(0, -1))?;
        let plane = (width as usize) * (height as usize);
        let mut channels = values.chunks_exact(plane).map(<[f32]>::to_vec);
        let fields = channels.by_ref().take(PAF_CHANNELS as usize).collect();
        let heatmaps = channels.take(HEATMAP_CHANNELS as usize).collect();
        Ok(PartMaps {
            width: width as usize,
            height: height as usize,
            heatmaps,
            fields,
        })
    }

    /// The people in `image` (read at `image`'s own size), their parts as fractions of its
    /// width and height.
    pub fn detect(&self, image: &RgbImage) -> Result<Vec<Keypoints>> {
        let maps = self.maps(image)?;
        let (candidates, people) = skeleton::parse(&maps);
        let (width, height) = (maps.width as f64, maps.height as f64);
        Ok(people
            .iter()
            .map(|person| {
                let mut keypoints: Keypoints = [None; PARTS];
                for (keypoint, part) in keypoints.iter_mut().zip(person.parts) {
                    *keypoint = part.map(|index| {
                        let peak = candidates[index];
                        (peak.x as f64 / width, peak.y as f64 / height)
                    });
                }
                keypoints
            })
            .collect())
    }

    /// The people in `image`, found at its detection size ([`detection_size`]), their parts
    /// as fractions of the image's width and height.
    pub fn people(&self, image: &RgbImage) -> Result<Vec<Keypoints>> {
        let (width, height) = image.dimensions();
        if width == 0 || height == 0 {
            return Err(invalid_input("an empty image".to_owned()));
        }
        let (detect_width, detect_height) = detection_size(width, height);
        if detect_width.max(detect_height) > MAX_DETECTION_SIDE {
            return Err(invalid_input(format!(
                "a {width}×{height} image is too elongated to look for people in (its \
                 detection size {detect_width}×{detect_height} exceeds {MAX_DETECTION_SIDE} px)"
            )));
        }
        let filter = if detect_height < height {
            FilterType::Triangle
        } else {
            FilterType::Lanczos3
        };
        self.detect(&imageops::resize(
            image,
            detect_width,
            detect_height,
            filter,
        ))
    }

    /// The control image OpenPose ControlNets take for `image`, at `image`'s size.
    pub fn pose_map(&self, image: &RgbImage) -> Result<RgbImage> {
        let (width, height) = image.dimensions();
        Ok(pose_map_of(&self.people(image)?, width, height))
    }
}

/// The control image of `people` at `width × height`: drawn on black at the detection size
/// (where the annotator draws, so limbs have its thickness), then resized.
pub fn pose_map_of(people: &[Keypoints], width: u32, height: u32) -> RgbImage {
    let (detect_width, detect_height) = detection_size(width, height);
    let mut canvas = RgbImage::new(detect_width, detect_height);
    draw::draw_people(&mut canvas, people);
    imageops::resize(&canvas, width, height, FilterType::Triangle)
}

/// `maps` `[b, c, h, w]` resized to `height × width` with OpenCV's Lanczos-4 (8 taps, edges
/// clamped), as one matrix product per axis.
fn resize_lanczos4(maps: &Tensor, height: i64, width: i64) -> Tensor {
    let size = maps.size();
    let (h, w) = (size[2], size[3]);
    if (h, w) == (height, width) {
        return maps.shallow_clone();
    }
    let device = maps.device();
    let rows = lanczos4_matrix(h, height).to_device(device);
    let columns = lanczos4_matrix(w, width).to_device(device);
    rows.matmul(maps).matmul(&columns.tr())
}

/// The `[out, in]` matrix of a Lanczos-4 resize along one axis: output `o` reads around
/// `(o + ½)·in/out − ½`, each tap's weight OpenCV's (normalised to sum 1), edges clamped.
fn lanczos4_matrix(input: i64, output: i64) -> Tensor {
    let scale = input as f64 / output as f64;
    let mut weights = vec![0f32; (output * input) as usize];
    for o in 0..output {
        let position = (o as f64 + 0.5) * scale - 0.5;
        let start = position.floor();
        for (k, weight) in lanczos4_taps(position - start).into_iter().enumerate() {
            let source = (start as i64 - 3 + k as i64).clamp(0, input - 1);
            weights[(o * input + source) as usize] += weight;
        }
    }
    Tensor::from_slice(&weights).view([output, input])
}

/// The 8 Lanczos-4 weights for taps −3…4 around a point `fraction` past a sample (OpenCV's
/// `interpolateLanczos4`, in its float precision).
fn lanczos4_taps(fraction: f64) -> [f32; 8] {
    if fraction < f64::from(f32::EPSILON) {
        return [0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0];
    }
    use std::f64::consts::{FRAC_1_SQRT_2 as S45, PI};
    // sin(y0 + k·π/4)·… expanded: the (sin, cos) factors of each tap's phase.
    const PHASES: [(f64, f64); 8] = [
        (1.0, 0.0),
        (-S45, -S45),
        (0.0, 1.0),
        (S45, -S45),
        (-1.0, 0.0),
        (S45, S45),
        (0.0, -1.0),
        (-S45, S45),
    ];
    let y0 = -(fraction + 3.0) * PI * 0.25;
    let (s0, c0) = y0.sin_cos();
    let mut taps = [0f32; 8];
    let mut sum = 0f32;
    for (i, (tap, (a, b))) in taps.iter_mut().zip(PHASES).enumerate() {
        let y = -(fraction + 3.0 - i as f64) * PI * 0.25;
        *tap = ((a * s0 + b * c0) / (y * y)) as f32;
        sum += *tap;
    }
    let inverse = 1.0 / sum;
    taps.map(|tap| tap * inverse)
}

fn round_up(value: i64, multiple: i64) -> i64 {
    (value + multiple - 1) / multiple * multiple
}

fn invalid_input(message: String) -> EngineError {
    EngineError::InvalidInput {
        component: COMPONENT,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection_sizes_follow_the_annotator() {
        assert_eq!(detection_size(1024, 1024), (512, 512));
        // The portrait bucket 896×1152: 512 × 1152/896 = 658.3 → 640.
        assert_eq!(detection_size(896, 1152), (512, 640));
        assert_eq!(detection_size(1216, 832), (768, 512));
        assert_eq!(detection_size(1, 1), (512, 512));
    }

    #[test]
    fn lanczos_taps_sum_to_one_and_interpolate_samples() {
        for fraction in [0.0, 0.1, 0.4375, 0.5, 0.9] {
            let sum: f32 = lanczos4_taps(fraction).iter().sum();
            assert!((sum - 1.0).abs() < 1e-6, "{fraction}: {sum}");
        }
        assert_eq!(lanczos4_taps(0.0), [0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
        // The same size is the identity; a constant stays constant.
        let identity = lanczos4_matrix(5, 5);
        assert!(identity.allclose(&Tensor::eye(5, (Kind::Float, Device::Cpu)), 0.0, 0.0, false));
        let up = lanczos4_matrix(3, 24).sum_dim_intlist(1, false, Kind::Float);
        assert!(up.allclose(
            &Tensor::ones([24], (Kind::Float, Device::Cpu)),
            1e-6,
            1e-6,
            false
        ));
    }
}
