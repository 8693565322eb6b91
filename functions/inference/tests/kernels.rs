//! The fused CUDA kernels' source (`csrc/kernels.cu`) compiles with NVRTC, as CUDA builds compile
//! it at run time, for the architectures Darkroom targets (Ampere sm_80, Hopper sm_90) and has
//! every kernel the host code launches. No GPU is needed to compile; the kernels' results are
//! checked on a GPU by `examples/fused_kernels.rs` (see BENCHMARKS.md).

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Every kernel `csrc/fused_kernels.cpp` asks the compiled library for.
fn kernel_names() -> Vec<String> {
    let mut names = Vec::new();
    for op in ["group_norm_moments", "group_norm_apply", "geglu"] {
        for dtype in ["f32", "f16", "bf16"] {
            for width in ["vec", "scalar"] {
                names.push(format!("darkroom_{op}_{dtype}_{width}"));
            }
        }
    }
    names
}

/// Runs scripts/compile_kernels.py on `source`; its exit status and output.
fn compile(source: &Path, expect: &[String]) -> (bool, String) {
    let output = Command::new(darkroom_test_support::python())
        .arg(crate_dir().join("scripts/compile_kernels.py"))
        .arg(source)
        .args(["--arch", "sm_80", "--arch", "sm_90", "--expect"])
        .args(expect)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

fn kernels_source() -> PathBuf {
    crate_dir().join("csrc/kernels.cu")
}

#[test]
fn the_fused_kernels_compile_for_ampere_and_hopper_with_every_kernel_the_host_launches() {
    let (ok, output) = compile(&kernels_source(), &kernel_names());
    assert!(ok, "{output}");
    assert!(
        output.contains("sm_80: ") && output.contains("sm_90: "),
        "{output}"
    );
    assert!(!output.contains("warning"), "NVRTC warned:\n{output}");
}

#[test]
fn a_source_that_does_not_compile_or_lacks_a_kernel_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let source = std::fs::read_to_string(kernels_source()).unwrap();

    let broken = dir.path().join("broken.cu");
    std::fs::write(
        &broken,
        source.replace("m2 += (v[k] - mean)", "m2 += (v[k] - mean_"),
    )
    .unwrap();
    let (ok, output) = compile(&broken, &[]);
    assert!(!ok);
    assert!(output.contains("does not compile for sm_80"), "{output}");
    assert!(
        output.contains("mean_"),
        "NVRTC's log names the error:\n{output}"
    );

    let missing = vec!["darkroom_layer_norm_f16_vec".to_owned()];
    let (ok, output) = compile(&kernels_source(), &missing);
    assert!(!ok);
    assert!(
        output.contains("kernels missing from the binary: darkroom_layer_norm_f16_vec"),
        "{output}"
    );
}
