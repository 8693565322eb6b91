//! Step 3: EXIF orientation (tag 0x0112, values 1–8), applied to pixels.
//!
//! Run after downscaling: turning a 1 MP bucket costs a fraction of turning the 12 MP
//! original. The orientation itself was read from the header by [`crate::decode`].

use image::metadata::Orientation;
use image::{DynamicImage, RgbImage};

/// Returns `image` turned and/or mirrored as `orientation` says, so it displays
/// upright with no EXIF at all.
pub fn apply_orientation(image: RgbImage, orientation: Orientation) -> RgbImage {
    if orientation == Orientation::NoTransforms {
        return image;
    }
    let mut dynamic = DynamicImage::ImageRgb8(image);
    dynamic.apply_orientation(orientation);
    dynamic.into_rgb8()
}
