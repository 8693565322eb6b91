//! Darkroom preprocess: an untrusted upload in, a clean SDXL-ready job out.
//!
//! **The image pipeline** is pure functions over bytes and images, one module per step, in
//! pipeline order:
//!
//! 1. [`sniff`](mod@sniff): the real format from magic bytes, against an allow-list;
//! 2. [`decode`]: header-first limits, then a decode to RGB8 (JPEG at a reduced DCT
//!    scale when the bucket is much smaller), with [`color`] converting an embedded
//!    non-sRGB colour profile to sRGB;
//! 3. [`bucket`]: cover-crop and resize to the nearest SDXL bucket;
//! 4. [`orient`]: EXIF orientation, applied after the downscale;
//! 5. [`canny`]: the OpenCV-exact canny control map.
//!
//! For presets with a face ([`PrepareOptions::face`]), step 3 is replaced by
//! [`face`] and [`frame`]:
//!
//! - **Detect**: the SeetaFace frontal detector (pure Rust via `rustface`, BSD-2
//!   model committed under `models/`, SHA-256 checked before parsing) scans a small
//!   greyscale copy turned upright; boxes come back in pixels of the upright original.
//!   Faces under [`face::DetectorConfig::min_face_ratio`] of the shorter side or under
//!   the score threshold do not count.
//! - **Decide**: exactly one face is framed. None fails with [`PreprocessError::NoFace`]
//!   (`no_face_found`) and several with [`PreprocessError::MultipleFaces`]
//!   (`multiple_faces`) when the preset requires a face; otherwise the plain bucket
//!   crop is used.
//! - **Frame**: the face centred horizontally, its centre at 40 % of the height, its
//!   box `head_ratio` of the height, in the 896×1152 portrait bucket (7:9, the
//!   passport aspect); shrunk or shifted to stay inside the image, and
//!   [`Prepared::face`] says so. No eye-line turn: the detector gives no landmarks.
//! - **Resolution**: a JPEG is decoded at the DCT scale detection needs, and again
//!   at a larger one only when the crop needs more pixels than that.
//!
//! The canny map is computed on the framed output. Without face options the detector
//! is never run and nothing above costs anything.
//!
//! [`prepare`] composes them. Every output is a fresh pixel buffer: nothing of the
//! upload's metadata (EXIF, GPS, XMP, ICC, text chunks) is carried, and stored
//! artefacts are PNGs re-encoded from those pixels alone by [`encode_png`], which
//! writes no ancillary chunks.
//!
//! **The function** wraps it (the crate's `README.md` has the operator's view):
//!
//! - `darkroom_shared::fetch`: HEAD and a capped, streamed GET from S3;
//! - [`job`]: preset resolution, pipeline options, the files and the `InferenceJob`;
//! - [`handler`]: the shared `Handler` for S3 upload events (NATS loop and Lambda alike);
//! - [`service`]: connecting and running it; [`local`]: the same on a local file;
//! - [`config`]: `PreprocessConfig`, read from `DARKROOM_*` variables.

pub mod bucket;
pub mod canny;
pub mod color;
pub mod config;
pub mod decode;
pub mod face;
pub mod frame;
pub mod handler;
pub mod job;
pub mod local;
pub mod orient;
pub mod service;
pub mod sniff;

use darkroom_events::FailureReason;
use image::RgbImage;

pub use bucket::{Bucket, SDXL_BUCKETS, cover_min_size, fit_to_bucket, nearest_bucket};
pub use canny::CannyOptions;
pub use decode::{Header, Limits};
pub use face::{DetectorConfig, FaceBox, FaceDetector};
pub use frame::{FaceOptions, FaceReport, Framing, PORTRAIT_BUCKET};
pub use image::metadata::Orientation;
pub use sniff::{SourceFormat, sniff};

/// Why an upload was refused. Every variant is permanent: the same bytes fail the
/// same way on every delivery, so the message is terminated, never retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PreprocessError {
    /// The file is larger than [`Limits::max_bytes`].
    #[error("upload is {len} bytes, over the {max_bytes}-byte limit")]
    TooManyBytes {
        /// Size of the upload.
        len: usize,
        /// The limit.
        max_bytes: usize,
    },
    /// The bytes are not an allowed image format.
    #[error("unsupported format: {detected} (accepted: JPEG, PNG, WebP)")]
    UnsupportedFormat {
        /// What the magic bytes look like (`"empty"`, `"svg"`, `"heic"`, `"unknown"`…).
        detected: &'static str,
    },
    /// Width × height over [`Limits::max_pixels`], from the header.
    #[error("image is {width}×{height}, over the {max_pixels}-pixel limit")]
    TooLarge {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// The limit.
        max_pixels: u64,
    },
    /// A side over [`Limits::max_side`], from the header.
    #[error("image is {width}×{height}, a side over the {max_side}-pixel limit")]
    SideTooLong {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// The limit.
        max_side: u32,
    },
    /// A decoder would allocate more than [`Limits::max_alloc`].
    #[error("decoding would exceed the allocation limit: {message}")]
    AllocationLimit {
        /// The decoder's account.
        message: String,
    },
    /// The data is corrupt or truncated.
    #[error("could not decode {format}: {message}")]
    DecodeFailed {
        /// The sniffed format.
        format: &'static str,
        /// The decoder's account.
        message: String,
    },
    /// The preset needs a face and the detector found none.
    #[error("no face found")]
    NoFace,
    /// The preset needs exactly one face and the detector found several.
    #[error("{count} faces found, the preset needs exactly one")]
    MultipleFaces {
        /// How many.
        count: usize,
    },
    /// The face detection model is missing or not the expected file.
    #[error("face model: {message}")]
    Model {
        /// What is wrong with it.
        message: String,
    },
    /// Options out of range (an operator's or preset's mistake, not the upload's).
    #[error("invalid options: {message}")]
    InvalidConfig {
        /// Which option and why.
        message: String,
    },
    /// A bug or an impossible condition.
    #[error("internal error: {message}")]
    Internal {
        /// What went wrong.
        message: String,
    },
}

impl PreprocessError {
    /// The reason code of the `failed` event this error produces.
    pub fn reason(&self) -> FailureReason {
        match self {
            Self::TooManyBytes { .. }
            | Self::TooLarge { .. }
            | Self::SideTooLong { .. }
            | Self::AllocationLimit { .. } => FailureReason::LimitExceeded,
            Self::UnsupportedFormat { .. } => FailureReason::UnsupportedFormat,
            Self::DecodeFailed { .. } => FailureReason::DecodeFailed,
            Self::NoFace => FailureReason::NoFaceFound,
            Self::MultipleFaces { .. } => FailureReason::MultipleFaces,
            Self::Model { .. } => FailureReason::ModelError,
            Self::InvalidConfig { .. } | Self::Internal { .. } => FailureReason::Internal,
        }
    }

    /// Always true: see the type's documentation.
    pub fn is_permanent(&self) -> bool {
        true
    }
}

/// Crate result alias.
pub type Result<T, E = PreprocessError> = std::result::Result<T, E>;

/// What [`prepare`] does besides framing.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PrepareOptions {
    /// Size limits for the upload.
    pub limits: Limits,
    /// Compute a canny control map with these parameters; `None` for no map.
    pub canny: Option<CannyOptions>,
    /// Turn off JPEG decoding at a reduced DCT scale (on by default: used when the
    /// bucket needs at most half the stored resolution).
    pub disable_dct_scaling: bool,
    /// Frame to this size (upright) instead of the SDXL bucket nearest the upload's aspect
    /// ratio: a preset's fixed `resolution`.
    pub size: Option<Bucket>,
    /// Detect faces and frame the one face ([`frame`]); `None` (the default) for
    /// presets without a `[face]` table: no detection at all.
    pub face: Option<FaceOptions>,
}

/// The pipeline's output.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    /// The upright image at its SDXL bucket size.
    pub image: RgbImage,
    /// The canny control map at the same size, if asked for.
    pub canny: Option<RgbImage>,
    /// The sniffed format.
    pub source_format: SourceFormat,
    /// The upload's size as displayed (after EXIF orientation).
    pub original_width: u32,
    /// See `original_width`.
    pub original_height: u32,
    /// The EXIF orientation that was applied.
    pub orientation: Orientation,
    /// The bucket the image was framed to.
    pub bucket: Bucket,
    /// What face detection found and where the face went; `None` when
    /// [`PrepareOptions::face`] was not set.
    pub face: Option<FaceReport>,
}

/// Sniff → header limits → decode (DCT-scaled) → frame to bucket (or, with
/// [`PrepareOptions::face`], detect and frame the face) → orient → canny.
///
/// # Errors
/// Any [`PreprocessError`]; all are permanent.
pub fn prepare(bytes: &[u8], options: &PrepareOptions) -> Result<Prepared> {
    if bytes.len() > options.limits.max_bytes {
        return Err(PreprocessError::TooManyBytes {
            len: bytes.len(),
            max_bytes: options.limits.max_bytes,
        });
    }
    let format = sniff(bytes)?;
    let source = decode::open(bytes, format, &options.limits)?;
    let header = *source.header();
    let (width, height) = header.oriented_size();
    let mut face = None;
    let source = match &options.face {
        None => source,
        Some(face_options) => match frame::portrait(
            bytes,
            source,
            face_options,
            &options.limits,
            options.disable_dct_scaling,
        )? {
            frame::Portrait::Framed { image, report } => {
                let canny = options.canny.map(|c| canny::canny(&image, &c));
                return Ok(Prepared {
                    image,
                    canny,
                    source_format: format,
                    original_width: width,
                    original_height: height,
                    orientation: header.orientation,
                    bucket: face_options.bucket,
                    face: Some(report),
                });
            }
            // Not required and not exactly one face: the plain crop, decoded afresh
            // at the scale it needs.
            frame::Portrait::NotFramed { report } => {
                face = Some(report);
                decode::open(bytes, format, &options.limits)?
            }
        },
    };
    let bucket = options
        .size
        .unwrap_or_else(|| nearest_bucket(width, height));
    // Framing runs before orientation, in the stored frame: a 90° turn swaps the sides.
    let (stored_w, stored_h) = if decode::swaps_axes(header.orientation) {
        (bucket.height, bucket.width)
    } else {
        (bucket.width, bucket.height)
    };
    let min_size = if options.disable_dct_scaling {
        None
    } else {
        // The whole decoded image must cover the bucket after the cover-crop.
        Some(bucket::cover_min_size(
            header.width,
            header.height,
            stored_w,
            stored_h,
        ))
    };
    let decoded = source.decode(min_size)?;
    let framed = bucket::fit_to_size(&decoded, stored_w, stored_h)?;
    drop(decoded);
    let image = orient::apply_orientation(framed, header.orientation);
    let canny = options.canny.map(|c| canny::canny(&image, &c));
    Ok(Prepared {
        image,
        canny,
        source_format: format,
        original_width: width,
        original_height: height,
        orientation: header.orientation,
        bucket,
        face,
    })
}

pub use darkroom_shared::png::encode_png;
