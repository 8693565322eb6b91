//! LoRA switch time: loads a model and two LoRA sets, then times switching between them with
//! [`benchmark_switch`] (each switch fuses one set from the pristine weights and restores what
//! only the other set adapted; CUDA is synchronised before the clock is read).
//!
//! ```text
//! cargo run --release --example lora_switch [--features cuda] -- --model DIR \
//!   --a A.safetensors[:W] [--a …] --b B.safetensors[:W] [--b …] \
//!   [--device cpu|cuda] [--dtype f32|f16|bf16] [--rounds 10] [--threads N]
//! ```

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use darkroom_inference::device::{DType, DeviceSpec, resolve};
use darkroom_inference::lora::{LoraSpec, LoraWeights, benchmark_switch};
use darkroom_inference::pipeline::SdxlPipeline;

#[derive(Parser)]
#[command(about = "Time switching between two LoRA sets on an SDXL model")]
struct Args {
    /// A diffusers model folder or single-file checkpoint.
    #[arg(long)]
    model: PathBuf,
    /// LoRAs of set A, `PATH[:WEIGHT]`.
    #[arg(long = "a", required = true)]
    a: Vec<LoraSpec>,
    /// LoRAs of set B, `PATH[:WEIGHT]`.
    #[arg(long = "b", required = true)]
    b: Vec<LoraSpec>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// f32, f16 or bf16 (default: f32 on the CPU, f16 on CUDA).
    #[arg(long)]
    dtype: Option<DType>,
    /// Round trips A → B → A timed.
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// libtorch CPU threads (default: libtorch's choice).
    #[arg(long)]
    threads: Option<i32>,
}

fn load(pipeline: &SdxlPipeline, specs: &[LoraSpec]) -> anyhow::Result<Vec<LoraWeights>> {
    specs
        .iter()
        .map(|spec| {
            pipeline
                .load_lora(&spec.path)
                .with_context(|| format!("loading {}", spec.path.display()))
        })
        .collect()
}

fn weighted<'a>(loras: &'a [LoraWeights], specs: &[LoraSpec]) -> Vec<(&'a LoraWeights, f64)> {
    loras
        .iter()
        .zip(specs)
        .map(|(l, s)| (l, s.weight))
        .collect()
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(threads) = args.threads {
        tch::set_num_threads(threads);
    }
    let dtype = args.dtype.unwrap_or(match args.device {
        DeviceSpec::Cpu => DType::F32,
        DeviceSpec::Cuda(_) => DType::F16,
    });
    let (device, _) = resolve(args.device, dtype)?;
    let mut pipeline = SdxlPipeline::load(&args.model, None, device, dtype)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let a = load(&pipeline, &args.a)?;
    let b = load(&pipeline, &args.b)?;
    let (set_a, set_b) = (weighted(&a, &args.a), weighted(&b, &args.b));
    let factor_bytes: usize = a.iter().chain(&b).map(LoraWeights::bytes).sum();
    let result = benchmark_switch(&mut pipeline, &set_a, &set_b, args.rounds)?;
    println!(
        "{device:?} {dtype:?}, {} CPU threads: A ({} parameters) ⇄ B ({} parameters), {} switches: \
         median {:.2} ms, min {:.2} ms, max {:.2} ms; pristine copies {:.1} MB, LoRA factors {:.1} MB",
        tch::get_num_threads(),
        result.fused.0,
        result.fused.1,
        result.switches,
        result.median.as_secs_f64() * 1e3,
        result.min.as_secs_f64() * 1e3,
        result.max.as_secs_f64() * 1e3,
        result.pristine_bytes as f64 / 1e6,
        factor_bytes as f64 / 1e6,
    );
    Ok(())
}
