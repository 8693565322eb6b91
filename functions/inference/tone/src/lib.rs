//! Tone grading, the last step of an inference job: a preset's `[tone]` table applied to the
//! decoded picture, on the CPU, after the VAE decode.
//!
//! The steps, in order, each in its own module:
//!
//! 1. **Decode** 8-bit sRGB to linear light ([`transfer`]; a 256-entry table).
//! 2. **White balance** ([`adaptation`]): one 3×3 matrix on linear sRGB, a Bradford chromatic
//!    adaptation from the neutral 6500 K (D65) to the light of the chosen temperature and tint
//!    ([`white_point`]). Below 6500 K the picture looks **warmer** (a grey card turns
//!    yellowish), above it **cooler**; positive tint is **magenta**, negative **green**.
//! 3. **LUT**, optional ([`cube`]): a `.cube` 3D LUT in its own domain, i.e. on sRGB-encoded
//!    values, interpolated tetrahedrally.
//! 4. **Blend**: `strength` mixes the toned picture over the untoned one in linear light
//!    (0 leaves the picture alone, 1 is the full grade).
//! 5. **Encode** back to 8-bit sRGB, clamped.
//!
//! ```
//! use darkroom_tone::{ToneGrade, ToneSettings};
//! use image::RgbImage;
//!
//! let warm = ToneSettings { temperature_k: 5200.0, tint: 0.02, strength: 0.8 };
//! let grade = ToneGrade::new(&warm, None)?;
//! let mut picture = RgbImage::from_pixel(64, 64, image::Rgb([128, 128, 128]));
//! grade.apply(&mut picture);
//! let [red, _, blue] = picture.get_pixel(0, 0).0;
//! assert!(red > 128 && blue < 128);
//! # Ok::<(), darkroom_tone::ToneError>(())
//! ```
//!
//! The crate knows nothing of presets, events or the GPU: the worker builds [`ToneSettings`]
//! from the job's `render.tone`, loads the named LUT with [`CubeLut::load`] (once, and keeps
//! it), and calls [`ToneGrade::apply`].

use std::path::PathBuf;

pub mod adaptation;
pub mod cube;
mod grade;
pub mod transfer;
pub mod white_point;

pub use cube::{CubeLimits, CubeLut};
pub use grade::{ToneGrade, ToneSettings};

/// Errors of tone grading: settings out of range, and `.cube` files that cannot be used.
/// Line numbers count from 1.
#[derive(Debug, thiserror::Error)]
pub enum ToneError {
    /// A setting outside its range (or not a number).
    #[error("tone.{field} = {value} is outside {min}–{max}")]
    OutOfRange {
        /// The setting, as named in a preset (`temperature_k`, `tint`, `strength`).
        field: &'static str,
        /// Its value.
        value: f64,
        /// The lowest value allowed.
        min: f64,
        /// The highest value allowed.
        max: f64,
    },
    /// A LUT name that is not a plain file name (empty, with a path separator, or hidden).
    #[error("LUT name {name:?} is not a plain file name")]
    LutName {
        /// The name.
        name: String,
    },
    /// A LUT file that could not be read.
    #[error("cannot read LUT {path}: {source}")]
    LutIo {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A LUT file over [`CubeLimits::max_bytes`].
    #[error("LUT file is larger than the limit of {limit} bytes")]
    LutTooLarge {
        /// The limit, in bytes.
        limit: u64,
    },
    /// A LUT file that is not UTF-8 text.
    #[error("LUT line {line}: not UTF-8 text")]
    LutNotUtf8 {
        /// The line of the first invalid byte.
        line: usize,
    },
    /// A keyword the `.cube` format does not have (keywords are case-sensitive).
    #[error("LUT line {line}: unknown keyword {keyword:?}")]
    LutUnknownKeyword {
        /// The line.
        line: usize,
        /// The keyword (at most 40 characters of it).
        keyword: String,
    },
    /// A 1D LUT (`LUT_1D_SIZE`); only 3D LUTs are applied.
    #[error("LUT line {line}: 1D LUTs are not supported, only LUT_3D_SIZE")]
    LutOneDimensional {
        /// The line.
        line: usize,
    },
    /// A `LUT_3D_SIZE` outside 2 to [`CubeLimits::max_size`].
    #[error("LUT line {line}: LUT_3D_SIZE {size} is outside 2–{max}")]
    LutSize {
        /// The line.
        line: usize,
        /// The size given.
        size: u64,
        /// The largest size allowed.
        max: usize,
    },
    /// A token that should be a number (an integer for `LUT_3D_SIZE`) and is not.
    #[error("LUT line {line}: {token:?} is not a number")]
    LutNotANumber {
        /// The line.
        line: usize,
        /// The token (at most 40 characters of it).
        token: String,
    },
    /// A NaN or infinite value.
    #[error("LUT line {line}: {token:?} is not finite")]
    LutNotFinite {
        /// The line.
        line: usize,
        /// The token.
        token: String,
    },
    /// A `DOMAIN_MIN` that is not below its `DOMAIN_MAX`.
    #[error("LUT line {line}: the {channel} domain is empty ({min} to {max})")]
    LutEmptyDomain {
        /// The line of the later of the two keywords.
        line: usize,
        /// `red`, `green` or `blue`.
        channel: &'static str,
        /// The domain's lower end.
        min: f32,
        /// The domain's upper end.
        max: f32,
    },
    /// A line that breaks the format otherwise: the wrong number of values, a keyword given
    /// twice or after the table, table data before `LUT_3D_SIZE`, an unquoted title.
    #[error("LUT line {line}: {message}")]
    LutSyntax {
        /// The line.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// No `LUT_3D_SIZE` line.
    #[error("LUT has no LUT_3D_SIZE line")]
    LutMissingSize,
    /// More or fewer table lines than `LUT_3D_SIZE`³.
    #[error("LUT line {line}: expected {expected} table entries, found {found}")]
    LutEntryCount {
        /// The first extra line, or the last line of a short file.
        line: usize,
        /// `LUT_3D_SIZE`³.
        expected: usize,
        /// How many there are (for a long file: one more than expected).
        found: usize,
    },
}

impl ToneError {
    /// Whether trying again might succeed: only a read error other than a missing or
    /// forbidden file. Everything else is in the job or the file and fails the same way again.
    pub fn is_retryable(&self) -> bool {
        match self {
            ToneError::LutIo { source, .. } => !matches!(
                source.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
            ),
            _ => false,
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = ToneError> = std::result::Result<T, E>;
