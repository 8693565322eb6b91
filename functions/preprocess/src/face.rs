//! Face detection: the SeetaFace frontal detector, run on a small greyscale copy.
//!
//! The detector is SeetaFace's Funnel-Structured cascade (FuSt: LAB boosted
//! classifiers, then SURF-feature MLPs; Wu et al., "Funnel-structured cascade for
//! multi-view face detection with alignment awareness", Neurocomputing 2017,
//! <https://arxiv.org/abs/1609.07304>) as ported to pure Rust by the `rustface` crate.
//! Its frontal model, `seeta_fd_frontal_v1.0.bin` (BSD-2-Clause, VIPL group, ICT,
//! Chinese Academy of Sciences), is committed under `models/` next to its licence and
//! embedded in the binary; its SHA-256 is checked before it is parsed
//! ([`MODEL_SHA256`]), so a wrong file is a [`PreprocessError::Model`], never a panic
//! inside the parser. Nothing is downloaded.
//!
//! The detector scans a 40-pixel window over an image pyramid, so the smallest face
//! it can see is 40 pixels in the image it is given. [`DetectorConfig`] turns that
//! into a size relative to the photo: the greyscale copy is scaled so that a face of
//! [`DetectorConfig::min_face_ratio`] of the shorter side is 40 pixels (never
//! enlarged, and at most [`DetectorConfig::max_detect_side`] on its longer side).
//! Boxes come back in the coordinates of the image as displayed, best score first.
//!
//! SeetaFace's detector gives boxes and scores only: no landmarks, so no eye line
//! (see [`crate::frame`] for what that means for `eyes_level`).

use std::sync::{Arc, OnceLock};

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::metadata::Orientation;
use image::{DynamicImage, GrayImage, RgbImage};
use rustface::{ImageData, Model};
use sha2::{Digest, Sha256};

use crate::PreprocessError;
use crate::canny::rgb_to_gray;

/// SHA-256 of `models/seeta_fd_frontal_v1.0.bin` as shipped in the `rustface` 0.1.7
/// crate package (hex, lower case).
pub const MODEL_SHA256: &str = "c4619d066ed35e84d9a8e842860b0dff567aba0cbb139881075538761db3ff5d";

/// The SeetaFace frontal model, embedded at build time.
static EMBEDDED_MODEL: &[u8] = include_bytes!("../models/seeta_fd_frontal_v1.0.bin");

/// The detector's window side in pixels (fixed by the model: `K_WND_SIZE` in SeetaFace).
pub const WINDOW: u32 = 40;

/// Detector settings. Plain data; `Default` gives the documented defaults.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DetectorConfig {
    /// Smallest face reported, as its box height over the image's shorter side, in
    /// (0, 1] (default 0.04: a 120-pixel face in a 3000-pixel-high photo). Smaller
    /// detections are dropped, so a crowd far behind the sitter does not count.
    pub min_face_ratio: f64,
    /// Longest side of the greyscale copy the detector scans, at least 64 (default
    /// 1024). Bounds the cost; when it binds, faces smaller than 40 pixels in the copy
    /// are missed even if `min_face_ratio` allows them.
    pub max_detect_side: u32,
    /// Lowest classifier score kept, > 0 (default 3.0). Measured on the test photos:
    /// clear frontal faces score 3.3–27 (the astronaut 25–27), partly hidden or turned
    /// ones 1–3, and the false detections seen (on a spacesuit) 0.6–2.2; SeetaFace's
    /// own example uses 2.0, `rustface`'s default is 3.85.
    pub score_threshold: f64,
    /// Ratio between pyramid levels, in [0.5, 0.95] (default 0.8, SeetaFace's).
    pub pyramid_scale: f32,
    /// Step of the sliding window in pixels, 1–16 (default 4, SeetaFace's).
    pub window_step: u32,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        Self {
            min_face_ratio: 0.04,
            max_detect_side: 1024,
            score_threshold: 3.0,
            pyramid_scale: 0.8,
            window_step: 4,
        }
    }
}

impl DetectorConfig {
    /// Checks every field's range.
    ///
    /// # Errors
    /// `InvalidConfig` naming the field.
    pub fn validate(&self) -> Result<(), PreprocessError> {
        let invalid = |message: String| Err(PreprocessError::InvalidConfig { message });
        if !(self.min_face_ratio > 0.0 && self.min_face_ratio <= 1.0) {
            return invalid(format!(
                "face detector min_face_ratio {} is not in (0, 1]",
                self.min_face_ratio
            ));
        }
        if self.max_detect_side < 64 {
            return invalid(format!(
                "face detector max_detect_side {} is under 64",
                self.max_detect_side
            ));
        }
        if !(self.score_threshold > 0.0 && self.score_threshold.is_finite()) {
            return invalid(format!(
                "face detector score_threshold {} is not a positive number",
                self.score_threshold
            ));
        }
        if !(0.5..=0.95).contains(&self.pyramid_scale) {
            return invalid(format!(
                "face detector pyramid_scale {} is not in [0.5, 0.95]",
                self.pyramid_scale
            ));
        }
        if !(1..=16).contains(&self.window_step) {
            return invalid(format!(
                "face detector window_step {} is not in 1–16",
                self.window_step
            ));
        }
        Ok(())
    }

    /// The factor (≤ 1) from a `width`×`height` image to the greyscale copy the
    /// detector scans: the smallest face of interest becomes one 40-pixel window,
    /// capped by `max_detect_side`.
    pub fn detection_scale(&self, width: u32, height: u32) -> f64 {
        let short = f64::from(width.min(height).max(1));
        let long = f64::from(width.max(height).max(1));
        let for_min_face = f64::from(WINDOW) / (self.min_face_ratio * short);
        let for_cost = f64::from(self.max_detect_side) / long;
        for_min_face.min(for_cost).min(1.0)
    }
}

/// A detected face: its box in pixels of the image as displayed (it may reach past
/// the edges for a face cut by the frame) and the classifier's score.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FaceBox {
    /// Left edge.
    pub x: f64,
    /// Top edge.
    pub y: f64,
    /// Width (SeetaFace boxes are square).
    pub width: f64,
    /// Height.
    pub height: f64,
    /// Classifier score; higher is surer (thresholded by
    /// [`DetectorConfig::score_threshold`]).
    pub score: f64,
}

impl FaceBox {
    /// The centre point, (x, y).
    pub fn centre(&self) -> (f64, f64) {
        (self.x + self.width / 2.0, self.y + self.height / 2.0)
    }
}

/// A face detector: the verified model and its settings. Cheap to clone; `Send` and
/// `Sync` (each call to [`FaceDetector::detect`] builds its own scanning state).
#[derive(Clone)]
pub struct FaceDetector {
    model: Arc<Model>,
    config: DetectorConfig,
}

impl std::fmt::Debug for FaceDetector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaceDetector")
            .field("model", &"seeta_fd_frontal_v1.0")
            .field("config", &self.config)
            .finish()
    }
}

/// Hex SHA-256 of `bytes`.
fn sha256_hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    Sha256::digest(bytes)
        .iter()
        .fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Verifies and parses model bytes.
fn load_model(bytes: &[u8]) -> Result<Model, PreprocessError> {
    let actual = sha256_hex(bytes);
    if actual != MODEL_SHA256 {
        return Err(PreprocessError::Model {
            message: format!(
                "face model checksum mismatch: SHA-256 {actual}, expected {MODEL_SHA256} \
                 (seeta_fd_frontal_v1.0.bin, {} bytes given)",
                bytes.len()
            ),
        });
    }
    rustface::read_model(bytes).map_err(|e| PreprocessError::Model {
        message: format!("face model does not parse: {e}"),
    })
}

impl FaceDetector {
    /// The detector with the embedded model (verified and parsed once per process).
    ///
    /// # Errors
    /// `InvalidConfig` for settings out of range; `Model` if the embedded model fails
    /// its checksum (a broken build).
    pub fn new(config: DetectorConfig) -> Result<Self, PreprocessError> {
        static EMBEDDED: OnceLock<Result<Arc<Model>, PreprocessError>> = OnceLock::new();
        config.validate()?;
        let model = EMBEDDED
            .get_or_init(|| load_model(EMBEDDED_MODEL).map(Arc::new))
            .clone()?;
        Ok(Self { model, config })
    }

    /// The detector with model bytes read from elsewhere (a file an operator
    /// installed). They must be exactly `seeta_fd_frontal_v1.0.bin` ([`MODEL_SHA256`]).
    ///
    /// # Errors
    /// `Model` for any other bytes; `InvalidConfig` for settings out of range.
    pub fn from_model_bytes(bytes: &[u8], config: DetectorConfig) -> Result<Self, PreprocessError> {
        config.validate()?;
        Ok(Self {
            model: Arc::new(load_model(bytes)?),
            config,
        })
    }

    /// The settings.
    pub fn config(&self) -> &DetectorConfig {
        &self.config
    }

    /// Faces in an upright image, best score first, in its pixel coordinates.
    ///
    /// # Errors
    /// `Internal` if the downscale fails.
    pub fn detect(&self, image: &RgbImage) -> Result<Vec<FaceBox>, PreprocessError> {
        self.detect_oriented(image, Orientation::NoTransforms, image.dimensions())
    }

    /// Faces in `stored` once `orientation` is applied, with boxes in the coordinates
    /// of an upright image of `upright_size` (the original's displayed size, when
    /// `stored` was decoded at a reduced scale). Only the small greyscale copy is
    /// turned upright.
    ///
    /// # Errors
    /// `Internal` if the downscale fails.
    pub fn detect_oriented(
        &self,
        stored: &RgbImage,
        orientation: Orientation,
        upright_size: (u32, u32),
    ) -> Result<Vec<FaceBox>, PreprocessError> {
        let (up_w, up_h) = upright_size;
        let scale = self.config.detection_scale(up_w, up_h);
        let (sw, sh) = stored.dimensions();
        let swaps = crate::decode::swaps_axes(orientation);
        // The copy's size in the stored frame: the upright target, axes swapped back.
        let target = |len: u32| ((f64::from(len) * scale).round() as u32).max(1);
        let (tw, th) = if swaps {
            (target(up_h), target(up_w))
        } else {
            (target(up_w), target(up_h))
        };
        let small = downscale(stored, tw.min(sw), th.min(sh))?;
        let gray = rgb_to_gray(&small);
        drop(small);
        let gray = if orientation == Orientation::NoTransforms {
            gray
        } else {
            let mut dynamic = DynamicImage::ImageLuma8(gray);
            dynamic.apply_orientation(orientation);
            dynamic.into_luma8()
        };
        let (gw, gh) = gray.dimensions();
        let raw = self.scan(&gray);
        let (fx, fy) = (
            f64::from(up_w) / f64::from(gw),
            f64::from(up_h) / f64::from(gh),
        );
        let min_height = self.config.min_face_ratio * f64::from(up_w.min(up_h));
        let mut faces: Vec<FaceBox> = raw
            .into_iter()
            .map(|f| FaceBox {
                x: f.x * fx,
                y: f.y * fy,
                width: f.width * fx,
                height: f.height * fy,
                score: f.score,
            })
            .filter(|f| f.height >= min_height)
            .collect();
        faces.sort_by(|a, b| b.score.total_cmp(&a.score));
        Ok(faces)
    }

    /// Runs the cascade on a greyscale image; boxes in its pixels.
    fn scan(&self, gray: &GrayImage) -> Vec<FaceBox> {
        let (w, h) = gray.dimensions();
        // Nothing to scan below one window (rustface would underflow its loop bound).
        if w <= WINDOW || h <= WINDOW {
            return Vec::new();
        }
        let mut detector = rustface::create_detector_with_model((*self.model).clone());
        // Every value below is in the range rustface accepts (validate() checked it).
        detector.set_min_face_size(WINDOW);
        detector.set_score_thresh(self.config.score_threshold);
        detector.set_pyramid_scale_factor(self.config.pyramid_scale);
        detector.set_slide_window_step(self.config.window_step, self.config.window_step);
        // rustface's pyramid stops at scale 40/min(side, max_face) and floors each
        // level's size; one pixel of margin keeps the last level above 40 px whatever
        // the float rounding (at exactly 40 its `width - 40` loop bound is fine, below
        // it underflows).
        detector.set_max_face_size(w.min(h) - 1);
        let data = ImageData::new(gray.as_raw(), w, h);
        detector
            .detect(&data)
            .into_iter()
            .map(|f| {
                let b = f.bbox();
                FaceBox {
                    x: f64::from(b.x()),
                    y: f64::from(b.y()),
                    width: f64::from(b.width()),
                    height: f64::from(b.height()),
                    score: f.score(),
                }
            })
            .collect()
    }
}

/// Resizes RGB with a bilinear convolution (antialiased when shrinking), or returns a
/// copy at the same size.
fn downscale(image: &RgbImage, width: u32, height: u32) -> Result<RgbImage, PreprocessError> {
    let internal = |e: &dyn std::fmt::Display| PreprocessError::Internal {
        message: format!("face detection downscale: {e}"),
    };
    let (sw, sh) = image.dimensions();
    if (sw, sh) == (width, height) {
        return Ok(image.clone());
    }
    let src = ImageRef::new(sw, sh, image.as_raw(), PixelType::U8x3).map_err(|e| internal(&e))?;
    let mut dst = Image::new(width, height, PixelType::U8x3);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    Resizer::new()
        .resize(&src, &mut dst, &options)
        .map_err(|e| internal(&e))?;
    RgbImage::from_raw(width, height, dst.into_vec())
        .ok_or_else(|| internal(&"buffer size mismatch"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_model_matches_its_checksum_and_parses() {
        assert_eq!(sha256_hex(EMBEDDED_MODEL), MODEL_SHA256);
        assert_eq!(EMBEDDED_MODEL.len(), 1_209_904);
        FaceDetector::new(DetectorConfig::default()).expect("embedded model loads");
    }

    #[test]
    fn a_wrong_model_file_is_a_typed_error() {
        let mut bytes = EMBEDDED_MODEL.to_vec();
        bytes[1000] ^= 1;
        let err = FaceDetector::from_model_bytes(&bytes, DetectorConfig::default())
            .expect_err("corrupt model");
        assert!(matches!(err, PreprocessError::Model { .. }), "{err:?}");
        assert_eq!(err.reason(), darkroom_events::FailureReason::ModelError);
        let err =
            FaceDetector::from_model_bytes(&EMBEDDED_MODEL[..4096], DetectorConfig::default())
                .expect_err("truncated model");
        assert!(matches!(err, PreprocessError::Model { .. }), "{err:?}");
        FaceDetector::from_model_bytes(EMBEDDED_MODEL, DetectorConfig::default())
            .expect("the right bytes load");
    }

    #[test]
    fn settings_out_of_range_are_refused_before_rustface_could_panic() {
        let bad = [
            DetectorConfig {
                min_face_ratio: 0.0,
                ..DetectorConfig::default()
            },
            DetectorConfig {
                score_threshold: 0.0,
                ..DetectorConfig::default()
            },
            DetectorConfig {
                pyramid_scale: 0.999,
                ..DetectorConfig::default()
            },
            DetectorConfig {
                window_step: 0,
                ..DetectorConfig::default()
            },
            DetectorConfig {
                max_detect_side: 10,
                ..DetectorConfig::default()
            },
        ];
        for config in bad {
            let err = FaceDetector::new(config).expect_err("invalid");
            assert!(
                matches!(err, PreprocessError::InvalidConfig { .. }),
                "{err:?}"
            );
        }
    }

    #[test]
    fn detection_scale_makes_the_smallest_face_one_window() {
        let config = DetectorConfig {
            min_face_ratio: 0.1,
            max_detect_side: 10_000,
            ..DetectorConfig::default()
        };
        // 3000 high: a 300-px face → 40 px.
        assert!((config.detection_scale(4000, 3000) - 40.0 / 300.0).abs() < 1e-12);
        // Never enlarged.
        assert_eq!(config.detection_scale(200, 100), 1.0);
        // The cost cap binds.
        let capped = DetectorConfig {
            max_detect_side: 500,
            ..config
        };
        assert!((capped.detection_scale(4000, 3000) - 500.0 / 4000.0).abs() < 1e-12);
    }

    #[test]
    fn tiny_and_flat_images_have_no_faces() {
        let detector = FaceDetector::new(DetectorConfig::default()).expect("detector");
        for (w, h) in [(1, 1), (40, 40), (41, 300), (300, 41)] {
            let image = RgbImage::from_pixel(w, h, image::Rgb([128, 128, 128]));
            assert!(
                detector.detect(&image).expect("detect").is_empty(),
                "{w}×{h}"
            );
        }
        let flat = RgbImage::from_pixel(640, 480, image::Rgb([200, 180, 160]));
        assert!(detector.detect(&flat).expect("detect").is_empty());
    }
}
