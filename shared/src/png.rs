//! PNGs that carry pixels and nothing else: what Darkroom stores (prepared inputs, control
//! maps, results), so no metadata of an upload (EXIF, GPS, XMP, ICC, text) can leave through
//! them.

use image::RgbImage;

/// Encodes pixels as a PNG with no ancillary chunks (no eXIf, tEXt, iCCP…): only IHDR, IDAT
/// and IEND.
pub fn encode_png(image: &RgbImage) -> Vec<u8> {
    use image::ImageEncoder;
    let mut out = Vec::new();
    let encoder = image::codecs::png::PngEncoder::new(&mut out);
    // Writing an in-memory RGB8 buffer of matching size cannot fail.
    if let Err(e) = encoder.write_image(
        image.as_raw(),
        image.width(),
        image.height(),
        image::ExtendedColorType::Rgb8,
    ) {
        unreachable!("PNG encoding of a valid RGB buffer failed: {e}");
    }
    out
}
