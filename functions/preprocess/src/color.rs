//! Step 2b: the embedded colour profile, honoured once and then dropped.
//!
//! SDXL was trained on sRGB pictures, and every artefact Darkroom stores is an untagged PNG,
//! which viewers read as sRGB. A photo tagged with another RGB profile (Display P3 from a
//! phone, Adobe RGB from a camera) would look washed out or shifted if its numbers were
//! simply relabelled, so [`to_srgb`] converts its pixels to sRGB with an ICC colour
//! management engine ([`moxcms`], pure Rust, the one `image` itself uses) before the profile
//! is discarded with the rest of the metadata.
//!
//! - An **sRGB profile**, or any profile that maps every probe colour to itself within one
//!   level (the many sRGB variants: IEC 61966-2.1, compact v4 profiles, vendors' copies),
//!   leaves the pixels untouched, bit for bit.
//! - **Other RGB profiles** (matrix/TRC or LUT-based) are converted with the perceptual
//!   intent; for matrix/TRC profiles all intents are the same colorimetric mapping, with
//!   out-of-gamut colours clipped.
//! - **Grey and CMYK profiles** are not applied: grey images are expanded to RGB as they
//!   are, and CMYK JPEGs keep the decoder's naive conversion (see [`crate::decode`]).
//! - A profile that does not parse, or that the engine cannot build a transform from, is
//!   ignored: the pixels are read as sRGB, as browsers do with a broken profile.
//!
//! PNG `gAMA`/`cHRM`/`cICP` chunks without an `iCCP` profile are not interpreted.

use image::RgbImage;
use moxcms::{ColorProfile, DataColorSpace, Layout, ParsingOptions, TransformOptions};

/// What [`to_srgb`] did with a profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColorOutcome {
    /// The profile is sRGB (or indistinguishable from it): pixels untouched.
    AlreadySrgb,
    /// The pixels were converted from the profile's colour space to sRGB.
    Converted,
    /// The profile was not applied (not RGB, unreadable, or unsupported): pixels untouched.
    Ignored,
}

/// Largest embedded profile parsed, in bytes. Real RGB profiles are a few KB (LUT-based
/// ones a few hundred KB); CMYK press profiles, which are bigger, are never applied.
const MAX_PROFILE_BYTES: usize = 4 * 1024 * 1024;

/// Pixels converted per call to the engine, so the scratch buffer stays small.
const CHUNK_PIXELS: usize = 16 * 1024;

/// Converts `image` from the colour space described by the ICC profile `icc` to sRGB, in
/// place; see the module documentation for which profiles are applied.
pub fn to_srgb(image: &mut RgbImage, icc: &[u8]) -> ColorOutcome {
    let options = ParsingOptions {
        max_profile_size: MAX_PROFILE_BYTES,
        max_allowed_clut_size: 2_000_000,
        ..ParsingOptions::default()
    };
    let Ok(profile) = ColorProfile::new_from_slice_with_options(icc, options) else {
        return ColorOutcome::Ignored;
    };
    if profile.color_space != DataColorSpace::Rgb {
        return ColorOutcome::Ignored;
    }
    let srgb = ColorProfile::new_srgb();
    let Ok(transform) =
        profile.create_transform_8bit(Layout::Rgb, &srgb, Layout::Rgb, TransformOptions::default())
    else {
        return ColorOutcome::Ignored;
    };
    let probe = probe_colours();
    let mut mapped = vec![0u8; probe.len()];
    if transform.transform(&probe, &mut mapped).is_err() {
        return ColorOutcome::Ignored;
    }
    if probe.iter().zip(&mapped).all(|(&a, &b)| a.abs_diff(b) <= 1) {
        return ColorOutcome::AlreadySrgb;
    }
    let pixels: &mut [u8] = image;
    let mut scratch = vec![0u8; CHUNK_PIXELS.min(pixels.len() / 3) * 3];
    for chunk in pixels.chunks_mut(CHUNK_PIXELS * 3) {
        let out = &mut scratch[..chunk.len()];
        if transform.transform(chunk, out).is_err() {
            // Only a length mismatch fails, and chunks are whole pixels; should it happen,
            // the chunks already done are converted and the rest stays as decoded.
            return ColorOutcome::Ignored;
        }
        chunk.copy_from_slice(out);
    }
    ColorOutcome::Converted
}

/// A 9×9×9 grid of RGB colours (every channel at 0, 32, …, 224, 255): a profile that maps
/// all of them to themselves within one level is sRGB for any purpose here.
fn probe_colours() -> Vec<u8> {
    const LEVELS: [u8; 9] = [0, 32, 64, 96, 128, 160, 192, 224, 255];
    let mut probe = Vec::with_capacity(LEVELS.len().pow(3) * 3);
    for r in LEVELS {
        for g in LEVELS {
            for b in LEVELS {
                probe.extend_from_slice(&[r, g, b]);
            }
        }
    }
    probe
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn flat(colour: [u8; 3]) -> RgbImage {
        RgbImage::from_pixel(5, 3, image::Rgb(colour))
    }

    #[test]
    fn srgb_profiles_leave_pixels_untouched() {
        let icc = ColorProfile::new_srgb().encode().unwrap();
        let mut image = flat([200, 120, 80]);
        assert_eq!(to_srgb(&mut image, &icc), ColorOutcome::AlreadySrgb);
        assert_eq!(image, flat([200, 120, 80]));
    }

    #[test]
    fn garbage_and_non_rgb_profiles_are_ignored() {
        let mut image = flat([1, 2, 3]);
        assert_eq!(to_srgb(&mut image, b"not a profile"), ColorOutcome::Ignored);
        assert_eq!(to_srgb(&mut image, &[]), ColorOutcome::Ignored);
        let grey = ColorProfile::new_gray_with_gamma(2.2).encode().unwrap();
        assert_eq!(to_srgb(&mut image, &grey), ColorOutcome::Ignored);
        assert_eq!(image, flat([1, 2, 3]));
    }

    #[test]
    fn a_wide_gamut_profile_changes_mid_tones_but_keeps_black_and_white() {
        let icc = ColorProfile::new_display_p3().encode().unwrap();
        let mut image = RgbImage::from_fn(CHUNK_PIXELS as u32 + 7, 1, |x, _| match x % 3 {
            0 => image::Rgb([0, 0, 0]),
            1 => image::Rgb([255, 255, 255]),
            _ => image::Rgb([200, 120, 80]),
        });
        assert_eq!(to_srgb(&mut image, &icc), ColorOutcome::Converted);
        // Past the first chunk too.
        for x in [0, 1, 2, CHUNK_PIXELS as u32 + 3, CHUNK_PIXELS as u32 + 5] {
            let p = image.get_pixel(x, 0).0;
            match x % 3 {
                0 => assert!(p.iter().all(|&c| c <= 1), "{p:?}"),
                1 => assert!(p.iter().all(|&c| c >= 254), "{p:?}"),
                _ => assert!(
                    p[0] > 205 && p[2] < 80,
                    "P3 orange is more saturated: {p:?}"
                ),
            }
        }
    }
}
