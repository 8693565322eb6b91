//! `darkroom-bench`: Darkroom's SDXL pipeline and diffusers' `StableDiffusionXLPipeline` side by
//! side, in one run, on the same random weights (see BENCHMARKS.md at the repository root).
//!
//! ```text
//! darkroom-bench --size tiny|full --device cpu|cuda --dtype f32|f16|bf16 --steps N
//!   --width W --height H --runs R [--workload txt2img|profile] [--model DIR]
//!   [--controlnet DIR --lora FILE] [--python PATH] [--json OUT] [--kernel-profile]
//! ```
//!
//! `--workload profile` is the shape of the profile presets: img2img at strength 0.6 with one
//! ControlNet (scale 0.6, active for the first 80 % of the steps) and one LoRA fused at weight
//! 0.8; for generated models the ControlNet and a rank-32 LoRA are generated too
//! (`bench_diffusers.py --make-extras`).
//!
//! Without `--model` the weights are generated once by `reference/bench_diffusers.py --make-model`
//! (tiny: reference/pipeline.py's test model; full: the SDXL 1.0 base architecture) and cached
//! under `<target>/darkroom-bench/`. diffusers runs first, as a subprocess of that script
//! (`--run`), and exits before Darkroom loads, so each side has the device to itself.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use darkroom_inference::device::{DType, DeviceSpec, resolve};
use darkroom_inference::kernels::KernelChoice;
use darkroom_inference::pipeline::{
    ControlInput, GenerateRequest, InitImage, LoadOptions, SdxlPipeline, Timings,
};
use darkroom_inference::profile::{self, Profile};
use darkroom_inference::scheduler::SchedulerKind;
use serde::{Deserialize, Serialize};

/// Which generated model to use when `--model` is not given.
#[derive(Clone, Copy, Debug, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Size {
    /// reference/pipeline.py's tiny random SDXL (~50 MB).
    Tiny,
    /// The SDXL 1.0 base architecture with random weights (~7 GB in f16).
    Full,
}

/// What each timed image does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Workload {
    /// Text to image.
    Txt2img,
    /// The profile presets' shape: img2img + one ControlNet + one fused LoRA.
    Profile,
}

#[derive(Parser)]
#[command(
    version,
    about = "Benchmark Darkroom's SDXL pipeline against diffusers on the same weights"
)]
struct Args {
    /// Generated model to benchmark when --model is not given.
    #[arg(long, value_enum, default_value = "tiny")]
    size: Size,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: DType,
    /// Denoising steps (Euler, guidance 5).
    #[arg(long, default_value_t = 30)]
    steps: usize,
    /// Image width in pixels (a multiple of 32 for the tiny model).
    #[arg(long, default_value_t = 1024)]
    width: u32,
    /// Image height in pixels.
    #[arg(long, default_value_t = 1024)]
    height: u32,
    /// Timed runs per side, after one warm-up run.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Any diffusers SDXL folder instead of a generated one.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Python with torch and diffusers (default: $VIRTUAL_ENV/bin/python, else <repo>/.venv).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Where generated models are cached (default: <target>/darkroom-bench).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Seed of the initial noise (the same for both sides).
    #[arg(long, default_value_t = 0)]
    seed: i64,
    /// What each timed image does.
    #[arg(long, value_enum, default_value = "txt2img")]
    workload: Workload,
    /// `profile`: a diffusers ControlNet folder (default: the generated one).
    #[arg(long)]
    controlnet: Option<PathBuf>,
    /// `profile`: a LoRA file (default: the generated rank-32 one).
    #[arg(long)]
    lora: Option<PathBuf>,
    /// `profile`: the LoRA's weight.
    #[arg(long, default_value_t = 0.8)]
    lora_weight: f64,
    /// `profile`: img2img strength.
    #[arg(long, default_value_t = 0.6)]
    strength: f64,
    /// `profile`: ControlNet conditioning scale.
    #[arg(long, default_value_t = 0.6)]
    control_scale: f64,
    /// `profile`: the fraction of the steps after which the ControlNet stops.
    #[arg(long, default_value_t = 0.8)]
    control_end: f64,
    /// Darkroom's VAE precision (default: diffusers' rule, f32 next to f16).
    #[arg(long)]
    vae_dtype: Option<DType>,
    /// Run Darkroom's denoising steps eagerly instead of as CUDA graphs.
    #[arg(long)]
    no_cuda_graphs: bool,
    /// cuDNN autotuning for Darkroom's convolutions.
    #[arg(long)]
    cudnn_benchmark: bool,
    /// Darkroom's attention kernels: default, fa3 or cudnn.
    #[arg(long, default_value = "default")]
    attention: String,
    /// Time Darkroom alone (no diffusers run; the table has no ratios).
    #[arg(long)]
    no_diffusers: bool,
    /// Also time Darkroom with CUDA graphs off, on the same loaded pipeline (another row).
    #[arg(long)]
    also_eager: bool,
    /// Darkroom's GroupNorm+SiLU and GEGLU kernels on CUDA: libtorch's (`stock`), Darkroom's
    /// fused ones (`fused`, compiled with NVRTC at start), or those with the UNet's, the VAE's
    /// and the ControlNets' convolution weights stored channels-last (`fused-nhwc`).
    #[arg(long, default_value_t = KernelChoice::Stock)]
    kernels: KernelChoice,
    /// Also time Darkroom with these `--kernels` choices (comma-separated), each on the same
    /// loaded pipeline: a row each, and the pixel difference from the main row's image.
    #[arg(long, value_delimiter = ',')]
    also_kernels: Vec<KernelChoice>,
    /// After the timed runs, generate one more image per kernel choice (`--kernels`, then
    /// `--also-kernels`) under libtorch's profiler and print where its time went: on a GPU the
    /// kernel time by class (matrix products, attention, normalisation…) and the longest
    /// kernels, on the CPU the longest operations the pipeline called.
    #[arg(long)]
    kernel_profile: bool,
    /// Rows of the longest kernels or operations in `--kernel-profile`'s tables.
    #[arg(long, default_value_t = 20)]
    kernel_profile_top: usize,
    /// Save each side's last image here (darkroom.png, diffusers.png, and darkroom-ROW.png
    /// for the other rows: eager, stock, fused, fused-nhwc).
    #[arg(long)]
    images: Option<PathBuf>,
}

/// The profile workload's inputs, shared by both sides.
#[derive(Debug, Serialize)]
struct ProfileInputs {
    controlnet: PathBuf,
    lora: PathBuf,
    init: PathBuf,
    control: PathBuf,
}

/// Darkroom with one setting changed from the main row's.
struct Variant {
    /// `eager`, `fused` or `stock`.
    name: &'static str,
    side: Side,
    image: image::RgbImage,
}

/// What one side measured.
#[derive(Debug, Serialize)]
struct Side {
    load_s: f64,
    seconds: Vec<f64>,
    denoise_s: Vec<f64>,
    /// Darkroom's phases outside the denoising loop, per timed image (empty for diffusers):
    /// prompt encoding (host time: its GPU work finishes inside the first step), preparation
    /// (noise, img2img's VAE encode, control images), VAE decode and conversion to pixels.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    phases_s: Vec<Phases>,
    steps: usize,
    /// Peak memory in bytes: device memory in use (nvidia-smi, over the idle baseline) on CUDA,
    /// the process's peak RSS on the CPU.
    peak_bytes: Option<u64>,
}

impl Side {
    fn mean(&self) -> f64 {
        self.seconds.iter().sum::<f64>() / self.seconds.len().max(1) as f64
    }
    fn min(&self) -> f64 {
        self.seconds.iter().copied().fold(f64::INFINITY, f64::min)
    }
    fn its(&self) -> f64 {
        let denoise = self.denoise_s.iter().sum::<f64>() / self.denoise_s.len().max(1) as f64;
        self.steps as f64 / denoise.max(f64::EPSILON)
    }
}

/// Seconds of one image's phases outside the denoising loop.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize)]
struct Phases {
    text: f64,
    prepare: f64,
    decode: f64,
}

/// The JSON line `bench_diffusers.py --run` prints.
#[derive(Debug, Deserialize, Serialize)]
struct DiffusersReport {
    load_s: f64,
    seconds: Vec<f64>,
    denoise_s: Vec<f64>,
    steps: usize,
    peak_rss_bytes: u64,
    cuda_max_allocated_bytes: Option<u64>,
    cuda_max_reserved_bytes: Option<u64>,
    threads: i32,
    torch: String,
    diffusers: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let repo = repo_root();
    let script = repo.join("functions/inference/reference/bench_diffusers.py");
    let python = args.python.clone().unwrap_or_else(|| default_python(&repo));
    let (device, _) = resolve(args.device, args.dtype)?;
    let cuda_index = match args.device {
        DeviceSpec::Cuda(index) => Some(index),
        DeviceSpec::Cpu => None,
    };

    let cache = args
        .cache
        .clone()
        .unwrap_or_else(|| target_dir(&repo).join("darkroom-bench"));
    let model = match &args.model {
        Some(model) => model.clone(),
        None => generated_model(&python, &script, &cache, args.size, args.dtype)?,
    };
    eprintln!("model: {}", model.display());
    let profile = match args.workload {
        Workload::Txt2img => None,
        Workload::Profile => Some(profile_inputs(&args, &python, &script, &cache, &model)?),
    };
    warm_page_cache(&model)?;
    if let Some(inputs) = &profile {
        warm_page_cache(&inputs.controlnet)?;
    }
    let threads = tch::get_num_threads();

    let diffusers = if args.no_diffusers {
        None
    } else {
        eprintln!("diffusers: warm-up + {} runs…", args.runs);
        Some(run_diffusers(
            &args,
            &python,
            &script,
            &model,
            profile.as_ref(),
            threads,
            cuda_index,
        )?)
    };

    eprintln!("darkroom: warm-up + {} runs…", args.runs);
    let darkroom = run_darkroom(&args, &model, profile.as_ref(), device, cuda_index)?;

    print_table(&args, &model, threads, &darkroom, diffusers.as_ref());
    for (choice, recorded) in &darkroom.profiles {
        println!(
            "\n#### Where one image's time goes: {} kernels (per step: the image's total over its {} steps)\n",
            choice.name(),
            darkroom.side.steps
        );
        print!(
            "{}",
            recorded.report(args.kernel_profile_top, (darkroom.side.steps, "step"))
        );
    }
    if let Some(dir) = &args.images {
        std::fs::create_dir_all(dir)?;
        darkroom.image.save(dir.join("darkroom.png"))?;
        for variant in &darkroom.variants {
            variant
                .image
                .save(dir.join(format!("darkroom-{}.png", variant.name)))?;
        }
    }
    if let Some(path) = &args.json {
        let value = serde_json::json!({
            "size": args.size,
            "workload": args.workload,
            "profile": profile,
            "device": args.device.to_string(),
            "dtype": args.dtype,
            "steps": args.steps,
            "width": args.width,
            "height": args.height,
            "runs": args.runs,
            "threads": threads,
            "model": model,
            "darkroom": darkroom.side,
            "kernels": args.kernels,
            "darkroom_variants": darkroom.variants.iter().map(|v| serde_json::json!({
                "name": v.name,
                "side": v.side,
            })).collect::<Vec<_>>(),
            "cuda_graphs": darkroom.graphs,
            "darkroom_allocator": darkroom.allocator,
            "diffusers": diffusers.as_ref().map(|d| &d.0),
            "diffusers_report": diffusers.as_ref().map(|d| &d.1),
        });
        std::fs::write(path, serde_json::to_string_pretty(&value)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The repository: the working directory when it is one, else where this crate was built from.
fn repo_root() -> PathBuf {
    let marker = "functions/inference/reference/bench_diffusers.py";
    if let Ok(cwd) = std::env::current_dir()
        && cwd.join(marker).exists()
    {
        return cwd;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn default_python(repo: &Path) -> PathBuf {
    match std::env::var_os("VIRTUAL_ENV") {
        Some(venv) => PathBuf::from(venv).join("bin/python"),
        None => repo.join(".venv/bin/python"),
    }
}

fn target_dir(repo: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo.join("target"))
}

/// The dtype a generated model is stored in: the tiny model is always f32 (pipeline.py's), the
/// full one is stored in the run dtype.
fn stored_dtype(size: Size, dtype: DType) -> &'static str {
    match size {
        Size::Tiny => "f32",
        Size::Full => dtype_name(dtype),
    }
}

/// The cached generated model folder, made on first use (into a scratch folder, then renamed).
fn generated_model(
    python: &Path,
    script: &Path,
    cache: &Path,
    size: Size,
    dtype: DType,
) -> anyhow::Result<PathBuf> {
    let stored = stored_dtype(size, dtype);
    let name = match size {
        Size::Tiny => "tiny".to_owned(),
        Size::Full => format!("full-{stored}"),
    };
    let dir = cache.join(&name);
    if dir.join(".done").exists() {
        return Ok(dir.join("model"));
    }
    let scratch = cache.join(format!("{name}.tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    eprintln!("generating the {name} model into {} (once)…", dir.display());
    let size_arg = match size {
        Size::Tiny => "tiny",
        Size::Full => "full",
    };
    let status = Command::new(python)
        .arg(script)
        .arg("--make-model")
        .arg(&scratch)
        .args(["--size", size_arg, "--dtype", stored])
        .env("HF_HUB_OFFLINE", "1")
        .stdout(Stdio::null())
        .status()
        .with_context(|| format!("running {}", python.display()))?;
    if !status.success() {
        bail!("{} --make-model failed ({status})", script.display());
    }
    std::fs::write(scratch.join(".done"), b"")?;
    std::fs::rename(&scratch, &dir)
        .with_context(|| format!("moving {} to {}", scratch.display(), dir.display()))?;
    Ok(dir.join("model"))
}

/// The ControlNet, LoRA and input images of the profile workload: the given ones, else generated
/// next to the generated model (once), and two synthetic W×H images (a smooth portrait-like
/// init image and an edge map), rewritten on every run.
fn profile_inputs(
    args: &Args,
    python: &Path,
    script: &Path,
    cache: &Path,
    model: &Path,
) -> anyhow::Result<ProfileInputs> {
    let root = model.parent().unwrap_or(model);
    let extras = root.join("extras");
    let (controlnet, lora) = match (&args.controlnet, &args.lora) {
        (Some(controlnet), Some(lora)) => (controlnet.clone(), lora.clone()),
        (None, None) if args.model.is_none() => {
            if !extras.join(".done").exists() {
                eprintln!(
                    "generating a ControlNet and two LoRAs into {} (once)…",
                    extras.display()
                );
                let status = Command::new(python)
                    .arg(script)
                    .arg("--make-extras")
                    .arg(&extras)
                    .arg("--model")
                    .arg(model)
                    .args(["--dtype", stored_dtype(args.size, args.dtype)])
                    .env("HF_HUB_OFFLINE", "1")
                    .stdout(Stdio::null())
                    .status()
                    .with_context(|| format!("running {}", python.display()))?;
                if !status.success() {
                    bail!("{} --make-extras failed ({status})", script.display());
                }
                std::fs::write(extras.join(".done"), b"")?;
            }
            (extras.join("controlnet"), extras.join("lora/a.safetensors"))
        }
        _ => bail!("--workload profile with --model needs both --controlnet and --lora"),
    };
    let inputs = cache.join("inputs");
    std::fs::create_dir_all(&inputs)?;
    let (w, h) = (args.width, args.height);
    let init = inputs.join(format!("init-{w}x{h}.png"));
    let control = inputs.join(format!("edges-{w}x{h}.png"));
    synthetic_portrait(w, h)
        .save(&init)
        .with_context(|| format!("writing {}", init.display()))?;
    synthetic_edges(w, h)
        .save(&control)
        .with_context(|| format!("writing {}", control.display()))?;
    Ok(ProfileInputs {
        controlnet,
        lora,
        init,
        control,
    })
}

/// A warm backdrop gradient with a lighter ellipse where a face would be.
fn synthetic_portrait(width: u32, height: u32) -> image::RgbImage {
    image::RgbImage::from_fn(width, height, |x, y| {
        let (u, v) = (
            f64::from(x) / f64::from(width),
            f64::from(y) / f64::from(height),
        );
        let face = ((u - 0.5) / 0.22).powi(2) + ((v - 0.42) / 0.3).powi(2) < 1.0;
        let channel = |base: f64| (base * 255.0).round().clamp(0.0, 255.0) as u8;
        if face {
            image::Rgb([channel(0.86 - 0.1 * v), channel(0.68), channel(0.58)])
        } else {
            image::Rgb([
                channel(0.3 + 0.3 * u),
                channel(0.25 + 0.2 * v),
                channel(0.2),
            ])
        }
    })
}

/// White outlines on black, as a canny map of [`synthetic_portrait`] would look.
fn synthetic_edges(width: u32, height: u32) -> image::RgbImage {
    image::RgbImage::from_fn(width, height, |x, y| {
        let (u, v) = (
            f64::from(x) / f64::from(width),
            f64::from(y) / f64::from(height),
        );
        let r = ((u - 0.5) / 0.22).powi(2) + ((v - 0.42) / 0.3).powi(2);
        let on = (r - 1.0).abs() < 0.03 || (v - 0.85).abs() < 0.004;
        if on {
            image::Rgb([255; 3])
        } else {
            image::Rgb([0; 3])
        }
    })
}

/// Reads every file of the model once, so both sides load from the page cache.
fn warm_page_cache(dir: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            warm_page_cache(&path)?;
        } else {
            let mut file = std::fs::File::open(&path)?;
            std::io::copy(&mut file, &mut std::io::sink())?;
        }
    }
    Ok(())
}

/// Samples the GPU's used memory (nvidia-smi, MiB) in the background and keeps the maximum.
struct GpuMemoryPeak {
    stop: Arc<AtomicBool>,
    peak_mib: Arc<AtomicU64>,
    baseline_mib: u64,
    thread: std::thread::JoinHandle<()>,
}

fn gpu_used_mib(index: usize) -> Option<u64> {
    let output = Command::new("nvidia-smi")
        .args([
            "--query-gpu=memory.used",
            "--format=csv,noheader,nounits",
            &format!("--id={index}"),
        ])
        .output()
        .ok()?;
    String::from_utf8_lossy(&output.stdout).trim().parse().ok()
}

impl GpuMemoryPeak {
    /// Starts sampling; `None` when nvidia-smi does not answer.
    fn start(index: usize) -> Option<Self> {
        let baseline_mib = gpu_used_mib(index)?;
        let stop = Arc::new(AtomicBool::new(false));
        let peak_mib = Arc::new(AtomicU64::new(baseline_mib));
        let thread = {
            let (stop, peak) = (stop.clone(), peak_mib.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(used) = gpu_used_mib(index) {
                        peak.fetch_max(used, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        };
        Some(GpuMemoryPeak {
            stop,
            peak_mib,
            baseline_mib,
            thread,
        })
    }

    /// Stops sampling; the peak over the baseline, in bytes.
    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        let peak = self.peak_mib.load(Ordering::Relaxed);
        peak.saturating_sub(self.baseline_mib) * 1024 * 1024
    }
}

fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn run_diffusers(
    args: &Args,
    python: &Path,
    script: &Path,
    model: &Path,
    profile: Option<&ProfileInputs>,
    threads: i32,
    cuda_index: Option<usize>,
) -> anyhow::Result<(Side, DiffusersReport)> {
    let memory = cuda_index.and_then(GpuMemoryPeak::start);
    let mut command = Command::new(python);
    command
        .arg(script)
        .arg("--run")
        .arg("--model")
        .arg(model)
        .args(["--device", &args.device.to_string()])
        .args(["--dtype", dtype_name(args.dtype)])
        .args(["--steps", &args.steps.to_string()])
        .args(["--width", &args.width.to_string()])
        .args(["--height", &args.height.to_string()])
        .args(["--runs", &args.runs.to_string()])
        .args(["--threads", &threads.to_string()])
        .args(["--seed", &args.seed.to_string()])
        .env("HF_HUB_OFFLINE", "1");
    if let Some(dir) = &args.images {
        std::fs::create_dir_all(dir)?;
        command.arg("--save-image").arg(dir.join("diffusers.png"));
    }
    if let Some(inputs) = profile {
        command
            .args(["--workload", "profile"])
            .arg("--controlnet")
            .arg(&inputs.controlnet)
            .arg("--lora")
            .arg(&inputs.lora)
            .arg("--init")
            .arg(&inputs.init)
            .arg("--control")
            .arg(&inputs.control)
            .args(["--lora-weight", &args.lora_weight.to_string()])
            .args(["--strength", &args.strength.to_string()])
            .args(["--control-scale", &args.control_scale.to_string()])
            .args(["--control-end", &args.control_end.to_string()]);
    }
    let output = command
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    let gpu_peak = memory.map(GpuMemoryPeak::finish);
    if !output.status.success() {
        bail!(
            "{} --run failed ({}):\n{}",
            script.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .context("bench_diffusers.py printed no JSON")?;
    let report: DiffusersReport =
        serde_json::from_str(line).context("parsing bench_diffusers.py's JSON")?;
    let side = Side {
        load_s: report.load_s,
        seconds: report.seconds.clone(),
        denoise_s: report.denoise_s.clone(),
        phases_s: Vec::new(),
        steps: report.steps,
        peak_bytes: match cuda_index {
            Some(_) => gpu_peak,
            None => Some(report.peak_rss_bytes),
        },
    };
    Ok((side, report))
}

/// What the Darkroom side measured.
struct DarkroomRun {
    /// Default settings (CUDA graphs on a GPU) and `--kernels`.
    side: Side,
    /// Its last image.
    image: image::RgbImage,
    /// The same pipeline with one setting changed (`--also-eager`, `--also-other-kernels`).
    variants: Vec<Variant>,
    /// `--kernel-profile`: one image per kernel choice under the profiler.
    profiles: Vec<(KernelChoice, Profile)>,
    /// "on", "off" or why recording failed.
    graphs: String,
    /// The caching allocator's peaks over the default runs (CUDA builds on a GPU).
    allocator: Option<(u64, u64, u64)>,
}

fn run_darkroom(
    args: &Args,
    model: &Path,
    profile: Option<&ProfileInputs>,
    device: tch::Device,
    cuda_index: Option<usize>,
) -> anyhow::Result<DarkroomRun> {
    let sync = || {
        if let Some(index) = cuda_index {
            tch::Cuda::synchronize(index as i64);
        }
    };
    #[cfg(feature = "cuda")]
    if cuda_index.is_some() {
        use darkroom_inference::cuda::{
            AttentionKernels, set_attention_kernels, set_cudnn_benchmark,
        };
        set_cudnn_benchmark(args.cudnn_benchmark)?;
        set_attention_kernels(match args.attention.as_str() {
            "default" => AttentionKernels::Default,
            "fa3" => AttentionKernels::Flash3,
            "cudnn" => AttentionKernels::CuDnn,
            other => bail!("--attention {other}: expected default, fa3 or cudnn"),
        })?;
    }
    let memory = cuda_index.and_then(GpuMemoryPeak::start);
    let started = Instant::now();
    let options = LoadOptions {
        vae_dtype: args.vae_dtype,
        ..LoadOptions::default()
    };
    let mut pipeline = SdxlPipeline::load_with(model, device, args.dtype, &options)
        .with_context(|| format!("loading {}", model.display()))?;
    // Like for like: diffusers encodes every image's prompt, and so does Darkroom here (a
    // service rendering presets would remember them).
    pipeline.set_prompt_cache(0);
    let (init, controls) = match profile {
        None => (None, Vec::new()),
        Some(inputs) => {
            let controlnet = pipeline
                .load_controlnet(&inputs.controlnet)
                .with_context(|| format!("loading {}", inputs.controlnet.display()))?;
            let lora = pipeline
                .load_lora(&inputs.lora)
                .with_context(|| format!("loading {}", inputs.lora.display()))?;
            pipeline.set_loras(&[(&lora, args.lora_weight)])?;
            let read = |path: &Path| -> anyhow::Result<image::RgbImage> {
                Ok(image::open(path)
                    .with_context(|| format!("reading {}", path.display()))?
                    .to_rgb8())
            };
            let init = InitImage {
                image: read(&inputs.init)?,
                strength: args.strength,
            };
            let control = ControlInput {
                conditioning_scale: args.control_scale,
                guidance_start: 0.0,
                guidance_end: args.control_end,
                ..ControlInput::new(controlnet, read(&inputs.control)?)
            };
            (Some(init), vec![control])
        }
    };
    sync();
    let load_s = started.elapsed().as_secs_f64();
    // After the load clock: compiling the fused kernels (once per process) is not loading.
    pipeline.use_kernels(args.kernels)?;
    #[cfg(feature = "cuda")]
    {
        pipeline.set_cuda_graphs(!args.no_cuda_graphs);
        if let Some(index) = cuda_index {
            darkroom_inference::cuda::reset_peak_memory(index)?;
        }
    }

    let request = GenerateRequest {
        prompt: "a studio portrait, warm light".to_owned(),
        negative_prompt: None,
        width: args.width,
        height: args.height,
        steps: args.steps,
        guidance: 5.0,
        seed: args.seed,
        scheduler: SchedulerKind::Euler,
        init,
        controls,
    };
    let timed = |pipeline: &SdxlPipeline| -> anyhow::Result<(Side, image::RgbImage)> {
        let once = || -> anyhow::Result<(f64, Timings, image::RgbImage)> {
            sync();
            let started = Instant::now();
            // Synchronize at the last step so the denoise timing ends when the GPU work does.
            let generated = pipeline.generate(&request, &mut |done, total| {
                if done == total {
                    sync();
                }
            })?;
            sync();
            let seconds = started.elapsed().as_secs_f64();
            Ok((seconds, generated.timings, generated.image))
        };
        let (_, _, mut image) = once()?; // warm-up
        let mut side = Side {
            load_s,
            seconds: Vec::with_capacity(args.runs),
            denoise_s: Vec::with_capacity(args.runs),
            phases_s: Vec::with_capacity(args.runs),
            steps: args.steps,
            peak_bytes: None,
        };
        for _ in 0..args.runs {
            let (s, timings, last) = once()?;
            side.seconds.push(s);
            side.denoise_s.push(timings.denoise.as_secs_f64());
            side.phases_s.push(Phases {
                text: timings.text.as_secs_f64(),
                prepare: timings.prepare.as_secs_f64(),
                decode: timings.decode.as_secs_f64(),
            });
            side.steps = timings.steps;
            image = last;
        }
        Ok((side, image))
    };
    let (mut side, image) = timed(&pipeline)?;
    let gpu_peak = memory.map(GpuMemoryPeak::finish);
    side.peak_bytes = match cuda_index {
        Some(_) => gpu_peak,
        None => peak_rss_bytes(),
    };
    let graphs = match pipeline.cuda_graphs() {
        Ok(true) => "on".to_owned(),
        Ok(false) => "off".to_owned(),
        Err(reason) => format!("failed, ran eagerly: {reason}"),
    };
    #[allow(unused_mut)]
    let mut allocator = None;
    #[cfg(feature = "cuda")]
    if let Some(index) = cuda_index {
        let stats = darkroom_inference::cuda::memory_stats(index)?;
        allocator = Some((stats.allocated, stats.peak_allocated, stats.peak_reserved));
    }
    let mut variants = Vec::new();
    for &other in &args.also_kernels {
        pipeline.use_kernels(other)?;
        eprintln!(
            "darkroom ({} kernels): warm-up + {} runs…",
            other.name(),
            args.runs
        );
        let (side, image) = timed(&pipeline)?;
        variants.push(Variant {
            name: other.name(),
            side,
            image,
        });
    }
    if !args.also_kernels.is_empty() {
        pipeline.use_kernels(args.kernels)?;
    }
    let mut profiles = Vec::new();
    if args.kernel_profile {
        for &choice in std::iter::once(&args.kernels).chain(&args.also_kernels) {
            pipeline.use_kernels(choice)?;
            eprintln!(
                "darkroom ({} kernels): one image under the profiler…",
                choice.name()
            );
            let (generated, recorded) = profile::record(cuda_index.is_some(), || {
                let generated = pipeline.generate(&request, &mut |_, _| {});
                sync();
                generated
            })?;
            generated?;
            profiles.push((choice, recorded));
        }
        pipeline.use_kernels(args.kernels)?;
    }
    if args.also_eager {
        #[cfg(feature = "cuda")]
        pipeline.set_cuda_graphs(false);
        eprintln!("darkroom (eager): warm-up + {} runs…", args.runs);
        let (side, image) = timed(&pipeline)?;
        variants.push(Variant {
            name: "eager",
            side,
            image,
        });
    }
    Ok(DarkroomRun {
        side,
        image,
        variants,
        profiles,
        graphs,
        allocator,
    })
}

/// The speed-up row and the notes under a Darkroom-vs-diffusers table.
fn print_ratios(darkroom: &Side, theirs: &Side, report: &DiffusersReport) {
    let memory_ratio = match (darkroom.peak_bytes, theirs.peak_bytes) {
        (Some(a), Some(b)) => ratio(a as f64, b as f64),
        _ => "n/a".to_owned(),
    };
    // Every ratio is diffusers' cost over Darkroom's (speed-up), except memory (Darkroom / diffusers).
    println!(
        "| {:<9} | {:>8} | {:>12} | {:>11} | {:>14} | {:>12} |",
        "speed-up",
        ratio(theirs.load_s, darkroom.load_s),
        ratio(theirs.mean(), darkroom.mean()),
        ratio(theirs.min(), darkroom.min()),
        ratio(darkroom.its(), theirs.its()),
        memory_ratio
    );
    println!();
    println!(
        "speed-up = diffusers time / Darkroom time (> 1: Darkroom faster); memory column of that row = Darkroom / diffusers."
    );
    if let Some(allocated) = report.cuda_max_allocated_bytes {
        println!(
            "diffusers torch.cuda.max_memory_allocated {} (reserved {}); GPU memory columns are nvidia-smi peaks over the idle baseline, CUDA context included.",
            gib(Some(allocated)),
            gib(report.cuda_max_reserved_bytes)
        );
    }
}

/// Largest and mean absolute difference of two images' channels, in 1/255 steps.
fn pixel_difference(a: &image::RgbImage, b: &image::RgbImage) -> Option<(u8, f64)> {
    if a.dimensions() != b.dimensions() {
        return None;
    }
    let (mut max, mut sum) = (0u8, 0u64);
    for (x, y) in a.as_raw().iter().zip(b.as_raw()) {
        let d = x.abs_diff(*y);
        max = max.max(d);
        sum += u64::from(d);
    }
    Some((max, sum as f64 / a.as_raw().len().max(1) as f64))
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::Bf16 => "bf16",
    }
}

fn gib(bytes: Option<u64>) -> String {
    match bytes {
        Some(b) => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        None => "n/a".to_owned(),
    }
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}×", a / b)
    } else {
        "n/a".to_owned()
    }
}

fn print_table(
    args: &Args,
    model: &Path,
    threads: i32,
    run: &DarkroomRun,
    diffusers: Option<&(Side, DiffusersReport)>,
) {
    let darkroom = &run.side;
    let where_ = match args.device {
        DeviceSpec::Cpu => format!("cpu, {threads} threads on both sides"),
        device => device.to_string(),
    };
    let memory = match args.device {
        DeviceSpec::Cpu => "peak RSS",
        DeviceSpec::Cuda(_) => "peak GPU mem",
    };
    let workload = match args.workload {
        Workload::Txt2img => "txt2img".to_owned(),
        Workload::Profile => format!(
            "profile shape (img2img {}, 1 ControlNet scale {} until {} of the steps, 1 LoRA fused at {})",
            args.strength, args.control_scale, args.control_end, args.lora_weight
        ),
    };
    println!(
        "SDXL {} {}×{}, {} steps Euler, CFG 5 (batch 2), {} runs after 1 warm-up — {}, {}",
        workload,
        args.width,
        args.height,
        args.steps,
        args.runs,
        where_,
        dtype_name(args.dtype)
    );
    match diffusers {
        Some((_, report)) => println!(
            "model: {} (torch {}, diffusers {})",
            model.display(),
            report.torch,
            report.diffusers
        ),
        None => println!("model: {}", model.display()),
    }
    println!(
        "Darkroom: cuDNN autotuning {}, attention kernels {}, GroupNorm+SiLU/GEGLU kernels {}",
        if args.cudnn_benchmark { "on" } else { "off" },
        args.attention,
        args.kernels.name()
    );
    println!();
    println!(
        "| {:<9} | {:>8} | {:>12} | {:>11} | {:>14} | {:>12} |",
        "", "load s", "s/image mean", "s/image min", "denoise it/s", memory
    );
    println!(
        "|{:-<11}|{:->10}|{:->14}|{:->13}|{:->16}|{:->14}|",
        "", "", "", "", "", ""
    );
    let mut rows = vec![("Darkroom".to_owned(), darkroom)];
    for variant in &run.variants {
        rows.push((format!("D. {}", variant.name), &variant.side));
    }
    if let Some((theirs, _)) = diffusers {
        rows.push(("diffusers".to_owned(), theirs));
    }
    for (name, side) in rows {
        println!(
            "| {:<9} | {:>8.2} | {:>12.3} | {:>11.3} | {:>14.2} | {:>12} |",
            name,
            side.load_s,
            side.mean(),
            side.min(),
            side.its(),
            gib(side.peak_bytes)
        );
    }
    if let Some((theirs, report)) = diffusers {
        print_ratios(darkroom, theirs, report);
    }
    if let Some((allocated, peak, reserved)) = run.allocator {
        println!(
            "Darkroom caching allocator: {} in use after the runs (weights), peak allocated {}, peak reserved {}.",
            gib(Some(allocated)),
            gib(Some(peak)),
            gib(Some(reserved))
        );
    }
    println!("Darkroom CUDA graphs: {}.", run.graphs);
    if !darkroom.phases_s.is_empty() {
        let mean = |phase: fn(&Phases) -> f64| {
            1e3 * darkroom.phases_s.iter().map(phase).sum::<f64>() / darkroom.phases_s.len() as f64
        };
        println!(
            "Darkroom outside the steps, mean per image: prompt {:.1} ms (host side; encoded for every image, the prompt cache is off), preparation {:.1} ms, VAE decode and pixels {:.1} ms.",
            mean(|p| p.text),
            mean(|p| p.prepare),
            mean(|p| p.decode)
        );
    }
    let images = |label: &str, a: &image::RgbImage, b: Option<&image::RgbImage>| {
        if let Some((max, mean)) = b.and_then(|b| pixel_difference(a, b)) {
            println!("{label}: max pixel difference {max}/255, mean {mean:.3}/255.");
        }
    };
    for variant in &run.variants {
        let label = format!("Darkroom vs Darkroom {}", variant.name);
        images(&label, &run.image, Some(&variant.image));
    }
    if let Some(path) = args.images.as_ref().map(|d| d.join("diffusers.png"))
        && let Ok(theirs) = image::open(&path)
    {
        images("Darkroom vs diffusers", &run.image, Some(&theirs.to_rgb8()));
    }
}
