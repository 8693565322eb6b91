//! Pixels ↔ the VAE's image tensors, as diffusers' `VaeImageProcessor` converts them.
//!
//! Upstream: `diffusers/image_processor.py` — `preprocess` (with `do_resize=False`):
//! `pil_to_numpy` (`u8 / 255.0` in f32), `numpy_to_pt`, `normalize` (`2x − 1`); `postprocess`
//! (`output_type="pil"`): `denormalize` (`(x · 0.5 + 0.5).clamp(0, 1)`), `pt_to_numpy` (f32),
//! `numpy_to_pil` (`(x · 255).round()` to u8, rounding half to even).

use image::RgbImage;
use tch::{Device, Kind, Tensor};

use crate::{EngineError, Result};

/// An RGB image (HWC, u8) → a (1, 3, H, W) f32 tensor in [-1, 1] on `device`.
///
/// The bytes travel and are converted there (the same floats on every device: a division and a
/// multiply-subtract, each correctly rounded). Cast the result to the VAE's kind (or let
/// [`super::AutoencoderKL::encode`] do so); stack several with `Tensor::cat(&[a, b], 0)`.
pub fn image_to_tensor(image: &RgbImage, device: Device) -> Tensor {
    let (width, height) = image.dimensions();
    let unit = Tensor::from_slice(image.as_raw())
        .to_device(device)
        .view([1, i64::from(height), i64::from(width), 3])
        .permute([0, 3, 1, 2])
        .to_kind(Kind::Float)
        / 255.0;
    (unit * 2.0 - 1.0).contiguous()
}

/// Decoder output (N, 3, H, W), any float kind and device → N RGB images.
///
/// Denormalizes in the tensor's own kind (as diffusers does before `.float()`), then scales to
/// 0–255 in f32 and rounds half to even: the same bytes as
/// `VaeImageProcessor.postprocess(x, output_type="pil")`, which does the f32 part on the CPU. Here
/// all of it runs on the tensor's device (one correctly rounded f32 multiplication and a
/// round to nearest even give the same bytes on every device) and only the bytes travel: on a
/// GPU a quarter of the f32 pixels' size, and no pass over 3 × 1024² floats on the host.
pub fn tensor_to_image(images: &Tensor) -> Result<Vec<RgbImage>> {
    let size = images.size();
    if size.len() != 4 || size[1] != 3 || !images.is_floating_point() || size.contains(&0) {
        return Err(EngineError::InvalidInput {
            component: "vae",
            message: format!(
                "images must be a non-empty float (N, 3, H, W) tensor, got {:?} of shape {size:?}",
                images.kind()
            ),
        });
    }
    let (height, width) = (size[2], size[3]);
    let invalid_size = || EngineError::InvalidInput {
        component: "vae",
        message: format!("image size {width}×{height} does not fit an RGB image"),
    };
    let w = u32::try_from(width).map_err(|_| invalid_size())?;
    let h = u32::try_from(height).map_err(|_| invalid_size())?;
    let per_image = usize::try_from(height * width * 3).map_err(|_| invalid_size())?;
    let unit = (images * 0.5 + 0.5).clamp(0.0, 1.0);
    let bytes = (unit.to_kind(Kind::Float) * 255.0)
        .round()
        .to_kind(Kind::Uint8)
        .permute([0, 2, 3, 1])
        .contiguous()
        .to_device(Device::Cpu);
    let bytes = Vec::<u8>::try_from(bytes.view([-1]))?;
    bytes
        .chunks_exact(per_image)
        .map(|pixels| RgbImage::from_raw(w, h, pixels.to_vec()).ok_or_else(invalid_size))
        .collect()
}
