//! The ×2 upsampler's two formulations side by side at the shapes SDXL runs them: Darkroom's
//! phase convolution ([`Upsample2D::forward_phases`]: four 2×2 kernels over the input, interleaved)
//! and diffusers' direct one ([`Upsample2D::forward_direct`]: nearest doubling, then the 3×3
//! convolution). Prints each one's time and their largest difference relative to the output.
//!
//! ```text
//! cargo run --release --example upsampler [--features cuda] -- [--device cpu|cuda]
//!   [--dtype f32|f16|bf16] [--channels-last] [--scale K] [--iters N] [--threads N]
//! ```
//!
//! `--scale K` divides the maps' sides by K (for the CPU). Default dtype: f32 on the CPU; on CUDA
//! the UNet's f16 and the VAE's bf16.

use std::time::Instant;

use clap::Parser;
use darkroom_inference::device::{DType, DeviceSpec, resolve};
use darkroom_inference::kernels::to_channels_last;
use darkroom_inference::unet::resnet::Upsample2D;
use tch::{Device, Kind, Tensor, nn};

#[derive(Parser)]
#[command(about = "Time SDXL's ×2 upsampler: phase convolution against nearest doubling + 3×3")]
struct Args {
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// One dtype for every case (default: f32 on the CPU, the model's on CUDA).
    #[arg(long)]
    dtype: Option<DType>,
    /// Maps and weights stored channels-last (the `fused-nhwc` layout).
    #[arg(long)]
    channels_last: bool,
    /// Divide the maps' sides by this.
    #[arg(long, default_value_t = 1)]
    scale: i64,
    /// Timed calls per formulation, after two warm-up calls.
    #[arg(long, default_value_t = 20)]
    iters: u32,
    /// libtorch CPU threads (default: libtorch's choice).
    #[arg(long)]
    threads: Option<i32>,
}

/// One upsampler of SDXL: where, its input `[b, c, h, w]` and the model's dtype on a GPU.
struct Case {
    name: &'static str,
    input: [i64; 4],
    gpu_dtype: DType,
}

const CASES: [Case; 5] = [
    Case {
        name: "UNet up_blocks.0 1280×32² (CFG batch)",
        input: [2, 1280, 32, 32],
        gpu_dtype: DType::F16,
    },
    Case {
        name: "UNet up_blocks.1 640×64²",
        input: [2, 640, 64, 64],
        gpu_dtype: DType::F16,
    },
    Case {
        name: "VAE up_blocks.0 512×128²",
        input: [1, 512, 128, 128],
        gpu_dtype: DType::Bf16,
    },
    Case {
        name: "VAE up_blocks.1 512×256²",
        input: [1, 512, 256, 256],
        gpu_dtype: DType::Bf16,
    },
    Case {
        name: "VAE up_blocks.2 256×512²",
        input: [1, 256, 512, 512],
        gpu_dtype: DType::Bf16,
    },
];

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(threads) = args.threads {
        tch::set_num_threads(threads);
    }
    anyhow::ensure!(
        args.scale >= 1 && args.iters >= 1,
        "--scale and --iters must be ≥ 1"
    );
    let _no_grad = tch::no_grad_guard();
    println!("| upsampler | input | dtype | direct ms | phases ms | speed-up | max difference |");
    println!("|---|---|---|---:|---:|---:|---:|");
    for case in &CASES {
        let dtype = args.dtype.unwrap_or(match args.device {
            DeviceSpec::Cpu => DType::F32,
            DeviceSpec::Cuda(_) => case.gpu_dtype,
        });
        let (device, kind) = resolve(args.device, dtype)?;
        let [b, c, h, w] = case.input;
        let input = [b, c, h / args.scale, w / args.scale];
        let vs = nn::VarStore::new(device);
        let up = Upsample2D::new(vs.root(), c, c)?;
        for (name, mut var) in vs.variables() {
            let fan_in = (c * 9) as f64;
            let values = Tensor::randn(var.size(), (Kind::Float, device)) / fan_in.sqrt();
            let values = if name.ends_with("weight") && args.channels_last {
                to_channels_last(&values)
            } else {
                values
            };
            var.set_data(&values.to_kind(kind));
        }
        let xs = Tensor::randn(input, (kind, device));
        let xs = if args.channels_last {
            to_channels_last(&xs)
        } else {
            xs
        };
        let direct = up.forward_direct(&xs);
        let phases = up.forward_phases(&xs);
        let difference = (&phases.to_kind(Kind::Float) - direct.to_kind(Kind::Float))
            .abs()
            .max()
            .double_value(&[])
            / direct.abs().max().to_kind(Kind::Float).double_value(&[]);
        let time = |f: &dyn Fn() -> Tensor| {
            for _ in 0..2 {
                let _ = f();
            }
            sync(device);
            let started = Instant::now();
            for _ in 0..args.iters {
                let _ = f();
            }
            sync(device);
            started.elapsed().as_secs_f64() * 1e3 / f64::from(args.iters)
        };
        let direct_ms = time(&|| up.forward_direct(&xs));
        let phases_ms = time(&|| up.forward_phases(&xs));
        println!(
            "| {} | {:?} | {:?} | {direct_ms:.3} | {phases_ms:.3} | {:.2}× | {difference:.1e} |",
            case.name,
            input,
            kind,
            direct_ms / phases_ms
        );
    }
    Ok(())
}

fn sync(device: Device) {
    if let Device::Cuda(index) = device {
        tch::Cuda::synchronize(index as i64);
    }
}
