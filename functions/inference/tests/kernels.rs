//! The fused CUDA kernels (`csrc/kernels.cu`) without a GPU:
//!
//! - their source compiles with NVRTC, as CUDA builds compile it at run time, for the
//!   architectures Darkroom targets (Ampere sm_80, Hopper sm_90), with every kernel the host code
//!   launches;
//! - run on the CPU under `csrc/emulate/` (each block as real threads with real barriers and warp
//!   shuffles, the host code's launch geometry from `csrc/launch.h`), they give libtorch's results
//!   to within libtorch's own rounding: every dtype, vector and scalar kernels, statistics split
//!   over several blocks, grid-stride loops.
//!
//! On a GPU, `examples/fused_kernels.rs` checks and times them at SDXL's shapes (BENCHMARKS.md).

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use tch::{Device, Kind, Tensor};

fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Every kernel `csrc/fused_kernels.cpp` asks the compiled library for.
fn kernel_names() -> Vec<String> {
    let mut names = Vec::new();
    for op in [
        "group_norm_moments",
        "group_norm_apply",
        "geglu",
        "add_layer_norm",
    ] {
        for dtype in ["f32", "f16", "bf16"] {
            for width in ["vec", "scalar"] {
                names.push(format!("darkroom_{op}_{dtype}_{width}"));
            }
        }
    }
    let widths = [
        ("f32", &[4, 2, 1][..]),
        ("f16", &[8, 4, 2, 1]),
        ("bf16", &[8, 4, 2, 1]),
    ];
    for op in ["group_norm_moments_nhwc", "group_norm_apply_nhwc"] {
        for (dtype, widths) in widths {
            for width in widths {
                names.push(format!("darkroom_{op}_{dtype}_v{width}"));
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

/// `csrc/emulate/run_kernels.cpp` built once per test run (it includes kernels.cu and launch.h).
fn emulator() -> &'static Path {
    static BUILT: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, binary) = BUILT.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join("run_kernels");
        let compiler = std::env::var("CXX").unwrap_or_else(|_| "c++".to_owned());
        let output = Command::new(&compiler)
            .args([
                "-std=c++20",
                "-O2",
                "-pthread",
                "-fno-strict-aliasing",
                "-o",
            ])
            .arg(&binary)
            .arg(crate_dir().join("csrc/emulate/run_kernels.cpp"))
            .output()
            .unwrap_or_else(|e| panic!("cannot run {compiler}: {e}"));
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        (dir, binary)
    });
    binary
}

fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Float => "f32",
        Kind::Half => "f16",
        Kind::BFloat16 => "bf16",
        other => panic!("no kernels for {other:?}"),
    }
}

/// The tensor's elements, native byte order.
fn bytes(t: &Tensor) -> Vec<u8> {
    let t = t.contiguous().view([-1]);
    if t.kind() == Kind::Float {
        let values = Vec::<f32>::try_from(&t).unwrap();
        values.iter().flat_map(|v| v.to_ne_bytes()).collect()
    } else {
        let values = Vec::<i16>::try_from(&t.view_dtype(Kind::Int16)).unwrap();
        values.iter().flat_map(|v| v.to_ne_bytes()).collect()
    }
}

fn tensor(bytes: &[u8], kind: Kind, shape: &[i64]) -> Tensor {
    let t = if kind == Kind::Float {
        let values: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_ne_bytes(b.try_into().unwrap()))
            .collect();
        Tensor::from_slice(&values)
    } else {
        let values: Vec<i16> = bytes
            .chunks_exact(2)
            .map(|b| i16::from_ne_bytes(b.try_into().unwrap()))
            .collect();
        Tensor::from_slice(&values).view_dtype(kind)
    };
    t.view(shape)
}

/// Runs the emulator on `inputs` (written to files, `None` as `-`); its outputs and the plan it
/// printed.
fn emulate(
    args: &[String],
    inputs: &[Option<&Tensor>],
    outputs: &[(Kind, &[i64])],
) -> (Vec<Tensor>, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(emulator());
    command.args(args);
    for (i, input) in inputs.iter().enumerate() {
        match input {
            Some(t) => {
                let path = dir.path().join(format!("in{i}"));
                std::fs::write(&path, bytes(t)).unwrap();
                command.arg(path);
            }
            None => {
                command.arg("-");
            }
        }
    }
    let paths: Vec<PathBuf> = (0..outputs.len())
        .map(|i| dir.path().join(format!("out{i}")))
        .collect();
    let output = command.args(&paths).output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let plan = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let tensors = paths
        .iter()
        .zip(outputs)
        .map(|(path, (kind, shape))| tensor(&std::fs::read(path).unwrap(), *kind, shape))
        .collect();
    (tensors, plan)
}

/// The fused result is as close to the f32 computation as libtorch's own result in `kind`
/// (twice its largest error, plus one rounding step of the output's largest values).
fn assert_close(name: &str, fused: &Tensor, stock: &Tensor, reference: &Tensor, kind: Kind) {
    let max = |t: Tensor| t.abs().max().double_value(&[]);
    let stock_err = max(stock.to_kind(Kind::Float) - reference);
    let fused_err = max(fused.to_kind(Kind::Float) - reference);
    let bits = match kind {
        Kind::Float => 18,
        Kind::Half => 11,
        _ => 8,
    };
    let step = max(reference.shallow_clone()) * 2f64.powi(-bits);
    assert!(
        fused_err <= 2.0 * stock_err + step,
        "{name}: fused error {fused_err:e}, libtorch's {stock_err:e}, step {step:e}"
    );
}

struct NormCase {
    /// The channels-last kernels (`x` and the result channels-last).
    channels_last: bool,
    kind: Kind,
    shape: [i64; 4],
    groups: i64,
    shifted: bool,
    silu: bool,
    multiprocessors: i64,
    /// What the launch plan must be (the path the case is there to exercise).
    plan: &'static str,
}

#[test]
fn emulated_group_norm_kernels_match_libtorch() {
    use Kind::{BFloat16, Float, Half};
    let case =
        |channels_last, kind, shape, groups, shifted, silu, multiprocessors, plan| NormCase {
            channels_last,
            kind,
            shape,
            groups,
            shifted,
            silu,
            multiprocessors,
            plan,
        };
    // Contiguous: every dtype, vector and scalar kernels, statistics split over blocks.
    // Channels-last: SDXL's 10 channels per group (2 per thread, 160 threads a row), rows split
    // over blocks, a group width no vector divides, rows wider than a 256-thread block.
    #[rustfmt::skip]
    let cases = [
        case(false, Float, [2, 16, 8, 8], 4, true, true, 2, "vec parts=1 apply_parts=1"),
        case(false, Half, [1, 8, 64, 64], 2, true, true, 4, "vec parts=4 apply_parts=2"),
        case(false, BFloat16, [2, 32, 16, 16], 8, false, true, 2, "vec parts=1 apply_parts=1"),
        case(false, Half, [2, 12, 5, 7], 3, true, true, 2, "scalar parts=1 apply_parts=1"),
        case(false, Float, [1, 4, 33, 63], 1, true, false, 8, "scalar parts=16 apply_parts=9"),
        case(true, Half, [2, 320, 4, 4], 32, true, true, 2, "v2 threads=160 parts=4 apply_parts=4"),
        case(true, BFloat16, [1, 64, 32, 32], 4, false, true, 1, "v8 threads=256 parts=4 apply_parts=8"),
        case(true, Float, [2, 40, 6, 5], 8, true, false, 2, "v1 threads=240 parts=1 apply_parts=2"),
        case(true, Float, [1, 1280, 2, 2], 32, true, true, 1, "v4 threads=320 parts=1 apply_parts=1"),
    ];
    tch::manual_seed(7);
    for c in cases {
        let [n, channels, h, w] = c.shape;
        let f32s = (Kind::Float, Device::Cpu);
        // Offsets per channel (a real activation's channels are not centred) and, in the last
        // case, a mean far above the spread, where E[x²] − E[x]² would cancel.
        let offset = if c.plan.starts_with("scalar parts=16") {
            100.0
        } else {
            0.0
        };
        let x = (Tensor::randn(c.shape, f32s) * 3.0
            + Tensor::randn([1, channels, 1, 1], f32s) * 2.0
            + offset)
            .to_kind(c.kind);
        let shift = (Tensor::randn([n, channels], f32s)).to_kind(c.kind);
        let weight = (Tensor::rand([channels], f32s) + 0.5).to_kind(c.kind);
        let bias = (Tensor::randn([channels], f32s) * 0.1).to_kind(c.kind);
        let eps = 1e-5;
        let libtorch = |x: &Tensor, shift: &Tensor, weight: &Tensor, bias: &Tensor| {
            let x = if c.shifted {
                x + shift.view([n, channels, 1, 1])
            } else {
                x.shallow_clone()
            };
            let y = x.group_norm(c.groups, Some(weight), Some(bias), eps, false);
            if c.silu { y.silu() } else { y }
        };
        let up = |t: &Tensor| t.to_kind(Kind::Float);
        let reference = libtorch(&up(&x), &up(&shift), &up(&weight), &up(&bias));
        let stock = libtorch(&x, &shift, &weight, &bias);
        let op = if c.channels_last {
            "group_norm_nhwc"
        } else {
            "group_norm"
        };
        // The emulator takes and returns channels-last tensors as `[n, h, w, c]` in memory.
        let (x_file, out_shape) = if c.channels_last {
            (x.permute([0, 2, 3, 1]).contiguous(), [n, h, w, channels])
        } else {
            (x.shallow_clone(), c.shape)
        };
        let args: Vec<String> = [
            op.to_owned(),
            dtype_name(c.kind).to_owned(),
            n.to_string(),
            channels.to_string(),
            c.groups.to_string(),
            (h * w).to_string(),
            eps.to_string(),
            u8::from(c.silu).to_string(),
            c.multiprocessors.to_string(),
        ]
        .into();
        let inputs = [
            Some(&x_file),
            c.shifted.then_some(&shift),
            Some(&weight),
            Some(&bias),
        ];
        let (outputs, plan) = emulate(&args, &inputs, &[(c.kind, &out_shape)]);
        let fused = if c.channels_last {
            outputs[0].permute([0, 3, 1, 2])
        } else {
            outputs[0].shallow_clone()
        };
        let name = format!(
            "{:?} {:?} groups {}, channels-last {}",
            c.kind, c.shape, c.groups, c.channels_last
        );
        assert_eq!(plan, c.plan, "{name}");
        assert_close(&name, &fused, &stock, &reference, c.kind);
    }
}

#[test]
fn emulated_geglu_kernels_match_libtorch() {
    // (kind, rows, inner, multiprocessors, plan): vector and scalar kernels, and a grid-stride
    // loop (32 blocks of 256 threads over 16384 vectors).
    let cases = [
        (Kind::Half, 14, 16, 2, "vec blocks=1"),
        (Kind::BFloat16, 3, 13, 2, "scalar blocks=1"),
        (Kind::Float, 128, 512, 1, "vec blocks=32"),
    ];
    tch::manual_seed(11);
    for (kind, rows, inner, multiprocessors, expected_plan) in cases {
        let input =
            (Tensor::randn([rows, 2 * inner], (Kind::Float, Device::Cpu)) * 2.0).to_kind(kind);
        let libtorch = |t: &Tensor| {
            let halves = t.chunk(2, -1);
            &halves[0] * halves[1].gelu("none")
        };
        let reference = libtorch(&input.to_kind(Kind::Float));
        let stock = libtorch(&input);
        let args: Vec<String> = [
            "geglu",
            dtype_name(kind),
            &rows.to_string(),
            &inner.to_string(),
            &multiprocessors.to_string(),
        ]
        .map(str::to_owned)
        .into();
        let (outputs, plan) = emulate(&args, &[Some(&input)], &[(kind, &[rows, inner])]);
        let name = format!("{kind:?} {rows}×{inner}");
        assert_eq!(plan, expected_plan, "{name}");
        assert_close(&name, &outputs[0], &stock, &reference, kind);
    }
}

#[test]
fn emulated_add_layer_norm_kernels_match_libtorch() {
    // (kind, rows, width, plan): SDXL's widths with vector loads, a width no vector divides
    // (and under a warp's 32 × 8), a partly filled last block (9 rows, 8 per block).
    let cases = [
        (Kind::Half, 6, 640, "vec blocks=1"),
        (Kind::BFloat16, 5, 1280, "vec blocks=1"),
        (Kind::Float, 3, 100, "vec blocks=1"),
        (Kind::Half, 9, 77, "scalar blocks=2"),
    ];
    tch::manual_seed(13);
    let eps = 1e-5;
    for (kind, rows, width, expected_plan) in cases {
        let f32s = (Kind::Float, Device::Cpu);
        let a = (Tensor::randn([rows, width], f32s) * 2.0).to_kind(kind);
        // The residual stream: an offset per column, larger than the sublayer's output.
        let b = (Tensor::randn([rows, width], f32s) * 4.0 + Tensor::randn([width], f32s) * 3.0)
            .to_kind(kind);
        let weight = (Tensor::rand([width], f32s) + 0.5).to_kind(kind);
        let bias = (Tensor::randn([width], f32s) * 0.1).to_kind(kind);
        let norm = |t: &Tensor, w: &Tensor, c: &Tensor| {
            t.layer_norm([width], Some(w), Some(c), eps, false)
        };
        let sum = &a + &b;
        let up = |t: &Tensor| t.to_kind(Kind::Float);
        let reference = norm(&up(&sum), &up(&weight), &up(&bias));
        let stock = norm(&sum, &weight, &bias);
        let args: Vec<String> = [
            "add_layer_norm",
            dtype_name(kind),
            &rows.to_string(),
            &width.to_string(),
            &eps.to_string(),
        ]
        .map(str::to_owned)
        .into();
        let inputs = [Some(&a), Some(&b), Some(&weight), Some(&bias)];
        let shape = [rows, width];
        let (outputs, plan) = emulate(&args, &inputs, &[(kind, &shape), (kind, &shape)]);
        let name = format!("{kind:?} {rows}×{width}");
        assert_eq!(plan, expected_plan, "{name}");
        assert!(
            outputs[0].equal(&sum),
            "{name}: the sum differs from libtorch's"
        );
        assert_close(&name, &outputs[1], &stock, &reference, kind);
    }
}
