//! Test support: runs the reference-fixture scripts in `reference/` once per fixture and caches
//! their output under `target/darkroom-fixtures/`, keyed by all the scripts' contents and the arguments.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

static GENERATING: Mutex<()> = Mutex::new(());

/// The crate's folder.
pub fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `reference/<script>.py --out DIR ARGS…` unless its output is cached; returns DIR.
pub fn fixture(script: &str, args: &[&str]) -> PathBuf {
    let reference = crate_dir().join("reference");
    let mut hasher = DefaultHasher::new();
    // Scripts import each other (pipeline.py's model is everyone's base): any change to any of
    // them regenerates every fixture.
    let mut scripts: Vec<PathBuf> = std::fs::read_dir(&reference)
        .unwrap_or_else(|e| panic!("list {}: {e}", reference.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "py"))
        // The benchmark's script makes no fixture and no fixture script imports it.
        .filter(|path| !path.ends_with("bench_diffusers.py"))
        .collect();
    scripts.sort();
    for path in &scripts {
        std::fs::read(path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
            .hash(&mut hasher);
    }
    script.hash(&mut hasher);
    args.hash(&mut hasher);
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate_dir().join("../../target"));
    let dir = target
        .join("darkroom-fixtures")
        .join(format!("{script}-{:016x}", hasher.finish()));
    let done = dir.join(".done");
    let _guard = GENERATING.lock().unwrap_or_else(|e| e.into_inner());
    if done.exists() {
        return dir;
    }
    // Generate into a scratch folder and rename, so other test binaries never see half a fixture.
    let scratch = dir.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let script_path = reference.join(format!("{script}.py"));
    let mut script_args = vec![std::ffi::OsString::from("--out"), scratch.clone().into()];
    script_args.extend(args.iter().map(std::ffi::OsString::from));
    darkroom_test_support::run_script(&script_path, &script_args);
    std::fs::write(scratch.join(".done"), b"").unwrap();
    if std::fs::rename(&scratch, &dir).is_err() {
        // Another test binary finished the same fixture first.
        let _ = std::fs::remove_dir_all(&scratch);
    }
    assert!(
        done.exists(),
        "fixture {} missing after generation",
        dir.display()
    );
    dir
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
