//! Test support: runs the reference-fixture scripts in `reference/` once per fixture and caches
//! their output under `target/darkroom-fixtures/`, keyed by all the scripts' contents and the arguments.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};

/// The crate's folder.
pub fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `reference/<script>.py --out DIR ARGS…` unless its output is cached; returns DIR (see
/// [`darkroom_test_support::fixture`]). The benchmark's script makes no fixture and no fixture
/// script imports it.
pub fn fixture(script: &str, args: &[&str]) -> PathBuf {
    darkroom_test_support::fixture(
        &crate_dir().join("reference"),
        script,
        args,
        &["bench_diffusers.py"],
    )
}

/// Reads every tensor of a safetensors file (f32 on the CPU).
pub fn read_tensors(path: &Path) -> std::collections::HashMap<String, tch::Tensor> {
    tch::Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .into_iter()
        .collect()
}

/// max |a − b| / max |b|: the relative error the parity tests bound.
pub fn relative_error(actual: &tch::Tensor, expected: &tch::Tensor) -> f64 {
    assert_eq!(actual.size(), expected.size(), "shapes differ");
    let actual = actual
        .to_kind(tch::Kind::Double)
        .to_device(tch::Device::Cpu);
    let expected = expected
        .to_kind(tch::Kind::Double)
        .to_device(tch::Device::Cpu);
    let diff = (&actual - &expected).abs().max().double_value(&[]);
    let scale = expected.abs().max().double_value(&[]).max(1e-12);
    diff / scale
}

/// The largest difference of any channel of any pixel between two images of the same size.
pub fn max_pixel_difference(a: &image::RgbImage, b: &image::RgbImage) -> u8 {
    assert_eq!(a.dimensions(), b.dimensions(), "image sizes differ");
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

/// A reference case's `params.json`, as the scripts write it (fields a script leaves out take
/// the defaults of `GenerateRequest` and `darkroom-sdxl`).
#[derive(Debug, serde::Deserialize)]
pub struct CaseParams {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub guidance: f64,
    pub seed: i64,
    pub width: u32,
    pub height: u32,
    #[serde(default = "euler")]
    pub scheduler: String,
    #[serde(default)]
    pub strength: Option<f64>,
    #[serde(default)]
    pub controls: Vec<CaseControl>,
    #[serde(default)]
    pub loras: Vec<(String, f64)>,
}

/// One ControlNet of a case: its folder and image (relative to the fixture), scale and window.
#[derive(Debug, serde::Deserialize)]
pub struct CaseControl {
    pub net: String,
    pub image: String,
    pub scale: f64,
    pub start: f64,
    pub end: f64,
}

fn euler() -> String {
    "euler".to_owned()
}

impl CaseParams {
    /// Reads `case/params.json`.
    pub fn read(case: &Path) -> CaseParams {
        serde_json::from_str(&std::fs::read_to_string(case.join("params.json")).unwrap()).unwrap()
    }
}

/// `darkroom-sdxl` on `fixture/model` with the case's prompts, size, steps, guidance, seed and
/// scheduler, on the CPU, writing `out`; the caller adds the rest (init image, LoRAs…).
pub fn sdxl_command(fixture: &Path, params: &CaseParams, out: &Path) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_darkroom-sdxl"));
    command
        .args(["--model".as_ref(), fixture.join("model").as_os_str()])
        .args(["--prompt", &params.prompt])
        .args(["--negative-prompt", &params.negative_prompt])
        .args(["--width", &params.width.to_string()])
        .args(["--height", &params.height.to_string()])
        .args(["--steps", &params.steps.to_string()])
        .args(["--guidance", &params.guidance.to_string()])
        .args(["--seed", &params.seed.to_string()])
        .args(["--scheduler", &params.scheduler, "--device", "cpu"])
        .args(["--out".as_ref(), out.as_os_str()]);
    command
}
