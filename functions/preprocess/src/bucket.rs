//! Step 4: frame to the nearest SDXL resolution bucket.
//!
//! SDXL was fine-tuned on multiple aspect ratios, each a ~1 MP size with both sides
//! multiples of 64 (SDXL report, Podell et al. 2023, <https://arxiv.org/abs/2307.01952>,
//! appendix "Multi-aspect training"). An image is matched to the bucket of nearest
//! aspect ratio, then cover-cropped around its centre and resized with Lanczos3
//! (`fast_image_resize`'s convolution, which crops and resizes in one pass).

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::RgbImage;

use crate::PreprocessError;

/// A bucket size in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Bucket {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

const fn b(width: u32, height: u32) -> Bucket {
    Bucket { width, height }
}

/// The SDXL training buckets, width × height, from tallest to widest (the SDXL
/// report's multi-aspect table, listed there as height × width).
pub const SDXL_BUCKETS: [Bucket; 41] = [
    b(512, 2048),
    b(512, 1984),
    b(512, 1920),
    b(512, 1856),
    b(576, 1792),
    b(576, 1728),
    b(576, 1664),
    b(640, 1600),
    b(640, 1536),
    b(704, 1472),
    b(704, 1408),
    b(704, 1344),
    b(768, 1344),
    b(768, 1280),
    b(832, 1216),
    b(832, 1152),
    b(896, 1152),
    b(896, 1088),
    b(960, 1088),
    b(960, 1024),
    b(1024, 1024),
    b(1024, 960),
    b(1088, 960),
    b(1088, 896),
    b(1152, 896),
    b(1152, 832),
    b(1216, 832),
    b(1280, 768),
    b(1344, 768),
    b(1344, 704),
    b(1408, 704),
    b(1472, 704),
    b(1536, 640),
    b(1600, 640),
    b(1664, 576),
    b(1728, 576),
    b(1792, 576),
    b(1856, 512),
    b(1920, 512),
    b(1984, 512),
    b(2048, 512),
];

/// The bucket whose aspect ratio is nearest to `width`/`height` (compared on a log
/// scale, so 2:1 and 1:2 are equally far from 1:1); the first in table order on a tie.
/// Zero sizes are treated as 1.
pub fn nearest_bucket(width: u32, height: u32) -> Bucket {
    let log_aspect = |w: u32, h: u32| (f64::from(w.max(1)) / f64::from(h.max(1))).ln();
    let target = log_aspect(width, height);
    let mut best = SDXL_BUCKETS[0];
    let mut best_distance = f64::INFINITY;
    for bucket in SDXL_BUCKETS {
        let distance = (log_aspect(bucket.width, bucket.height) - target).abs();
        if distance < best_distance {
            best = bucket;
            best_distance = distance;
        }
    }
    best
}

/// The centred region of a `width`×`height` source with the aspect of `out_w`×`out_h`,
/// as (left, top, width, height) in source pixels (fractional: the resizer samples
/// sub-pixel crops exactly).
pub fn cover_crop(width: u32, height: u32, out_w: u32, out_h: u32) -> (f64, f64, f64, f64) {
    let (w, h) = (f64::from(width), f64::from(height));
    let scale = (f64::from(out_w) / w).max(f64::from(out_h) / h);
    let (cw, ch) = (f64::from(out_w) / scale, f64::from(out_h) / scale);
    ((w - cw) / 2.0, (h - ch) / 2.0, cw, ch)
}

/// The smallest whole-image size (same aspect as `width`×`height`, sides rounded up)
/// whose [`cover_crop`] still has `out_w`×`out_h` pixels or more: what a decoder that
/// can downscale on load (JPEG DCT scaling) must at least deliver.
pub fn cover_min_size(width: u32, height: u32, out_w: u32, out_h: u32) -> (u32, u32) {
    let (_, _, crop_w, crop_h) = cover_crop(width, height, out_w, out_h);
    let scale = (f64::from(out_w) / crop_w).max(f64::from(out_h) / crop_h);
    // Less a hair, so that an exact fit computed as 896.0000000000001 stays 896.
    let need = |side: u32| (f64::from(side) * scale - 1e-6).ceil() as u32;
    (need(width), need(height))
}

/// Cover-crops `image` around its centre and resizes it to exactly `width`×`height`
/// with Lanczos3.
///
/// # Errors
/// `Internal` if the resizer refuses (zero sizes).
pub fn fit_to_size(image: &RgbImage, width: u32, height: u32) -> Result<RgbImage, PreprocessError> {
    let internal = |e: &dyn std::fmt::Display| PreprocessError::Internal {
        message: format!("resize: {e}"),
    };
    let (sw, sh) = image.dimensions();
    if (sw, sh) == (width, height) {
        return Ok(image.clone());
    }
    let src = ImageRef::new(sw, sh, image.as_raw(), PixelType::U8x3).map_err(|e| internal(&e))?;
    let mut dst = Image::new(width, height, PixelType::U8x3);
    let (left, top, cw, ch) = cover_crop(sw, sh, width, height);
    let options = ResizeOptions::new()
        .resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3))
        .crop(left, top, cw, ch);
    Resizer::new()
        .resize(&src, &mut dst, &options)
        .map_err(|e| internal(&e))?;
    RgbImage::from_raw(width, height, dst.into_vec())
        .ok_or_else(|| internal(&"buffer size mismatch"))
}

/// [`fit_to_size`] to the [`nearest_bucket`] of the image's own aspect ratio.
///
/// # Errors
/// As [`fit_to_size`].
pub fn fit_to_bucket(image: &RgbImage) -> Result<RgbImage, PreprocessError> {
    let bucket = nearest_bucket(image.width(), image.height());
    fit_to_size(image, bucket.width, bucket.height)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_symmetric_about_one_megapixel_multiples_of_64() {
        for bucket in SDXL_BUCKETS {
            assert_eq!(bucket.width % 64, 0, "{bucket:?}");
            assert_eq!(bucket.height % 64, 0, "{bucket:?}");
            let pixels = bucket.width * bucket.height;
            assert!((940_000..=1_050_000).contains(&pixels), "{bucket:?}");
            assert!(SDXL_BUCKETS.contains(&b(bucket.height, bucket.width)));
        }
        for pair in SDXL_BUCKETS.windows(2) {
            let aspect = |b: Bucket| f64::from(b.width) / f64::from(b.height);
            assert!(aspect(pair[0]) < aspect(pair[1]), "sorted by aspect");
        }
    }

    #[test]
    fn the_common_buckets_are_in_the_table() {
        for (w, h) in [
            (1024, 1024),
            (1152, 896),
            (896, 1152),
            (1216, 832),
            (832, 1216),
            (1344, 768),
            (768, 1344),
            (1536, 640),
            (640, 1536),
        ] {
            assert!(SDXL_BUCKETS.contains(&b(w, h)), "{w}×{h}");
        }
    }

    #[test]
    fn nearest_by_aspect() {
        assert_eq!(nearest_bucket(3000, 3000), b(1024, 1024));
        assert_eq!(nearest_bucket(4000, 3000), b(1152, 896)); // 4:3 → 1.286
        assert_eq!(nearest_bucket(3000, 4000), b(896, 1152));
        assert_eq!(nearest_bucket(6000, 4000), b(1216, 832)); // 3:2 → 1.462
        assert_eq!(nearest_bucket(1920, 1080), b(1344, 768)); // 16:9 → 1.75
        assert_eq!(nearest_bucket(1080, 1920), b(768, 1344));
        assert_eq!(nearest_bucket(10_000, 100), b(2048, 512)); // clamps to the widest
        assert_eq!(nearest_bucket(100, 10_000), b(512, 2048));
        assert_eq!(nearest_bucket(0, 0), b(1024, 1024));
    }

    #[test]
    fn cover_crop_is_centred() {
        let (l, t, w, h) = cover_crop(4000, 3000, 1024, 1024);
        assert_eq!((l, t, w, h), (500.0, 0.0, 3000.0, 3000.0));
        let (l, t, w, h) = cover_crop(1000, 2000, 1000, 1000);
        assert_eq!((l, t, w, h), (0.0, 500.0, 1000.0, 1000.0));
    }

    #[test]
    fn cover_min_size_is_the_least_that_still_covers() {
        assert_eq!(cover_min_size(4000, 3000, 1152, 896), (1195, 896));
        assert_eq!(cover_min_size(2304, 1792, 1152, 896), (1152, 896));
        assert_eq!(cover_min_size(3000, 4000, 1152, 896), (1152, 1536));
        assert_eq!(cover_min_size(1000, 1000, 1024, 1024), (1024, 1024));
    }

    #[test]
    fn fit_gives_bucket_size_and_keeps_flat_colour() {
        let image = RgbImage::from_pixel(1600, 1200, image::Rgb([10, 200, 30]));
        let out = fit_to_bucket(&image).expect("resize");
        assert_eq!(out.dimensions(), (1152, 896));
        assert!(out.pixels().all(|p| p.0 == [10, 200, 30]));
    }
}
