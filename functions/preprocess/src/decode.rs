//! Step 2: decode under limits.
//!
//! [`open`] reads only the header and checks the byte, side and pixel limits before
//! anything the size of the image is allocated, so a few-KB file declaring
//! 60000×60000 is refused without decoding. [`Source::decode`] then decodes to RGB8,
//! with `image::Limits` (or `jpeg-decoder`'s buffer limit) as a second guard.
//!
//! JPEG goes through `jpeg-decoder` because it can run the inverse DCT at 1/2, 1/4 or
//! 1/8 scale (`Decoder::scale`), which `image`'s zune-jpeg backend cannot: a 12 MP
//! photo bound for a 1 MP bucket decodes at 1/2 or 1/4 of the cost. PNG and WebP use
//! the `image` decoders. An animated WebP decodes to its first frame. High-precision
//! (12/16-bit lossless) JPEG is refused as `DecodeFailed`.
//!
//! An embedded ICC profile is read with the header and applied right after decoding
//! ([`crate::color`]), so every later step sees sRGB pixels.

use std::io::Cursor;

use image::codecs::png::PngDecoder;
use image::codecs::webp::WebPDecoder;
use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageError, RgbImage};

use crate::{PreprocessError, SourceFormat};

/// Size limits for an upload. Checked from the header, before decoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted file, in bytes.
    pub max_bytes: usize,
    /// Largest accepted width × height.
    pub max_pixels: u64,
    /// Largest accepted width or height.
    pub max_side: u32,
    /// Largest single allocation a decoder may make, in bytes.
    pub max_alloc: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bytes: 40 * 1024 * 1024,
            max_pixels: 50_000_000,
            max_side: 16_384,
            // 50 MP of 16-bit RGBA is 400 MB; nothing legal needs more.
            max_alloc: 512 * 1024 * 1024,
        }
    }
}

/// What the header says about an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The sniffed format.
    pub format: SourceFormat,
    /// Width as stored (before EXIF orientation).
    pub width: u32,
    /// Height as stored (before EXIF orientation).
    pub height: u32,
    /// The EXIF orientation, `NoTransforms` when absent or invalid.
    pub orientation: Orientation,
}

impl Header {
    /// Width and height as displayed, after EXIF orientation.
    pub fn oriented_size(&self) -> (u32, u32) {
        if swaps_axes(self.orientation) {
            (self.height, self.width)
        } else {
            (self.width, self.height)
        }
    }
}

/// Whether an orientation turns the image by 90° (so width and height trade places).
pub(crate) fn swaps_axes(orientation: Orientation) -> bool {
    matches!(
        orientation,
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    )
}

enum Inner<'a> {
    Jpeg(Box<jpeg_decoder::Decoder<&'a [u8]>>),
    Png(Box<PngDecoder<Cursor<&'a [u8]>>>),
    Webp(Box<WebPDecoder<Cursor<&'a [u8]>>>),
}

/// An upload whose header has been read and passed the limits.
pub struct Source<'a> {
    header: Header,
    limits: Limits,
    icc_profile: Option<Vec<u8>>,
    inner: Inner<'a>,
}

/// Reads the header of `bytes` (already sniffed as `format`) and checks `limits`.
///
/// # Errors
/// `TooManyBytes`, `TooLarge`, `SideTooLong` over a limit; `DecodeFailed` for a
/// header that does not parse.
pub fn open<'a>(
    bytes: &'a [u8],
    format: SourceFormat,
    limits: &Limits,
) -> Result<Source<'a>, PreprocessError> {
    if bytes.len() > limits.max_bytes {
        return Err(PreprocessError::TooManyBytes {
            len: bytes.len(),
            max_bytes: limits.max_bytes,
        });
    }
    let failed = |e: &dyn std::fmt::Display| PreprocessError::DecodeFailed {
        format: format.name(),
        message: e.to_string(),
    };
    let (inner, width, height, orientation, icc_profile) = match format {
        SourceFormat::Jpeg => {
            let mut dec = jpeg_decoder::Decoder::new(bytes);
            dec.set_max_decoding_buffer_size(
                usize::try_from(limits.max_alloc).unwrap_or(usize::MAX),
            );
            dec.read_info().map_err(|e| failed(&e))?;
            let info = dec.info().ok_or_else(|| failed(&"no frame header"))?;
            // APP1 (EXIF) precedes the frame header, so read_info has seen it.
            let orientation = dec
                .exif_data()
                .and_then(Orientation::from_exif_chunk)
                .unwrap_or(Orientation::NoTransforms);
            let (w, h) = (u32::from(info.width), u32::from(info.height));
            // APP2 (ICC) segments precede the frame header too.
            let icc = dec.icc_profile();
            (Inner::Jpeg(Box::new(dec)), w, h, orientation, icc)
        }
        SourceFormat::Png => {
            let mut dec = PngDecoder::with_limits(Cursor::new(bytes), image_limits(limits))
                .map_err(|e| map_image_error(format, e))?;
            let (w, h) = dec.dimensions();
            let orientation = dec.orientation().unwrap_or(Orientation::NoTransforms);
            let icc = dec.icc_profile().ok().flatten();
            (Inner::Png(Box::new(dec)), w, h, orientation, icc)
        }
        SourceFormat::Webp => {
            let mut dec =
                WebPDecoder::new(Cursor::new(bytes)).map_err(|e| map_image_error(format, e))?;
            let (w, h) = dec.dimensions();
            let orientation = dec.orientation().unwrap_or(Orientation::NoTransforms);
            let icc = dec.icc_profile().ok().flatten();
            (Inner::Webp(Box::new(dec)), w, h, orientation, icc)
        }
    };
    check_size(width, height, limits, format)?;
    Ok(Source {
        header: Header {
            format,
            width,
            height,
            orientation,
        },
        limits: limits.clone(),
        icc_profile,
        inner,
    })
}

fn check_size(
    width: u32,
    height: u32,
    limits: &Limits,
    format: SourceFormat,
) -> Result<(), PreprocessError> {
    if width == 0 || height == 0 {
        return Err(PreprocessError::DecodeFailed {
            format: format.name(),
            message: format!("empty image ({width}×{height})"),
        });
    }
    if width > limits.max_side || height > limits.max_side {
        return Err(PreprocessError::SideTooLong {
            width,
            height,
            max_side: limits.max_side,
        });
    }
    if u64::from(width) * u64::from(height) > limits.max_pixels {
        return Err(PreprocessError::TooLarge {
            width,
            height,
            max_pixels: limits.max_pixels,
        });
    }
    Ok(())
}

/// The `image` crate's limits: allocations only. Sides and pixels are checked by
/// [`check_size`] from the header, which gives the typed error.
fn image_limits(limits: &Limits) -> image::Limits {
    let mut l = image::Limits::default();
    l.max_alloc = Some(limits.max_alloc);
    l
}

fn map_image_error(format: SourceFormat, e: ImageError) -> PreprocessError {
    match e {
        ImageError::Limits(e) => PreprocessError::AllocationLimit {
            message: e.to_string(),
        },
        e => PreprocessError::DecodeFailed {
            format: format.name(),
            message: e.to_string(),
        },
    }
}

impl Source<'_> {
    /// The header read by [`open`].
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The embedded ICC profile, if any.
    pub fn icc_profile(&self) -> Option<&[u8]> {
        self.icc_profile.as_deref()
    }

    /// Decodes to RGB8, as stored (EXIF orientation not applied).
    ///
    /// `min_size` (stored orientation) lets a JPEG decode at the smallest DCT scale
    /// (1/8, 1/4, 1/2) that still covers that size on both axes. Alpha is composited
    /// over white; 16-bit, grey, palette and CMYK sources become RGB8. An embedded RGB
    /// colour profile is converted to sRGB ([`crate::color::to_srgb`]); CMYK JPEGs keep
    /// their naive conversion whatever profile they carry.
    ///
    /// # Errors
    /// `DecodeFailed` for corrupt or truncated data, `AllocationLimit` when a decoder
    /// would exceed `Limits::max_alloc`.
    pub fn decode(self, min_size: Option<(u32, u32)>) -> Result<RgbImage, PreprocessError> {
        let format = self.header.format;
        let (mut image, cmyk) = match self.inner {
            Inner::Jpeg(dec) => decode_jpeg(*dec, &self.header, min_size)?,
            Inner::Png(dec) => (
                to_rgb8(DynamicImage::from_decoder(*dec).map_err(|e| map_image_error(format, e))?),
                false,
            ),
            Inner::Webp(mut dec) => {
                let _ = dec.set_limits(image_limits(&self.limits));
                (
                    to_rgb8(
                        DynamicImage::from_decoder(*dec).map_err(|e| map_image_error(format, e))?,
                    ),
                    false,
                )
            }
        };
        if let Some(icc) = &self.icc_profile
            && !cmyk
        {
            crate::color::to_srgb(&mut image, icc);
        }
        Ok(image)
    }
}

/// Smallest `jpeg-decoder` output size at `scale`/8 (its rounding: ceil).
fn dct_scaled(len: u32, scale: u32) -> u32 {
    (len * scale).div_ceil(8)
}

/// Decodes a JPEG to RGB8; the flag says whether it was stored as CMYK.
fn decode_jpeg(
    mut dec: jpeg_decoder::Decoder<&[u8]>,
    header: &Header,
    min_size: Option<(u32, u32)>,
) -> Result<(RgbImage, bool), PreprocessError> {
    let failed = |e: &dyn std::fmt::Display| PreprocessError::DecodeFailed {
        format: "jpeg",
        message: e.to_string(),
    };
    let (w, h) = (header.width, header.height);
    if let Some((mw, mh)) = min_size {
        // jpeg-decoder picks a scale that covers the request on *either* axis; a
        // cover-crop needs both, so choose the scale here and request exactly it.
        let scale = [1, 2, 4]
            .into_iter()
            .find(|&s| dct_scaled(w, s) >= mw && dct_scaled(h, s) >= mh)
            .unwrap_or(8);
        if scale < 8 {
            let (rw, rh) = (dct_scaled(w, scale), dct_scaled(h, scale));
            let to16 = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
            dec.scale(to16(rw), to16(rh)).map_err(|e| failed(&e))?;
        }
    }
    let pixels = dec.decode().map_err(|e| failed(&e))?;
    let info = dec.info().ok_or_else(|| failed(&"no frame header"))?;
    let (ow, oh) = (u32::from(info.width), u32::from(info.height));
    let n = (ow as usize) * (oh as usize);
    let cmyk = info.pixel_format == jpeg_decoder::PixelFormat::CMYK32;
    let rgb: Vec<u8> = match info.pixel_format {
        jpeg_decoder::PixelFormat::RGB24 => pixels,
        jpeg_decoder::PixelFormat::L8 => pixels.iter().flat_map(|&l| [l, l, l]).collect(),
        // Lossless 12/16-bit greyscale (medical, scientific): not a photo, and the
        // decoder does not say which precision its native-endian samples have.
        jpeg_decoder::PixelFormat::L16 => {
            return Err(failed(
                &"high-precision (lossless 16-bit) JPEG is not supported",
            ));
        }
        // jpeg-decoder undoes Adobe's inverted storage, so these are plain CMYK
        // values; a naive (profile-less) conversion is what browsers do without ICC.
        jpeg_decoder::PixelFormat::CMYK32 => pixels
            .chunks_exact(4)
            .flat_map(|p| {
                let k = 255 - u32::from(p[3]);
                let ch = |c: u8| ((255 - u32::from(c)) * k + 127) / 255;
                [ch(p[0]) as u8, ch(p[1]) as u8, ch(p[2]) as u8]
            })
            .collect(),
    };
    if rgb.len() != n * 3 {
        return Err(failed(&"decoded buffer has the wrong size"));
    }
    let image = RgbImage::from_raw(ow, oh, rgb)
        .ok_or_else(|| failed(&"decoded buffer has the wrong size"))?;
    Ok((image, cmyk))
}

/// Converts any decoded image to RGB8, compositing alpha over white.
fn to_rgb8(image: DynamicImage) -> RgbImage {
    if !image.color().has_alpha() {
        return match image {
            DynamicImage::ImageRgb8(rgb) => rgb,
            other => other.to_rgb8(),
        };
    }
    let rgba = image.to_rgba8();
    let (w, h) = rgba.dimensions();
    let mut out = RgbImage::new(w, h);
    for (dst, src) in out.pixels_mut().zip(rgba.pixels()) {
        let a = u32::from(src[3]);
        for c in 0..3 {
            dst[c] = ((u32::from(src[c]) * a + 255 * (255 - a) + 127) / 255) as u8;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jpeg(width: u32, height: u32) -> Vec<u8> {
        let image = RgbImage::from_fn(width, height, |x, y| image::Rgb([x as u8, y as u8, 90]));
        let mut out = Cursor::new(Vec::new());
        image
            .write_to(&mut out, image::ImageFormat::Jpeg)
            .expect("encode");
        out.into_inner()
    }

    fn decoded_size(bytes: &[u8], min_size: Option<(u32, u32)>) -> (u32, u32) {
        let source = open(bytes, SourceFormat::Jpeg, &Limits::default()).expect("open");
        source.decode(min_size).expect("decode").dimensions()
    }

    #[test]
    fn jpeg_decodes_at_the_smallest_dct_scale_covering_both_sides() {
        let bytes = jpeg(800, 600);
        assert_eq!(decoded_size(&bytes, None), (800, 600));
        assert_eq!(decoded_size(&bytes, Some((100, 75))), (100, 75));
        assert_eq!(decoded_size(&bytes, Some((200, 150))), (200, 150));
        // One axis short at 1/4: 1/2 it is (jpeg-decoder alone would pick 1/4).
        assert_eq!(decoded_size(&bytes, Some((200, 151))), (400, 300));
        assert_eq!(decoded_size(&bytes, Some((401, 10))), (800, 600));
    }

    #[test]
    fn header_reports_orientation_swapped_size() {
        let header = Header {
            format: SourceFormat::Jpeg,
            width: 300,
            height: 200,
            orientation: Orientation::Rotate90,
        };
        assert_eq!(header.oriented_size(), (200, 300));
    }
}
