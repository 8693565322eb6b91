//! The depth estimator against transformers' `DepthAnythingForDepthEstimation` on small random
//! checkpoints written by `reference/depth.py` (CPU, f32): the same pixels give the same depth,
//! max |rust − transformers| / max |transformers| ≤ 1e-4, on the backbone's own grid and on a
//! non-square size (position embeddings interpolated), for relative and metric heads.
#![allow(clippy::unwrap_used)]

mod common;

use darkroom_inference::EngineError;
use darkroom_inference::depth::DepthEstimator;
use darkroom_inference::device::DType;
use darkroom_inference::loader::ModelError;
use tch::Device;

const TOLERANCE: f64 = 1e-4;

#[test]
fn depth_matches_transformers() {
    let root = common::fixture("depth", &[]);
    for variant in ["small", "metric"] {
        let dir = root.join(variant);
        let estimator = DepthEstimator::load(&dir, Device::Cpu, DType::F32).unwrap();
        let t = common::read_tensors(&dir.join("reference.safetensors"));
        for case in ["square", "wide"] {
            let pixels = &t[&format!("{case}.pixel_values")];
            let expected = &t[&format!("{case}.predicted_depth")];
            let actual = estimator.model().forward(pixels).unwrap();
            assert_eq!(actual.size(), expected.size(), "{variant}/{case}");
            let error = common::relative_error(&actual, expected);
            println!("{variant}/{case}: relative error {error:.3e}");
            assert!(
                error <= TOLERANCE,
                "{variant}/{case}: relative error {error:e}"
            );
        }
    }
}

#[test]
fn bad_folders_and_inputs_are_typed_errors() {
    let root = common::fixture("depth", &[]);
    let good = root.join("small");
    let dir = tempfile::tempdir().unwrap();
    // No config.
    assert!(matches!(
        DepthEstimator::load(dir.path(), Device::Cpu, DType::F32),
        Err(EngineError::Io { .. })
    ));
    // Config of another model size: the stored tensors do not fit.
    std::fs::copy(
        good.join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let config = std::fs::read_to_string(good.join("config.json"))
        .unwrap()
        .replace("\"hidden_size\": 32", "\"hidden_size\": 64");
    std::fs::write(dir.path().join("config.json"), config).unwrap();
    let error = DepthEstimator::load(dir.path(), Device::Cpu, DType::F32).unwrap_err();
    assert!(
        matches!(error, EngineError::Model(ModelError::ShapeMismatch { .. })),
        "{error}"
    );
    // A truncated weights file.
    let bytes = std::fs::read(good.join("model.safetensors")).unwrap();
    std::fs::write(
        dir.path().join("model.safetensors"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    std::fs::copy(good.join("config.json"), dir.path().join("config.json")).unwrap();
    let error = DepthEstimator::load(dir.path(), Device::Cpu, DType::F32).unwrap_err();
    assert!(matches!(error, EngineError::Model(_)), "{error}");
    // Pixels off the patch grid.
    let estimator = DepthEstimator::load(&good, Device::Cpu, DType::F32).unwrap();
    let off_grid = tch::Tensor::zeros([1, 3, 30, 28], (tch::Kind::Float, Device::Cpu));
    assert!(matches!(
        estimator.model().forward(&off_grid),
        Err(EngineError::InvalidInput { .. })
    ));
}

/// The photo → control image path against transformers' processor and post-processing: the
/// processor's pixels within 0.05 (PIL's 8-bit bicubic against libtorch's antialiased bicubic:
/// ±1 level is 0.017 after normalisation), the depth map within 1.5/255 on average and 8/255 at
/// most (measured: 0.44 and 4).
#[test]
fn depth_maps_match_transformers_pipeline() {
    let dir = common::fixture("depth", &[]).join("small");
    let estimator = DepthEstimator::load(&dir, Device::Cpu, DType::F32).unwrap();
    let t = common::read_tensors(&dir.join("reference.safetensors"));
    let image_u8 = &t["photo.image_u8"];
    let (height, width, _) = image_u8.size3().unwrap();
    let bytes = Vec::<u8>::try_from(image_u8.flatten(0, -1)).unwrap();
    let image = image::RgbImage::from_raw(width as u32, height as u32, bytes).unwrap();

    let pixels = estimator.pixels(&image).unwrap();
    let expected_pixels = &t["photo.pixel_values"];
    assert_eq!(pixels.size(), expected_pixels.size());
    let pixel_error = (&pixels - expected_pixels).abs().max().double_value(&[]);
    println!("pixels: max difference {pixel_error:.4}");
    assert!(pixel_error <= 0.05, "pixels differ by {pixel_error}");

    let map = estimator.depth_map(&image).unwrap();
    assert_eq!(map.dimensions(), (width as u32, height as u32));
    let expected = Vec::<u8>::try_from(t["photo.depth_u8"].flatten(0, -1)).unwrap();
    let differences: Vec<i32> = map
        .as_raw()
        .iter()
        .zip(&expected)
        .map(|(&a, &b)| (i32::from(a) - i32::from(b)).abs())
        .collect();
    let max = differences.iter().copied().max().unwrap_or(0);
    let mean = differences.iter().sum::<i32>() as f64 / differences.len() as f64;
    println!("depth map: max difference {max}/255, mean {mean:.2}/255");
    assert!(mean <= 1.5 && max <= 8, "max {max}, mean {mean}");
    assert_eq!(*map.as_raw().iter().max().unwrap(), 255);
    assert_eq!(*map.as_raw().iter().min().unwrap(), 0);
}
