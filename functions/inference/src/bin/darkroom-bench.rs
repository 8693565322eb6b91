//! `darkroom-bench`: Darkroom's SDXL pipeline and diffusers' `StableDiffusionXLPipeline` side by
//! side, in one run, on the same random weights (see BENCHMARKS.md at the repository root).
//!
//! ```text
//! darkroom-bench --size tiny|full --device cpu|cuda --dtype f32|f16|bf16 --steps N
//!   --width W --height H --runs R [--model DIR] [--python PATH] [--json OUT]
//! ```
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
use darkroom_inference::pipeline::{GenerateRequest, SdxlPipeline};
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
}

/// What one side measured.
#[derive(Debug, Serialize)]
struct Side {
    load_s: f64,
    seconds: Vec<f64>,
    denoise_s: Vec<f64>,
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

    let model = match &args.model {
        Some(model) => model.clone(),
        None => {
            let cache = args
                .cache
                .clone()
                .unwrap_or_else(|| target_dir(&repo).join("darkroom-bench"));
            generated_model(&python, &script, &cache, args.size, args.dtype)?
        }
    };
    eprintln!("model: {}", model.display());
    warm_page_cache(&model)?;
    let threads = tch::get_num_threads();

    eprintln!("diffusers: warm-up + {} runs…", args.runs);
    let diffusers = run_diffusers(&args, &python, &script, &model, threads, cuda_index)?;

    eprintln!("darkroom: warm-up + {} runs…", args.runs);
    let darkroom = run_darkroom(&args, &model, device, cuda_index)?;

    print_table(&args, &model, threads, &darkroom, &diffusers);
    if let Some(path) = &args.json {
        let value = serde_json::json!({
            "size": args.size,
            "device": args.device.to_string(),
            "dtype": args.dtype,
            "steps": args.steps,
            "width": args.width,
            "height": args.height,
            "runs": args.runs,
            "threads": threads,
            "model": model,
            "darkroom": darkroom,
            "diffusers": diffusers.0,
            "diffusers_report": diffusers.1,
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

/// The cached generated model folder, made on first use (into a scratch folder, then renamed).
fn generated_model(
    python: &Path,
    script: &Path,
    cache: &Path,
    size: Size,
    dtype: DType,
) -> anyhow::Result<PathBuf> {
    // The tiny model is always f32 (pipeline.py's); the full one is stored in the run dtype.
    let (name, stored) = match size {
        Size::Tiny => ("tiny".to_owned(), "f32"),
        Size::Full => {
            let stored = match dtype {
                DType::F32 => "f32",
                DType::F16 => "f16",
                DType::Bf16 => "bf16",
            };
            (format!("full-{stored}"), stored)
        }
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
    threads: i32,
    cuda_index: Option<usize>,
) -> anyhow::Result<(Side, DiffusersReport)> {
    let memory = cuda_index.and_then(GpuMemoryPeak::start);
    let output = Command::new(python)
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
        .env("HF_HUB_OFFLINE", "1")
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
        steps: report.steps,
        peak_bytes: match cuda_index {
            Some(_) => gpu_peak,
            None => Some(report.peak_rss_bytes),
        },
    };
    Ok((side, report))
}

fn run_darkroom(
    args: &Args,
    model: &Path,
    device: tch::Device,
    cuda_index: Option<usize>,
) -> anyhow::Result<Side> {
    let sync = || {
        if let Some(index) = cuda_index {
            tch::Cuda::synchronize(index as i64);
        }
    };
    let memory = cuda_index.and_then(GpuMemoryPeak::start);
    let started = Instant::now();
    let pipeline = SdxlPipeline::load(model, None, device, args.dtype)
        .with_context(|| format!("loading {}", model.display()))?;
    sync();
    let load_s = started.elapsed().as_secs_f64();

    let request = GenerateRequest {
        prompt: "a studio portrait, warm light".to_owned(),
        negative_prompt: None,
        width: args.width,
        height: args.height,
        steps: args.steps,
        guidance: 5.0,
        seed: args.seed,
        scheduler: SchedulerKind::Euler,
        init: None,
        controls: Vec::new(),
    };
    let once = || -> anyhow::Result<(f64, f64, usize)> {
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
        let t = generated.timings;
        Ok((seconds, t.denoise.as_secs_f64(), t.steps))
    };
    once()?; // warm-up
    let mut seconds = Vec::with_capacity(args.runs);
    let mut denoise_s = Vec::with_capacity(args.runs);
    let mut steps = args.steps;
    for _ in 0..args.runs {
        let (s, d, n) = once()?;
        seconds.push(s);
        denoise_s.push(d);
        steps = n;
    }
    let gpu_peak = memory.map(GpuMemoryPeak::finish);
    Ok(Side {
        load_s,
        seconds,
        denoise_s,
        steps,
        peak_bytes: match cuda_index {
            Some(_) => gpu_peak,
            None => peak_rss_bytes(),
        },
    })
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
    darkroom: &Side,
    diffusers: &(Side, DiffusersReport),
) {
    let (theirs, report) = diffusers;
    let where_ = match args.device {
        DeviceSpec::Cpu => format!("cpu, {threads} threads on both sides"),
        device => device.to_string(),
    };
    let memory = match args.device {
        DeviceSpec::Cpu => "peak RSS",
        DeviceSpec::Cuda(_) => "peak GPU mem",
    };
    println!(
        "SDXL txt2img {}×{}, {} steps Euler, CFG 5 (batch 2), {} runs after 1 warm-up — {}, {}",
        args.width,
        args.height,
        args.steps,
        args.runs,
        where_,
        dtype_name(args.dtype)
    );
    println!(
        "model: {} (torch {}, diffusers {})",
        model.display(),
        report.torch,
        report.diffusers
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
    for (name, side) in [("Darkroom", darkroom), ("diffusers", theirs)] {
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
