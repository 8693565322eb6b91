//! The fused kernels (`darkroom_inference::kernels`) against libtorch's, side by side on one
//! CUDA device, at the shapes SDXL runs them: how far each is from an f32 computation on the
//! same inputs, and how long each takes. Exits non-zero when a fused result is further from the
//! f32 reference than twice libtorch's own error (plus one rounding step of the output).
//!
//! ```text
//! cargo run --release --features cuda --example fused_kernels -- [--device cuda:N] [--iters 50]
//! ```

use std::time::Instant;

use anyhow::{Context, bail};
use clap::Parser;
use darkroom_inference::device::{DType, DeviceSpec, resolve};
use darkroom_inference::kernels::{self, add_layer_norm, geglu, group_norm};
use tch::{Device, Kind, Tensor};

#[derive(Parser)]
#[command(about = "Darkroom's fused kernels against libtorch's, on a CUDA device")]
struct Args {
    /// cuda or cuda:N.
    #[arg(long, default_value = "cuda")]
    device: DeviceSpec,
    /// Timed repetitions of each operation (after 3 untimed).
    #[arg(long, default_value_t = 50)]
    iters: usize,
}

/// One operation at one shape, as the UNet or VAE runs it.
struct Case {
    name: &'static str,
    kind: Kind,
    op: Op,
}

enum Op {
    /// `silu(group_norm(x + shift))` over `[n, c, h, w]` (shift when `shifted`), or without SiLU.
    GroupNorm {
        shape: [i64; 4],
        groups: i64,
        eps: f64,
        shifted: bool,
        silu: bool,
        channels_last: bool,
    },
    /// GEGLU of `[n, tokens, 2 × inner]`.
    Geglu { shape: [i64; 3] },
    /// `layer_norm(a + b)` over `[n, tokens, width]` (the norm's output is compared).
    AddLayerNorm { shape: [i64; 3] },
}

fn cases() -> Vec<Case> {
    let norm = |shape, shifted, silu, eps| Op::GroupNorm {
        shape,
        groups: 32,
        eps,
        shifted,
        silu,
        channels_last: false,
    };
    let nhwc = |shape, shifted, silu, eps| Op::GroupNorm {
        shape,
        groups: 32,
        eps,
        shifted,
        silu,
        channels_last: true,
    };
    use Kind::{BFloat16, Half};
    vec![
        Case {
            name: "UNet resnet norm1+SiLU 320×128²",
            kind: Half,
            op: norm([2, 320, 128, 128], false, true, 1e-5),
        },
        Case {
            name: "UNet resnet norm2(+temb)+SiLU 320×128²",
            kind: Half,
            op: norm([2, 320, 128, 128], true, true, 1e-5),
        },
        Case {
            name: "UNet resnet norm2(+temb)+SiLU 640×64²",
            kind: Half,
            op: norm([2, 640, 64, 64], true, true, 1e-5),
        },
        Case {
            name: "UNet resnet norm2(+temb)+SiLU 1280×32²",
            kind: Half,
            op: norm([2, 1280, 32, 32], true, true, 1e-5),
        },
        Case {
            name: "channels-last norm2(+temb)+SiLU 320×128²",
            kind: Half,
            op: nhwc([2, 320, 128, 128], true, true, 1e-5),
        },
        Case {
            name: "channels-last norm2(+temb)+SiLU 640×64²",
            kind: Half,
            op: nhwc([2, 640, 64, 64], true, true, 1e-5),
        },
        Case {
            name: "channels-last norm2(+temb)+SiLU 1280×32²",
            kind: Half,
            op: nhwc([2, 1280, 32, 32], true, true, 1e-5),
        },
        Case {
            name: "channels-last transformer norm 640×64²",
            kind: Half,
            op: nhwc([2, 640, 64, 64], false, false, 1e-6),
        },
        Case {
            name: "UNet transformer norm 640×64²",
            kind: Half,
            op: norm([2, 640, 64, 64], false, false, 1e-6),
        },
        Case {
            name: "odd size (scalar kernels) 320×33²",
            kind: Half,
            op: norm([2, 320, 33, 33], true, true, 1e-5),
        },
        Case {
            name: "VAE decoder norm+SiLU 512×128² bf16",
            kind: BFloat16,
            op: norm([1, 512, 128, 128], false, true, 1e-6),
        },
        Case {
            name: "VAE decoder norm+SiLU 128×1024² bf16",
            kind: BFloat16,
            op: norm([1, 128, 1024, 1024], false, true, 1e-6),
        },
        Case {
            name: "channels-last VAE decoder norm+SiLU 512×128² bf16",
            kind: BFloat16,
            op: nhwc([1, 512, 128, 128], false, true, 1e-6),
        },
        Case {
            name: "channels-last VAE decoder norm+SiLU 256×1024² bf16",
            kind: BFloat16,
            op: nhwc([1, 256, 1024, 1024], false, true, 1e-6),
        },
        Case {
            name: "channels-last VAE decoder norm+SiLU 128×1024² bf16",
            kind: BFloat16,
            op: nhwc([1, 128, 1024, 1024], false, true, 1e-6),
        },
        Case {
            name: "add+LayerNorm 4096 tokens × 640",
            kind: Half,
            op: Op::AddLayerNorm {
                shape: [2, 4096, 640],
            },
        },
        Case {
            name: "add+LayerNorm 1024 tokens × 1280",
            kind: Half,
            op: Op::AddLayerNorm {
                shape: [2, 1024, 1280],
            },
        },
        Case {
            name: "GEGLU 4096 tokens, inner 2560",
            kind: Half,
            op: Op::Geglu {
                shape: [2, 4096, 5120],
            },
        },
        Case {
            name: "GEGLU 1024 tokens, inner 5120",
            kind: Half,
            op: Op::Geglu {
                shape: [2, 1024, 10240],
            },
        },
        Case {
            name: "GEGLU 77 tokens, odd inner 1001 (scalar)",
            kind: Half,
            op: Op::Geglu {
                shape: [2, 77, 2002],
            },
        },
    ]
}

/// The operation's inputs on `device` (seeded), and a closure running it on given inputs.
/// An operation's inputs and the operation.
type Workload = (Vec<Tensor>, Box<dyn Fn(&[Tensor]) -> Tensor>);

fn run(op: &Op, kind: Kind, device: Device) -> Workload {
    match *op {
        Op::GroupNorm {
            shape,
            groups,
            eps,
            shifted,
            silu,
            channels_last,
        } => {
            let channels = shape[1];
            let options = (kind, device);
            // Activations with an offset per channel, as in a real UNet (not centred).
            let x = Tensor::randn(shape, options) * 3.0
                + Tensor::randn([1, channels, 1, 1], options) * 2.0;
            let inputs = vec![
                if channels_last {
                    kernels::to_channels_last(&x)
                } else {
                    x
                },
                Tensor::randn([shape[0], channels], options),
                Tensor::rand([channels], options) + 0.5,
                Tensor::randn([channels], options) * 0.1,
            ];
            let f = move |t: &[Tensor]| {
                let shift = shifted.then_some(&t[1]);
                group_norm(&t[0], shift, (&t[2], &t[3]), groups, eps, silu)
            };
            (inputs, Box::new(f))
        }
        Op::Geglu { shape } => {
            let inputs = vec![Tensor::randn(shape, (kind, device)) * 2.0];
            (inputs, Box::new(|t: &[Tensor]| geglu(&t[0])))
        }
        Op::AddLayerNorm { shape } => {
            let options = (kind, device);
            let width = shape[2];
            let inputs = vec![
                Tensor::randn(shape, options) * 2.0,
                Tensor::randn(shape, options) * 4.0 + Tensor::randn([width], options) * 3.0,
                Tensor::rand([width], options) + 0.5,
                Tensor::randn([width], options) * 0.1,
            ];
            let f = |t: &[Tensor]| add_layer_norm(&t[0], &t[1], (&t[2], &t[3]), 1e-5).1;
            (inputs, Box::new(f))
        }
    }
}

/// Seconds per call of `f` (CUDA synchronised around the timed loop).
fn time(f: &dyn Fn() -> Tensor, iters: usize, index: i64) -> f64 {
    for _ in 0..3 {
        let _ = f();
    }
    tch::Cuda::synchronize(index);
    let started = Instant::now();
    for _ in 0..iters {
        let _ = f();
    }
    tch::Cuda::synchronize(index);
    started.elapsed().as_secs_f64() / iters as f64
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs().max().double_value(&[])
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (device, _) = resolve(args.device, DType::F16).context("--device")?;
    let Device::Cuda(index) = device else {
        bail!("the fused kernels run on CUDA devices only (--device cuda)");
    };
    tch::manual_seed(0);
    let compiling = Instant::now();
    kernels::enable_fused_kernels(index)?;
    println!(
        "fused kernels compiled and loaded for cuda:{index} in {:.2} s; {} timed runs each\n",
        compiling.elapsed().as_secs_f64(),
        args.iters
    );
    println!(
        "| {:<42} | {:>11} | {:>11} | {:>9} | {:>9} | {:>7} |",
        "operation", "err libtorch", "err fused", "libtorch µs", "fused µs", "speed-up"
    );
    println!(
        "|{:-<44}|{:-<14}|{:-<13}|{:-<13}|{:-<11}|{:-<9}|",
        "", "", "", "", "", ""
    );
    let mut failures = Vec::new();
    for case in cases() {
        let (inputs, f) = run(&case.op, case.kind, device);
        let upcast: Vec<Tensor> = inputs.iter().map(|t| t.to_kind(Kind::Float)).collect();
        kernels::disable_fused_kernels();
        let reference = f(&upcast);
        let stock = f(&inputs);
        let stock_s = time(&|| f(&inputs), args.iters, index as i64);
        kernels::enable_fused_kernels(index)?;
        let fused = f(&inputs);
        let fused_s = time(&|| f(&inputs), args.iters, index as i64);
        let stock_err = max_abs(&(stock.to_kind(Kind::Float) - &reference));
        let fused_err = max_abs(&(fused.to_kind(Kind::Float) - &reference));
        // One rounding step of the output's largest values in its precision.
        let step = max_abs(&reference)
            * match case.kind {
                Kind::BFloat16 => 2f64.powi(-8),
                _ => 2f64.powi(-11),
            };
        // The fused GroupNorm keeps its input's layout (libtorch's returns a contiguous map).
        let layout_kept = match case.op {
            Op::GroupNorm {
                channels_last: true,
                ..
            } => kernels::is_channels_last(&fused),
            _ => fused.is_contiguous(),
        };
        if !layout_kept
            || fused.size() != stock.size()
            || fused_err.is_nan()
            || fused_err > 2.0 * stock_err + step
        {
            failures.push(case.name);
        }
        println!(
            "| {:<42} | {:>11.3e} | {:>11.3e} | {:>11.1} | {:>9.1} | {:>7.2}× |",
            case.name,
            stock_err,
            fused_err,
            stock_s * 1e6,
            fused_s * 1e6,
            stock_s / fused_s
        );
    }
    println!(
        "\nerr = largest absolute difference from the same operation in f32 on the same inputs."
    );
    if !failures.is_empty() {
        bail!("fused results out of tolerance: {}", failures.join(", "));
    }
    Ok(())
}
