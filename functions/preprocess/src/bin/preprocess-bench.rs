//! `preprocess-bench`: Darkroom's preprocess pipeline against libvips and Pillow, one core,
//! in one run (see BENCHMARKS.md at the repository root).
//!
//! ```text
//! preprocess-bench [--rounds R] [--runs N] [--warmup K] [--image JPG | --width W --height H
//!   --quality Q --seed S] [--save-image JPG] [--cpu C | --no-pin] [--python PATH] [--json OUT]
//! ```
//!
//! 1. **The photo.** Without `--image`, a deterministic photo-like scene is drawn here
//!    ([`scene`]: sky gradient with fractal clouds, textured ground, shaded buildings with
//!    windows, discs, poles, sensor grain, vignette) and encoded by libjpeg-turbo through
//!    Pillow (`bench/bench_preprocess.py --encode`): baseline, quality 90, 4:2:0, as a
//!    phone or camera stores a photo.
//! 2. **One core.** The process re-executes itself under `taskset -c C` (default CPU 0)
//!    unless it is already pinned to exactly that CPU; the Python side inherits the mask
//!    and also gets `VIPS_CONCURRENCY=1` and `cv2.setNumThreads(1)`. Darkroom's
//!    pipeline has no thread pool (`fast_image_resize` and `jpeg-decoder` are built
//!    without rayon).
//! 3. **Rounds.** Each round times Darkroom (`darkroom_preprocess::prepare`, no face
//!    options: nearest SDXL bucket, canny 100/200) in this process, then the Python
//!    sides in a subprocess; K warm-up runs precede the N timed ones of each side in
//!    every round. Alternating rounds spread a noisy neighbour's load over all sides.
//! 4. **Stages.** Darkroom's steps are then timed one by one (sniff + header, decode at
//!    the DCT scale, crop + resize, canny) to show where the time goes.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Parser;
use darkroom_preprocess::{CannyOptions, PrepareOptions, bucket, canny, decode, prepare, sniff};
use image::RgbImage;
use serde::Deserialize;

#[derive(Parser)]
#[command(
    version,
    about = "Benchmark Darkroom's preprocess (12 MP JPEG → SDXL bucket + canny) against libvips and Pillow on one core"
)]
struct Args {
    /// Rounds; each times every side.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Timed runs per side per round.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Warm-up runs per side per round.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Benchmark this JPEG instead of the generated scene.
    #[arg(long)]
    image: Option<PathBuf>,
    /// Width of the generated scene.
    #[arg(long, default_value_t = 4000)]
    width: u32,
    /// Height of the generated scene.
    #[arg(long, default_value_t = 3000)]
    height: u32,
    /// JPEG quality of the generated scene.
    #[arg(long, default_value_t = 90)]
    quality: u8,
    /// Seed of the generated scene.
    #[arg(long, default_value_t = 5)]
    seed: u64,
    /// Keep the benchmarked JPEG here.
    #[arg(long)]
    save_image: Option<PathBuf>,
    /// The CPU everything runs on.
    #[arg(long, default_value_t = 0)]
    cpu: usize,
    /// Do not pin to one CPU (Darkroom still runs single-threaded; the Python side may not).
    #[arg(long)]
    no_pin: bool,
    /// Python with pyvips, Pillow and OpenCV (default: $VIRTUAL_ENV/bin/python, else
    /// <repo>/.venv/bin/python).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Time Darkroom alone.
    #[arg(long)]
    no_python: bool,
    /// libvips side: sigma of `canny`'s Gaussian.
    #[arg(long, default_value_t = 1.4)]
    vips_sigma: f64,
    /// libvips side: the level above which `canny`'s output counts as an edge.
    #[arg(long, default_value_t = 2.0)]
    vips_threshold: f64,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Set in the child started under `taskset`, so a failed pin cannot loop.
const PINNED_ENV: &str = "DARKROOM_PREPROCESS_BENCH_PINNED";

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.rounds == 0 || args.runs == 0 {
        bail!("--rounds and --runs must be at least 1");
    }
    if !args.no_pin
        && let Some(code) = pin_to_cpu(args.cpu)?
    {
        std::process::exit(code);
    }
    let repo = repo_root();
    let script = repo.join("functions/preprocess/bench/bench_preprocess.py");
    let python = args.python.clone().unwrap_or_else(|| default_python(&repo));
    let scratch = std::env::temp_dir().join(format!("preprocess-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let result = run(&args, &python, &script, &scratch);
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

fn run(args: &Args, python: &Path, script: &Path, scratch: &Path) -> anyhow::Result<()> {
    let (jpeg_path, source) = match &args.image {
        Some(path) => (path.clone(), format!("{}", path.display())),
        None => {
            let started = Instant::now();
            let pixels = scene(args.width, args.height, args.seed);
            let ppm = scratch.join("scene.ppm");
            write_ppm(&ppm, &pixels)?;
            drop(pixels);
            let jpg = scratch.join("scene.jpg");
            let status = Command::new(python)
                .arg(script)
                .arg("--encode")
                .args([&ppm, &jpg])
                .args(["--quality", &args.quality.to_string()])
                .status()
                .with_context(|| format!("running {}", python.display()))?;
            if !status.success() {
                bail!("encoding the scene failed: {status}");
            }
            let _ = std::fs::remove_file(&ppm);
            eprintln!(
                "scene: {}×{} drawn and encoded in {:.1} s",
                args.width,
                args.height,
                started.elapsed().as_secs_f64()
            );
            (
                jpg,
                format!(
                    "generated scene (seed {}), libjpeg-turbo q{} 4:2:0",
                    args.seed, args.quality
                ),
            )
        }
    };
    let bytes =
        std::fs::read(&jpeg_path).with_context(|| format!("reading {}", jpeg_path.display()))?;
    if let Some(keep) = &args.save_image {
        std::fs::write(keep, &bytes).with_context(|| format!("writing {}", keep.display()))?;
    }

    let options = PrepareOptions {
        canny: Some(CannyOptions::default()),
        ..PrepareOptions::default()
    };
    let probe = prepare(&bytes, &options)?;
    let bucket = probe.bucket;
    let (width, height) = (probe.original_width, probe.original_height);
    let darkroom_edges = probe.canny.as_ref().map(edge_fraction).unwrap_or(0.0);
    drop(probe);

    let mut darkroom = Vec::new();
    let mut python_report: Option<PythonReport> = None;
    for round in 1..=args.rounds {
        eprintln!("round {round}/{}: darkroom…", args.rounds);
        for _ in 0..args.warmup {
            black_box(prepare(black_box(&bytes), &options)?);
        }
        for _ in 0..args.runs {
            let started = Instant::now();
            let prepared = prepare(black_box(&bytes), &options)?;
            darkroom.push(started.elapsed().as_secs_f64() * 1000.0);
            black_box(prepared);
        }
        if !args.no_python {
            eprintln!("round {round}/{}: libvips, Pillow…", args.rounds);
            let report = run_python(args, python, script, &jpeg_path, bucket)?;
            match &mut python_report {
                None => python_report = Some(report),
                Some(all) => {
                    for (name, side) in report.sides {
                        if let Some(kept) = all.sides.iter_mut().find(|(n, _)| *n == name) {
                            kept.1.ms.extend(side.ms);
                        }
                    }
                }
            }
        }
    }
    eprintln!("darkroom stages…");
    let stages = time_stages(&bytes, &options, args.runs * args.rounds)?;

    let decoded = decoded_size(&bytes)?;
    println!();
    println!(
        "preprocess: {width}×{height} JPEG ({:.2} MB, {source}) → {}×{} bucket + canny {}/{}",
        bytes.len() as f64 / 1e6,
        bucket.width,
        bucket.height,
        CannyOptions::default().low,
        CannyOptions::default().high,
    );
    println!(
        "one core: {}; {} rounds × {} timed runs per side (after {} warm-up runs each round)",
        if args.no_pin {
            "not pinned".to_string()
        } else {
            format!("pinned to CPU {}", args.cpu)
        },
        args.rounds,
        args.runs,
        args.warmup
    );
    if let Some(report) = &python_report {
        println!(
            "python {} · libvips {} (pyvips {}) · Pillow {} · OpenCV {} · numpy {}; affinity {:?}, VIPS_CONCURRENCY {}, cv2 threads {}",
            report.versions.python,
            report.versions.libvips,
            report.versions.pyvips,
            report.versions.pillow,
            report.versions.opencv,
            report.versions.numpy,
            report.threads.affinity,
            report.threads.vips_concurrency,
            report.threads.cv2_threads,
        );
    }
    println!();
    let darkroom_stats = Stats::of(&darkroom);
    println!(
        "| side | decoded at | mean ms | median ms | min ms | edge pixels | side / Darkroom (mean) | side / Darkroom (min) |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    println!(
        "| Darkroom | {}×{} | {:.1} | {:.1} | {:.1} | {:.2} % | 1.00 | 1.00 |",
        decoded.0,
        decoded.1,
        darkroom_stats.mean,
        darkroom_stats.median,
        darkroom_stats.min,
        darkroom_edges * 100.0
    );
    if let Some(report) = &python_report {
        for (name, side) in &report.sides {
            let stats = Stats::of(&side.ms);
            let at = side
                .decoded
                .map(|(w, h)| format!("{w}×{h}"))
                .unwrap_or_else(|| "shrink-on-load".to_string());
            println!(
                "| {name} | {at} | {:.1} | {:.1} | {:.1} | {:.2} % | {:.2} | {:.2} |",
                stats.mean,
                stats.median,
                stats.min,
                side.edge_fraction * 100.0,
                stats.mean / darkroom_stats.mean,
                stats.min / darkroom_stats.min,
            );
        }
    }
    println!();
    println!("Darkroom by stage ({} runs each):", args.runs * args.rounds);
    println!();
    println!("| stage | mean ms | min ms |");
    println!("|---|---:|---:|");
    for (name, times) in &stages {
        let stats = Stats::of(times);
        println!("| {name} | {:.1} | {:.1} |", stats.mean, stats.min);
    }
    if let Some(report) = &python_report
        && let Some((_, vips)) = report.sides.iter().find(|(n, _)| n == "libvips")
    {
        let ratio = Stats::of(&vips.ms).min / darkroom_stats.min;
        println!();
        println!(
            "target (at least as fast as libvips): {} — libvips min / Darkroom min = {ratio:.2}",
            if ratio >= 1.0 { "met" } else { "NOT met" }
        );
    }

    if let Some(path) = &args.json {
        let value = serde_json::json!({
            "image": source,
            "width": width,
            "height": height,
            "bytes": bytes.len(),
            "bucket": bucket,
            "rounds": args.rounds,
            "runs": args.runs,
            "warmup": args.warmup,
            "cpu": if args.no_pin { None } else { Some(args.cpu) },
            "darkroom_ms": darkroom,
            "darkroom_stages_ms": stages.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
            "python": python_report.as_ref().map(|r| serde_json::json!({
                "versions": &r.versions,
                "threads": &r.threads,
                "sides": r.sides.iter().map(|(n, s)| (n.clone(), serde_json::json!({
                    "ms": &s.ms, "decoded": s.decoded, "edge_fraction": s.edge_fraction,
                }))).collect::<serde_json::Map<_, _>>(),
            })),
        });
        std::fs::write(path, serde_json::to_string_pretty(&value)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Mean, median and minimum of some times.
struct Stats {
    mean: f64,
    median: f64,
    min: f64,
}

impl Stats {
    fn of(times: &[f64]) -> Self {
        let mut sorted = times.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len().max(1) as f64;
        let median = match sorted.len() {
            0 => 0.0,
            len if len % 2 == 1 => sorted[len / 2],
            len => (sorted[len / 2 - 1] + sorted[len / 2]) / 2.0,
        };
        Self {
            mean: sorted.iter().sum::<f64>() / n,
            median,
            min: sorted.first().copied().unwrap_or(0.0),
        }
    }
}

/// Fraction of pixels that are edges in a 0/255 control map.
fn edge_fraction(map: &RgbImage) -> f64 {
    let edges = map.pixels().filter(|p| p[0] != 0).count();
    edges as f64 / (map.width() as f64 * map.height() as f64).max(1.0)
}

/// The size `prepare` decodes the JPEG at (its DCT scale), for the table.
fn decoded_size(bytes: &[u8]) -> anyhow::Result<(u32, u32)> {
    let format = sniff(bytes)?;
    let limits = decode::Limits::default();
    let source = decode::open(bytes, format, &limits)?;
    let header = *source.header();
    let target = darkroom_preprocess::nearest_bucket(header.width, header.height);
    let min_size = bucket::cover_min_size(header.width, header.height, target.width, target.height);
    Ok(source.decode(Some(min_size))?.dimensions())
}

/// Times `prepare`'s steps separately (upright images without EXIF orientation only: the
/// generated scene has none).
fn time_stages(
    bytes: &[u8],
    options: &PrepareOptions,
    runs: usize,
) -> anyhow::Result<Vec<(String, Vec<f64>)>> {
    let canny_options = options.canny.unwrap_or_default();
    let mut open_ms = Vec::new();
    let mut decode_ms = Vec::new();
    let mut resize_ms = Vec::new();
    let mut canny_ms = Vec::new();
    let ms = |started: Instant| started.elapsed().as_secs_f64() * 1000.0;
    for _ in 0..runs {
        let started = Instant::now();
        let format = sniff(black_box(bytes))?;
        let source = decode::open(bytes, format, &options.limits)?;
        open_ms.push(ms(started));
        let header = *source.header();
        let target = darkroom_preprocess::nearest_bucket(header.width, header.height);
        let min_size =
            bucket::cover_min_size(header.width, header.height, target.width, target.height);
        let started = Instant::now();
        let decoded = source.decode(Some(min_size))?;
        decode_ms.push(ms(started));
        let started = Instant::now();
        let framed = bucket::fit_to_size(&decoded, target.width, target.height)?;
        resize_ms.push(ms(started));
        drop(decoded);
        let started = Instant::now();
        black_box(canny::canny(&framed, &canny_options));
        canny_ms.push(ms(started));
    }
    Ok(vec![
        ("sniff + header".to_string(), open_ms),
        ("decode (DCT-scaled)".to_string(), decode_ms),
        ("crop + Lanczos3 resize".to_string(), resize_ms),
        (
            "canny (grey, Sobel, NMS, hysteresis, RGB map)".to_string(),
            canny_ms,
        ),
    ])
}

/// What the Python side reports (`bench_preprocess.py --run`).
#[derive(Debug, Deserialize)]
struct PythonReport {
    versions: Versions,
    threads: Threads,
    #[serde(deserialize_with = "ordered_sides")]
    sides: Vec<(String, PythonSide)>,
}

#[derive(Debug, Deserialize, serde::Serialize)]
struct Versions {
    python: String,
    pyvips: String,
    libvips: String,
    pillow: String,
    opencv: String,
    numpy: String,
}

#[derive(Debug, Deserialize, serde::Serialize)]
struct Threads {
    affinity: Vec<usize>,
    vips_concurrency: i64,
    cv2_threads: i64,
}

#[derive(Debug, Deserialize)]
struct PythonSide {
    ms: Vec<f64>,
    decoded: Option<(u32, u32)>,
    edge_fraction: f64,
}

/// The sides in the order the script ran them (a JSON object keeps its order there).
fn ordered_sides<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<(String, PythonSide)>, D::Error> {
    struct Visitor;
    impl<'de> serde::de::Visitor<'de> for Visitor {
        type Value = Vec<(String, PythonSide)>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object of sides")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut sides = Vec::new();
            while let Some(entry) = map.next_entry()? {
                sides.push(entry);
            }
            Ok(sides)
        }
    }
    deserializer.deserialize_map(Visitor)
}

fn run_python(
    args: &Args,
    python: &Path,
    script: &Path,
    jpeg: &Path,
    bucket: darkroom_preprocess::Bucket,
) -> anyhow::Result<PythonReport> {
    let canny = CannyOptions::default();
    let output = Command::new(python)
        .arg(script)
        .arg("--run")
        .arg(jpeg)
        .args(["--width", &bucket.width.to_string()])
        .args(["--height", &bucket.height.to_string()])
        .args(["--runs", &args.runs.to_string()])
        .args(["--warmup", &args.warmup.to_string()])
        .args(["--low", &canny.low.to_string()])
        .args(["--high", &canny.high.to_string()])
        .args(["--vips-sigma", &args.vips_sigma.to_string()])
        .args(["--vips-threshold", &args.vips_threshold.to_string()])
        .env("VIPS_CONCURRENCY", "1")
        .env("OMP_NUM_THREADS", "1")
        .env("OPENCV_FOR_THREADS_NUM", "1")
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    if !output.status.success() {
        bail!("{} failed: {}", script.display(), output.status);
    }
    serde_json::from_slice(&output.stdout).context("reading the Python side's report")
}

/// Re-executes this program under `taskset -c cpu` unless it already runs on exactly that
/// CPU; returns the child's exit code when it did.
fn pin_to_cpu(cpu: usize) -> anyhow::Result<Option<i32>> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let allowed = status
        .lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
        .map(str::trim)
        .unwrap_or_default();
    if allowed == cpu.to_string() {
        return Ok(None);
    }
    if std::env::var_os(PINNED_ENV).is_some() {
        bail!("still allowed on CPUs {allowed:?} after taskset -c {cpu}");
    }
    let exe = std::env::current_exe().context("finding this program")?;
    let status = Command::new("taskset")
        .args(["-c", &cpu.to_string()])
        .arg(exe)
        .args(std::env::args_os().skip(1))
        .env(PINNED_ENV, "1")
        .status()
        .context("running taskset (util-linux); or pass --no-pin")?;
    Ok(Some(status.code().unwrap_or(1)))
}

/// The repository: the working directory when it is one, else where this crate was built from.
fn repo_root() -> PathBuf {
    let marker = "functions/preprocess/bench/bench_preprocess.py";
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

fn write_ppm(path: &Path, image: &RgbImage) -> anyhow::Result<()> {
    let mut data = format!("P6\n{} {}\n255\n", image.width(), image.height()).into_bytes();
    data.extend_from_slice(image.as_raw());
    std::fs::write(path, data).with_context(|| format!("writing {}", path.display()))
}

/// SplitMix64: the scene's deterministic random numbers.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [lo, hi).
    fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next() >> 40) as f32 / (1u64 << 24) as f32)
    }
}

/// A hash of a lattice point to [0, 1).
fn lattice(x: i32, y: i32, seed: u32) -> f32 {
    let mut h = (x as u32).wrapping_mul(0x8DA6_B343)
        ^ (y as u32).wrapping_mul(0xD816_3841)
        ^ seed.wrapping_mul(0xCB1A_B31F);
    h ^= h >> 15;
    h = h.wrapping_mul(0x2C1B_3C6D);
    h ^= h >> 12;
    h = h.wrapping_mul(0x297A_2D39);
    h ^= h >> 15;
    (h >> 8) as f32 / (1u32 << 24) as f32
}

/// Smooth value noise in [0, 1) with unit lattice spacing.
fn value_noise(x: f32, y: f32, seed: u32) -> f32 {
    let (xf, yf) = (x.floor(), y.floor());
    let (xi, yi) = (xf as i32, yf as i32);
    let (tx, ty) = (x - xf, y - yf);
    let (sx, sy) = (tx * tx * (3.0 - 2.0 * tx), ty * ty * (3.0 - 2.0 * ty));
    let a = lattice(xi, yi, seed);
    let b = lattice(xi + 1, yi, seed);
    let c = lattice(xi, yi + 1, seed);
    let d = lattice(xi + 1, yi + 1, seed);
    let top = a + (b - a) * sx;
    let bottom = c + (d - c) * sx;
    top + (bottom - top) * sy
}

/// Fractal noise in about [-1, 1]: `octaves` layers from `period` pixels down, each half
/// the period and `gain` times the amplitude of the one before.
fn fbm(x: f32, y: f32, period: f32, octaves: u32, gain: f32, seed: u32) -> f32 {
    let (mut sum, mut amplitude, mut norm, mut frequency) = (0.0, 1.0, 0.0, 1.0 / period);
    for octave in 0..octaves {
        sum += amplitude * (value_noise(x * frequency, y * frequency, seed + octave) * 2.0 - 1.0);
        norm += amplitude;
        amplitude *= gain;
        frequency *= 2.0;
    }
    sum / norm
}

/// Blends `colour` over the pixel at `index` with coverage `alpha` in [0, 1].
fn blend(data: &mut [u8], index: usize, colour: [f32; 3], alpha: f32) {
    for (channel, value) in colour.iter().enumerate() {
        let dst = &mut data[index + channel];
        let mixed = f32::from(*dst) * (1.0 - alpha) + value * alpha;
        *dst = mixed.clamp(0.0, 255.0) as u8;
    }
}

/// A deterministic photo-like scene: what a 12 MP outdoor photo makes a decoder, a resizer
/// and canny do (smooth gradients, fine texture, hard anti-aliased edges, grain).
fn scene(width: u32, height: u32, seed: u64) -> RgbImage {
    let (w, h) = (width as usize, height as usize);
    let (wf, hf) = (width as f32, height as f32);
    let mut rng = SplitMix(seed);
    let noise_seed = (rng.next() >> 32) as u32;
    let mut data = vec![0u8; w * h * 3];

    // Sky and ground, split by a hilly horizon.
    let horizon: Vec<f32> = (0..w)
        .map(|x| hf * 0.5 + hf * 0.06 * fbm(x as f32, 0.0, wf * 0.25, 5, 0.5, noise_seed + 100))
        .collect();
    for y in 0..h {
        let yf = y as f32;
        for (x, &horizon_y) in horizon.iter().enumerate() {
            let xf = x as f32;
            let i = (y * w + x) * 3;
            let colour = if yf < horizon_y {
                let t = yf / (hf * 0.5);
                let sky = [70.0 + 120.0 * t, 120.0 + 95.0 * t, 205.0 + 30.0 * t];
                let cloud = (fbm(xf, yf * 2.5, wf * 0.15, 6, 0.55, noise_seed) - 0.1).max(0.0);
                let c = (cloud * 2.2).min(1.0);
                [
                    sky[0] + (245.0 - sky[0]) * c,
                    sky[1] + (245.0 - sky[1]) * c,
                    sky[2] + (248.0 - sky[2]) * c,
                ]
            } else {
                let mix = 0.5 + 0.5 * fbm(xf, yf, 300.0, 4, 0.5, noise_seed + 10);
                let grass = [70.0, 110.0, 45.0];
                let soil = [125.0, 95.0, 60.0];
                let texture = 1.0 + 0.35 * fbm(xf, yf * 1.6, 48.0, 5, 0.6, noise_seed + 20);
                let depth = 0.75 + 0.5 * (yf - horizon_y) / hf;
                let mut c = [0.0; 3];
                for k in 0..3 {
                    c[k] = (grass[k] + (soil[k] - grass[k]) * mix) * texture * depth;
                }
                c
            };
            for k in 0..3 {
                data[i + k] = colour[k].clamp(0.0, 255.0) as u8;
            }
        }
    }

    // Buildings standing on the horizon: shaded walls, window grids.
    for _ in 0..26 {
        let bw = rng.range(wf * 0.03, wf * 0.12);
        let bh = rng.range(hf * 0.08, hf * 0.38);
        let x0 = rng.range(-bw * 0.5, wf - bw * 0.5);
        let base = hf * rng.range(0.52, 0.62);
        let y0 = base - bh;
        let wall = [
            rng.range(90.0, 220.0),
            rng.range(80.0, 200.0),
            rng.range(70.0, 190.0),
        ];
        let window = if rng.range(0.0, 1.0) < 0.5 {
            [40.0, 55.0, 70.0]
        } else {
            [235.0, 225.0, 170.0]
        };
        let (pitch_x, pitch_y) = (rng.range(18.0, 40.0), rng.range(24.0, 50.0));
        let (xa, xb) = (x0.max(0.0) as usize, ((x0 + bw).ceil() as usize).min(w));
        let (ya, yb) = (y0.max(0.0) as usize, ((base).ceil() as usize).min(h));
        for y in ya..yb {
            let yf = y as f32;
            let cover_y = ((yf + 1.0).min(base) - yf.max(y0)).clamp(0.0, 1.0);
            for x in xa..xb {
                let xf = x as f32;
                let cover_x = ((xf + 1.0).min(x0 + bw) - xf.max(x0)).clamp(0.0, 1.0);
                let shade = 0.7 + 0.45 * (xf - x0) / bw;
                let (u, v) = ((xf - x0) % pitch_x, (yf - y0) % pitch_y);
                let in_window = u > pitch_x * 0.3 && v > pitch_y * 0.35 && yf > y0 + pitch_y;
                let colour = if in_window {
                    window
                } else {
                    [wall[0] * shade, wall[1] * shade, wall[2] * shade]
                };
                blend(&mut data, (y * w + x) * 3, colour, cover_x * cover_y);
            }
        }
    }

    // Round things in the foreground: shaded, textured discs.
    for _ in 0..40 {
        let r = rng.range(hf * 0.01, hf * 0.07);
        let (cx, cy) = (rng.range(0.0, wf), rng.range(hf * 0.55, hf));
        let colour = [
            rng.range(30.0, 230.0),
            rng.range(30.0, 230.0),
            rng.range(30.0, 230.0),
        ];
        let (xa, xb) = (
            (cx - r - 1.0).max(0.0) as usize,
            ((cx + r + 2.0) as usize).min(w),
        );
        let (ya, yb) = (
            (cy - r - 1.0).max(0.0) as usize,
            ((cy + r + 2.0) as usize).min(h),
        );
        for y in ya..yb {
            for x in xa..xb {
                let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
                let d = (dx * dx + dy * dy).sqrt();
                let alpha = (r - d + 0.5).clamp(0.0, 1.0);
                if alpha > 0.0 {
                    let light = 1.15 - 0.5 * ((dx + dy) / (2.0 * r) + 0.5).clamp(0.0, 1.0);
                    let grain = 1.0 + 0.2 * fbm(x as f32, y as f32, 12.0, 3, 0.5, noise_seed + 30);
                    let shade = light * grain;
                    let c = [colour[0] * shade, colour[1] * shade, colour[2] * shade];
                    blend(&mut data, (y * w + x) * 3, c, alpha);
                }
            }
        }
    }

    // Poles and wires: thin anti-aliased segments.
    for _ in 0..30 {
        let (x1, y1) = (rng.range(0.0, wf), rng.range(0.0, hf));
        let angle = rng.range(0.0, std::f32::consts::PI);
        let length = rng.range(hf * 0.1, hf * 0.5);
        let (x2, y2) = (x1 + length * angle.cos(), y1 + length * angle.sin());
        let half = rng.range(1.0, 5.0);
        let grey = rng.range(20.0, 90.0);
        let (xa, xb) = (
            (x1.min(x2) - half - 1.0).max(0.0) as usize,
            ((x1.max(x2) + half + 2.0) as usize).min(w),
        );
        let (ya, yb) = (
            (y1.min(y2) - half - 1.0).max(0.0) as usize,
            ((y1.max(y2) + half + 2.0) as usize).min(h),
        );
        let (ex, ey) = (x2 - x1, y2 - y1);
        let len2 = ex * ex + ey * ey;
        for y in ya..yb {
            for x in xa..xb {
                let (px, py) = (x as f32 + 0.5 - x1, y as f32 + 0.5 - y1);
                let t = ((px * ex + py * ey) / len2).clamp(0.0, 1.0);
                let (qx, qy) = (px - t * ex, py - t * ey);
                let alpha = (half - (qx * qx + qy * qy).sqrt() + 0.5).clamp(0.0, 1.0);
                if alpha > 0.0 {
                    blend(&mut data, (y * w + x) * 3, [grey, grey, grey * 1.1], alpha);
                }
            }
        }
    }

    // Sensor grain (mostly luminance) and a lens vignette.
    for y in 0..h {
        let ny = (y as f32 / hf - 0.5) * 2.0;
        for x in 0..w {
            let nx = (x as f32 / wf - 0.5) * 2.0;
            let vignette = 1.0 - 0.18 * (nx * nx + ny * ny) * 0.5;
            let i = (y * w + x) * 3;
            let luma = (lattice(x as i32, y as i32, noise_seed + 40) - 0.5) * 10.0;
            for k in 0..3 {
                let chroma = (lattice(x as i32, y as i32, noise_seed + 41 + k as u32) - 0.5) * 3.0;
                let value = (f32::from(data[i + k]) + luma + chroma) * vignette;
                data[i + k] = value.clamp(0.0, 255.0) as u8;
            }
        }
    }
    RgbImage::from_raw(width, height, data).unwrap_or_else(|| RgbImage::new(width, height))
}
