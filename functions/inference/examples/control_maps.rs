//! Control-map speed: Darkroom's pose and depth estimators (what the worker runs to draw a
//! ControlNet's control image from a job's photo) against the annotators those ControlNets'
//! training images were drawn with, on the same random weights and the same photo, one after
//! the other in one run (`reference/bench_control.py`: controlnet_aux's OpenPose body path, and
//! transformers' Depth Anything with its image processor and post-processing).
//!
//! ```text
//! cargo run --release --example control_maps -- [--size 896x1152] [--runs 3] [--threads N]
//!   [--cache DIR] [--python PY]
//! ```
//!
//! The models (the OpenPose body model's architecture; a Depth Anything V2 Small-shaped model)
//! and the photo (scikit-image's astronaut at `--size`) are generated once into the cache
//! (default `<target>/control-bench/<size>`). Both sides use `--threads` CPU threads (default:
//! libtorch's choice here); the annotators run first, in their own process.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Parser;
use darkroom_inference::depth::DepthEstimator;
use darkroom_inference::device::DType;
use darkroom_inference::pose::PoseEstimator;
use serde::Deserialize;
use tch::Device;

#[derive(Parser)]
#[command(about = "Darkroom's pose and depth maps against the annotators, on the CPU")]
struct Args {
    /// The photo's size, WxH.
    #[arg(long, default_value = "896x1152")]
    size: String,
    /// Timed maps per side and kind (after one warm-up each).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// CPU threads for both sides (default: libtorch's choice).
    #[arg(long)]
    threads: Option<i32>,
    /// Where the generated models and photo are kept.
    #[arg(long)]
    cache: Option<PathBuf>,
    /// The Python with torch, transformers and controlnet_aux (default: the project's venv).
    #[arg(long)]
    python: Option<PathBuf>,
}

/// The JSON line `bench_control.py --run` prints.
#[derive(Deserialize)]
struct Report {
    pose: Vec<f64>,
    depth: Vec<f64>,
    threads: i32,
    torch: String,
    transformers: String,
    opencv: String,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("reference/bench_control.py")
}

fn python(args: &Args, script_args: &[&str]) -> anyhow::Result<Vec<u8>> {
    let python = args
        .python
        .clone()
        .unwrap_or_else(darkroom_test_support::python);
    let output = Command::new(&python)
        .arg(script())
        .args(script_args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    if !output.status.success() {
        bail!(
            "bench_control.py failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(output.stdout)
}

/// Seconds of each of `runs` calls of `f`, after one untimed call.
fn timed<T>(runs: usize, mut f: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<Vec<f64>> {
    f()?;
    (0..runs)
        .map(|_| {
            let started = Instant::now();
            f()?;
            Ok(started.elapsed().as_secs_f64())
        })
        .collect()
}

/// The share of channel values that differ between two same-sized images, and the largest
/// difference (1.0, 255 for different sizes).
fn difference(a: &image::RgbImage, b: &image::RgbImage) -> (f64, u8) {
    if a.dimensions() != b.dimensions() {
        return (1.0, 255);
    }
    let (mut differing, mut max) = (0usize, 0u8);
    for (x, y) in a.as_raw().iter().zip(b.as_raw()) {
        let d = x.abs_diff(*y);
        differing += usize::from(d > 0);
        max = max.max(d);
    }
    (differing as f64 / a.as_raw().len().max(1) as f64, max)
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if let Some(threads) = args.threads {
        tch::set_num_threads(threads);
    }
    let threads = tch::get_num_threads();
    let cache = match &args.cache {
        Some(dir) => dir.clone(),
        None => {
            let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
                || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"),
                PathBuf::from,
            );
            target.join("control-bench").join(&args.size)
        }
    };
    let cache_arg = cache.to_string_lossy().into_owned();
    if !cache.join("photo.png").exists() {
        eprintln!("generating the models and photo in {}…", cache.display());
        python(&args, &["--make", &cache_arg, "--size", &args.size])?;
    }

    eprintln!("annotators: warm-up + {} runs of each map…", args.runs);
    let runs = args.runs.to_string();
    let threads_arg = threads.to_string();
    let stdout = python(
        &args,
        &[
            "--run",
            &cache_arg,
            "--runs",
            &runs,
            "--threads",
            &threads_arg,
        ],
    )?;
    let line = String::from_utf8_lossy(&stdout);
    let report: Report = serde_json::from_str(line.lines().last().unwrap_or_default())
        .with_context(|| format!("reading bench_control.py's report: {line}"))?;

    eprintln!("darkroom: warm-up + {} runs of each map…", args.runs);
    let photo = image::open(cache.join("photo.png"))?.to_rgb8();
    let pose = PoseEstimator::load(&cache.join("pose"), Device::Cpu, DType::F32)?;
    let pose_s = timed(args.runs, || Ok(pose.pose_map(&photo)?))?;
    let depth = DepthEstimator::load(&cache.join("depth"), Device::Cpu, DType::F32)?;
    let depth_s = timed(args.runs, || Ok(depth.depth_map(&photo)?))?;
    // The same work on both sides: the maps themselves, against the annotators' last ones.
    let differences = [
        difference(
            &pose.pose_map(&photo)?,
            &image::open(cache.join("pose_annotator.png"))?.to_rgb8(),
        ),
        difference(
            &image::DynamicImage::ImageLuma8(depth.depth_map(&photo)?).to_rgb8(),
            &image::open(cache.join("depth_annotator.png"))?.to_rgb8(),
        ),
    ];

    let (width, height) = photo.dimensions();
    println!(
        "Control maps of a {width}×{height} photo, CPU, {threads} threads on both sides (annotators: {} threads, torch {}, transformers {}, OpenCV {}); {} runs after 1 warm-up",
        report.threads, report.torch, report.transformers, report.opencv, args.runs
    );
    println!();
    println!(
        "| {:<32} | {:>15} | {:>16} | {:>19} | {:>21} |",
        "map",
        "Darkroom s mean",
        "annotator s mean",
        "speed-up mean / min",
        "pixels differing (max)"
    );
    println!(
        "|{:-<34}|{:->17}|{:->18}|{:->21}|{:->23}|",
        "", "", "", "", ""
    );
    let rows = [
        ("pose (OpenPose body, detect 512)", &pose_s, &report.pose),
        ("depth (Depth Anything V2 S, 518)", &depth_s, &report.depth),
    ];
    for ((name, ours, theirs), (share, max)) in rows.into_iter().zip(differences) {
        println!(
            "| {:<32} | {:>15.3} | {:>16.3} | {:>10.2}× / {:>5.2}× | {:>11.2} % ({:>3}/255) |",
            name,
            mean(ours),
            mean(theirs),
            mean(theirs) / mean(ours),
            min(theirs) / min(ours),
            share * 100.0,
            max
        );
    }
    println!();
    println!(
        "speed-up = annotator time / Darkroom time (> 1: Darkroom faster); pixels differing: the share of channel values that differ between the two maps, and the largest difference."
    );
    Ok(())
}
