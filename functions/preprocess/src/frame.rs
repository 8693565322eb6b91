//! Portrait framing: one face, centred and scaled, in a portrait bucket.
//!
//! For a preset with a `[face]` table, [`crate::prepare`] detects faces
//! ([`crate::face`]) on the upright image and, given exactly one, crops around it:
//!
//! - **Size**: the crop's height is the face box's height over
//!   [`FaceOptions::head_ratio`], so the box fills that fraction of the output height.
//! - **Position**: the face centre goes to the horizontal middle and to
//!   [`FaceOptions::centre_y`] of the height from the top (default 0.4: with a 0.35–0.4
//!   head ratio the box spans about 20–60 % of the height and the eyes, about a third
//!   of the way down a SeetaFace box, land near 33 % from the top, inside the
//!   30–50 % band ID-photo rules such as ICAO 9303 ask for).
//! - **Aspect**: the bucket is fixed, [`PORTRAIT_BUCKET`] by default: 896×1152, the
//!   SDXL bucket whose 7:9 aspect is the 35×45 mm passport photo's, whatever the
//!   upload's own aspect (a headshot from a landscape photo is still a portrait).
//! - **Clamping**: a crop larger than the image is shrunk (same aspect) to the largest
//!   that fits, so the face fills more than `head_ratio` ([`Framing::shrunk`]); a crop
//!   reaching past an edge is moved inside, so the face sits off the intended point
//!   ([`Framing::shifted`]). Nothing is padded or invented.
//! - **Resize**: Lanczos3 with `fast_image_resize`, cropping and resizing in one pass
//!   (sub-pixel crop edges are sampled exactly).
//!
//! **Eyes level**: the preset's `eyes_level` asks for a turn by the eye line "when
//! landmarks allow". SeetaFace's detector gives no landmarks, so no turn is made and
//! [`FaceOptions`] has no such switch; faces the frontal model finds are within about
//! ±15° of upright anyway.
//!
//! Decoding for this path: a JPEG is first decoded at the smallest DCT scale that
//! serves detection; once the crop is known, it is decoded again at the scale the
//! crop needs only if that first decode is too small for it.

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::RgbImage;
use image::metadata::Orientation;

use crate::bucket::Bucket;
use crate::decode::{self, Limits, Source};
use crate::face::{DetectorConfig, FaceBox, FaceDetector};
use crate::{PreprocessError, orient};

/// The default output size for a face preset: 896×1152 (7:9, the passport-photo aspect).
pub const PORTRAIT_BUCKET: Bucket = Bucket {
    width: 896,
    height: 1152,
};

/// Face detection and portrait framing, from a preset's `[face]` table
/// (`FaceFraming { required, head_ratio, .. }`) plus detector settings.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaceOptions {
    /// Exactly one face is needed: none fails with `NoFace`, several with
    /// `MultipleFaces`. When false, one face is framed and anything else gets the
    /// plain bucket crop (default true; the preset's `face.required`).
    pub required: bool,
    /// Face box height over output height, in (0, 1) (default 0.35; the preset's
    /// `face.head_ratio`).
    pub head_ratio: f64,
    /// Height of the face centre from the top, as a fraction of the output height,
    /// in (0, 1) (default 0.4).
    pub centre_y: f64,
    /// The output size (default [`PORTRAIT_BUCKET`]).
    pub bucket: Bucket,
    /// Detector settings (default [`DetectorConfig::default`]).
    pub detector: DetectorConfig,
}

impl Default for FaceOptions {
    fn default() -> Self {
        Self {
            required: true,
            head_ratio: 0.35,
            centre_y: 0.4,
            bucket: PORTRAIT_BUCKET,
            detector: DetectorConfig::default(),
        }
    }
}

impl FaceOptions {
    /// Checks every field's range (the detector's too).
    ///
    /// # Errors
    /// `InvalidConfig` naming the field.
    pub fn validate(&self) -> Result<(), PreprocessError> {
        let invalid = |message: String| Err(PreprocessError::InvalidConfig { message });
        if !(self.head_ratio > 0.0 && self.head_ratio < 1.0) {
            return invalid(format!(
                "face head_ratio {} is not in (0, 1)",
                self.head_ratio
            ));
        }
        if !(self.centre_y > 0.0 && self.centre_y < 1.0) {
            return invalid(format!("face centre_y {} is not in (0, 1)", self.centre_y));
        }
        let Bucket { width, height } = self.bucket;
        if !(1..=8192).contains(&width) || !(1..=8192).contains(&height) {
            return invalid(format!("face bucket {width}×{height} is not within 1–8192"));
        }
        self.detector.validate()
    }
}

/// An axis-aligned rectangle in pixels (fractional edges allowed).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Rect {
    /// Left edge.
    pub x: f64,
    /// Top edge.
    pub y: f64,
    /// Width.
    pub width: f64,
    /// Height.
    pub height: f64,
}

/// Where one face and the crop around it went.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Framing {
    /// The framed face, in pixels of the upright original.
    pub face: FaceBox,
    /// The region of the upright original that became the output.
    pub crop: Rect,
    /// The output size.
    pub bucket: Bucket,
    /// The face box in output pixels.
    pub face_in_output: Rect,
    /// Face box height over output height as achieved: the asked `head_ratio`, or
    /// more when [`Framing::shrunk`].
    pub head_ratio: f64,
    /// The image was too small for `head_ratio`: the crop is the largest of the
    /// bucket's aspect that fits in it.
    pub shrunk: bool,
    /// The crop was moved to stay inside the image, so the face is off the intended
    /// point (see [`Framing::face_in_output`]).
    pub shifted: bool,
    /// Output pixels per original pixel (above 1: the crop was enlarged).
    pub scale: f64,
}

/// What face detection found and did, reported by [`crate::Prepared`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FaceReport {
    /// Every face kept (score and size thresholds), best first, in pixels of the
    /// upright original.
    pub faces: Vec<FaceBox>,
    /// The framing, when exactly one face was found; `None` when the preset does not
    /// require a face and there were none or several (the plain bucket crop was used).
    pub framing: Option<Framing>,
}

/// The crop for `face` in a `width`×`height` upright image (see the module docs for
/// the rule).
///
/// # Errors
/// `InvalidConfig` for options out of range.
pub fn frame_face(
    width: u32,
    height: u32,
    face: &FaceBox,
    options: &FaceOptions,
) -> Result<Framing, PreprocessError> {
    options.validate()?;
    let (w, h) = (f64::from(width.max(1)), f64::from(height.max(1)));
    let bucket = options.bucket;
    let aspect = f64::from(bucket.width) / f64::from(bucket.height);
    let mut crop_h = face.height / options.head_ratio;
    let mut crop_w = crop_h * aspect;
    let fit = (w / crop_w).min(h / crop_h);
    let shrunk = fit < 1.0;
    if shrunk {
        crop_w *= fit;
        crop_h *= fit;
    }
    // Rounding may leave a shrunk side a hair over the image.
    crop_w = crop_w.min(w);
    crop_h = crop_h.min(h);
    let (cx, cy) = face.centre();
    let want_x = cx - crop_w / 2.0;
    let want_y = cy - options.centre_y * crop_h;
    let x = want_x.clamp(0.0, w - crop_w);
    let y = want_y.clamp(0.0, h - crop_h);
    // Half a pixel of the original is below what the output can show.
    let shifted = (x - want_x).abs() > 0.5 || (y - want_y).abs() > 0.5;
    let scale = f64::from(bucket.height) / crop_h;
    Ok(Framing {
        face: *face,
        crop: Rect {
            x,
            y,
            width: crop_w,
            height: crop_h,
        },
        bucket,
        face_in_output: Rect {
            x: (face.x - x) * scale,
            y: (face.y - y) * scale,
            width: face.width * scale,
            height: face.height * scale,
        },
        head_ratio: face.height / crop_h,
        shrunk,
        shifted,
        scale,
    })
}

/// Crops `crop` (clamped to the image) out of `image` and resizes it to exactly
/// `width`×`height` with Lanczos3.
///
/// # Errors
/// `Internal` if the resizer refuses (an empty crop, zero sizes).
pub fn render(
    image: &RgbImage,
    crop: Rect,
    width: u32,
    height: u32,
) -> Result<RgbImage, PreprocessError> {
    let internal = |e: &dyn std::fmt::Display| PreprocessError::Internal {
        message: format!("portrait resize: {e}"),
    };
    let (sw, sh) = image.dimensions();
    let (fw, fh) = (f64::from(sw), f64::from(sh));
    let x = crop.x.clamp(0.0, fw);
    let y = crop.y.clamp(0.0, fh);
    let cw = crop.width.min(fw - x);
    let ch = crop.height.min(fh - y);
    if !(cw > 0.0 && ch > 0.0) {
        return Err(internal(&format!("empty crop {crop:?} in {sw}×{sh}")));
    }
    let src = ImageRef::new(sw, sh, image.as_raw(), PixelType::U8x3).map_err(|e| internal(&e))?;
    let mut dst = Image::new(width, height, PixelType::U8x3);
    let options = ResizeOptions::new()
        .resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3))
        .crop(x, y, cw, ch);
    Resizer::new()
        .resize(&src, &mut dst, &options)
        .map_err(|e| internal(&e))?;
    RgbImage::from_raw(width, height, dst.into_vec())
        .ok_or_else(|| internal(&"buffer size mismatch"))
}

/// The region of a stored (not yet oriented) `stored_w`×`stored_h` image that
/// `orientation` turns into `rect` of the upright image.
pub fn upright_to_stored(
    rect: Rect,
    orientation: Orientation,
    stored_w: u32,
    stored_h: u32,
) -> Rect {
    let (w, h) = (f64::from(stored_w), f64::from(stored_h));
    // Upright point (u, v) → stored point (x, y), the inverse of what each
    // orientation does to the stored pixels.
    let to_stored = |u: f64, v: f64| match orientation {
        Orientation::NoTransforms => (u, v),
        Orientation::FlipHorizontal => (w - u, v),
        Orientation::Rotate180 => (w - u, h - v),
        Orientation::FlipVertical => (u, h - v),
        Orientation::Rotate90 => (v, h - u),
        Orientation::Rotate270 => (w - v, u),
        Orientation::Rotate90FlipH => (v, u),
        Orientation::Rotate270FlipH => (w - v, h - u),
    };
    let (x0, y0) = to_stored(rect.x, rect.y);
    let (x1, y1) = to_stored(rect.x + rect.width, rect.y + rect.height);
    Rect {
        x: x0.min(x1),
        y: y0.min(y1),
        width: (x1 - x0).abs(),
        height: (y1 - y0).abs(),
    }
}

/// The face path's outcome inside [`crate::prepare`].
pub(crate) enum Portrait {
    /// One face, framed: the upright output at `bucket` size.
    Framed { image: RgbImage, report: FaceReport },
    /// No face or several, and none required: the caller does the plain bucket crop.
    NotFramed { report: FaceReport },
}

/// Decode → detect on the upright image → frame → (re-decode if too small) → crop and
/// resize in the stored frame → orient.
pub(crate) fn portrait(
    bytes: &[u8],
    source: Source<'_>,
    options: &FaceOptions,
    limits: &Limits,
    disable_dct_scaling: bool,
) -> Result<Portrait, PreprocessError> {
    options.validate()?;
    let detector = FaceDetector::new(options.detector)?;
    let header = *source.header();
    let (up_w, up_h) = header.oriented_size();
    let swaps = decode::swaps_axes(header.orientation);
    let need = |scale: f64| {
        let side = |len: u32| ((f64::from(len) * scale).ceil() as u32).max(1);
        (!disable_dct_scaling).then(|| (side(header.width), side(header.height)))
    };
    let detect_scale = options.detector.detection_scale(up_w, up_h);
    let decoded = source.decode(need(detect_scale))?;
    let faces = detector.detect_oriented(&decoded, header.orientation, (up_w, up_h))?;
    let face = match faces.as_slice() {
        [one] => *one,
        [] if options.required => return Err(PreprocessError::NoFace),
        many if options.required => {
            return Err(PreprocessError::MultipleFaces { count: many.len() });
        }
        _ => {
            return Ok(Portrait::NotFramed {
                report: FaceReport {
                    faces,
                    framing: None,
                },
            });
        }
    };
    let framing = frame_face(up_w, up_h, &face, options)?;

    let (dw, dh) = decoded.dimensions();
    let decoded_scale =
        (f64::from(dw) / f64::from(header.width)).min(f64::from(dh) / f64::from(header.height));
    let reduced = dw < header.width || dh < header.height;
    let decoded = if reduced && decoded_scale < framing.scale {
        drop(decoded);
        decode::open(bytes, header.format, limits)?.decode(need(framing.scale))?
    } else {
        decoded
    };

    let (dw, dh) = decoded.dimensions();
    let (udw, udh) = if swaps { (dh, dw) } else { (dw, dh) };
    let (sx, sy) = (
        f64::from(udw) / f64::from(up_w),
        f64::from(udh) / f64::from(up_h),
    );
    let crop = framing.crop;
    let crop_upright = Rect {
        x: crop.x * sx,
        y: crop.y * sy,
        width: crop.width * sx,
        height: crop.height * sy,
    };
    let crop_stored = upright_to_stored(crop_upright, header.orientation, dw, dh);
    let bucket = framing.bucket;
    let (ow, oh) = if swaps {
        (bucket.height, bucket.width)
    } else {
        (bucket.width, bucket.height)
    };
    let framed = render(&decoded, crop_stored, ow, oh)?;
    drop(decoded);
    Ok(Portrait::Framed {
        image: orient::apply_orientation(framed, header.orientation),
        report: FaceReport {
            faces,
            framing: Some(framing),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn face(x: f64, y: f64, side: f64) -> FaceBox {
        FaceBox {
            x,
            y,
            width: side,
            height: side,
            score: 10.0,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn face_is_centred_at_the_asked_height_and_ratio() {
        let options = FaceOptions {
            head_ratio: 0.4,
            ..FaceOptions::default()
        };
        let f = frame_face(4000, 3000, &face(1900.0, 1000.0, 400.0), &options).expect("frame");
        // Crop 1000 high, 7:9 → 777.8 wide; centre (2100, 1200) at (0.5, 0.4).
        assert!(close(f.crop.height, 1000.0));
        assert!(close(f.crop.width, 1000.0 * 896.0 / 1152.0));
        assert!(close(f.crop.x + f.crop.width / 2.0, 2100.0));
        assert!(close(f.crop.y + 0.4 * f.crop.height, 1200.0));
        assert!(!f.shrunk && !f.shifted);
        assert!(close(f.head_ratio, 0.4));
        assert!(close(f.scale, 1.152));
        let out = f.face_in_output;
        assert!(close(out.height / 1152.0, 0.4));
        assert!(close((out.x + out.width / 2.0) / 896.0, 0.5));
        assert!(close((out.y + out.height / 2.0) / 1152.0, 0.4));
    }

    #[test]
    fn a_crop_past_the_edge_is_moved_inside_and_says_so() {
        let options = FaceOptions::default();
        // Face near the top-left corner.
        let f = frame_face(4000, 3000, &face(10.0, 20.0, 300.0), &options).expect("frame");
        assert!(f.shifted && !f.shrunk);
        assert_eq!((f.crop.x, f.crop.y), (0.0, 0.0));
        assert!(close(f.head_ratio, 0.35));
    }

    #[test]
    fn an_image_too_small_for_the_ratio_gives_the_largest_crop_that_fits() {
        let options = FaceOptions {
            head_ratio: 0.1,
            ..FaceOptions::default()
        };
        // Wants a 2000-high crop of a 1000×800 image: 7:9 fits 622×800.
        let f = frame_face(1000, 800, &face(450.0, 300.0, 200.0), &options).expect("frame");
        assert!(f.shrunk);
        assert!(close(f.crop.height, 800.0));
        assert!(close(f.crop.width, 800.0 * 896.0 / 1152.0));
        assert!(close(f.head_ratio, 0.25));
        assert!(f.crop.x >= 0.0 && f.crop.x + f.crop.width <= 1000.0 + 1e-9);
        // Horizontal centring still holds: there is room.
        assert!(close(f.crop.x + f.crop.width / 2.0, 550.0));
    }

    #[test]
    fn options_out_of_range_are_refused() {
        for options in [
            FaceOptions {
                head_ratio: 0.0,
                ..FaceOptions::default()
            },
            FaceOptions {
                head_ratio: 1.0,
                ..FaceOptions::default()
            },
            FaceOptions {
                centre_y: f64::NAN,
                ..FaceOptions::default()
            },
            FaceOptions {
                bucket: Bucket {
                    width: 0,
                    height: 1024,
                },
                ..FaceOptions::default()
            },
        ] {
            let err = frame_face(100, 100, &face(10.0, 10.0, 50.0), &options).expect_err("bad");
            assert!(
                matches!(err, PreprocessError::InvalidConfig { .. }),
                "{err:?}"
            );
        }
    }

    #[test]
    fn upright_rects_map_to_the_stored_pixels_for_all_eight_orientations() {
        let (w, h) = (7u32, 5u32);
        let stored = RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 0]));
        for orientation in [
            Orientation::NoTransforms,
            Orientation::FlipHorizontal,
            Orientation::Rotate180,
            Orientation::FlipVertical,
            Orientation::Rotate90,
            Orientation::Rotate270,
            Orientation::Rotate90FlipH,
            Orientation::Rotate270FlipH,
        ] {
            let upright = orient::apply_orientation(stored.clone(), orientation);
            let (uw, uh) = upright.dimensions();
            for (x, y, cw, ch) in [(0, 0, 1, 1), (1, 2, 3, 2), (uw - 2, uh - 1, 2, 1)] {
                let rect = Rect {
                    x: f64::from(x),
                    y: f64::from(y),
                    width: f64::from(cw),
                    height: f64::from(ch),
                };
                let s = upright_to_stored(rect, orientation, w, h);
                let part = image::imageops::crop_imm(
                    &stored,
                    s.x as u32,
                    s.y as u32,
                    s.width as u32,
                    s.height as u32,
                )
                .to_image();
                let expected = image::imageops::crop_imm(&upright, x, y, cw, ch).to_image();
                assert_eq!(
                    orient::apply_orientation(part, orientation).as_raw(),
                    expected.as_raw(),
                    "{orientation:?} {rect:?}"
                );
            }
        }
    }

    #[test]
    fn render_crops_then_resizes() {
        // Left half red, right half blue: a crop inside the right half is all blue
        // (the filter also reads a few pixels past the crop's edges, so keep clear).
        let image = RgbImage::from_fn(200, 100, |x, _| {
            image::Rgb(if x < 100 { [255, 0, 0] } else { [0, 0, 255] })
        });
        let crop = Rect {
            x: 120.0,
            y: 10.0,
            width: 60.0,
            height: 80.0,
        };
        let out = render(&image, crop, 64, 64).expect("render");
        assert_eq!(out.dimensions(), (64, 64));
        assert!(out.pixels().all(|p| p.0 == [0, 0, 255]));
        let empty = Rect { width: 0.0, ..crop };
        assert!(render(&image, empty, 64, 64).is_err());
    }
}
