//! `darkroom-control-map`: draws the control image a depth or pose ControlNet reads, from a
//! photo, with the estimators the inference worker uses — to check an estimator's weights and
//! to see what a preset's ControlNet will get.
//!
//! ```text
//! darkroom-control-map --kind depth|pose --model PATH --image PHOTO --out MAP.png
//!   [--device cpu|cuda] [--dtype f32|f16|bf16]
//! ```
//!
//! `--model` is what the worker's `DARKROOM_DEPTH_MODEL` or `DARKROOM_POSE_MODEL` names. The
//! worker draws from a job's prepared input (`work/<job>/input.png`, or the `input.png` of
//! `darkroom-preprocess local`): give it that to see exactly what the job's ControlNet reads.
//! For pose, the people found are listed with their parts.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use darkroom_inference::depth::DepthEstimator;
use darkroom_inference::device::{DType, DeviceSpec, resolve};
use darkroom_inference::pose::skeleton::PART_NAMES;
use darkroom_inference::pose::{PoseEstimator, pose_map_of};

/// Which map to draw.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Kind {
    /// Relative depth, near is bright (Depth Anything; a transformers model folder).
    Depth,
    /// OpenPose skeletons on black (the OpenPose body model as safetensors).
    Pose,
}

#[derive(Parser)]
#[command(
    version,
    about = "Draw a depth or pose ControlNet's control image from a photo"
)]
struct Args {
    /// The control image to draw.
    #[arg(long, value_enum)]
    kind: Kind,
    /// The estimator: a Depth Anything folder (depth), or the body model's safetensors file or
    /// its folder (pose).
    #[arg(long)]
    model: PathBuf,
    /// The photo (upright: EXIF orientation is not applied).
    #[arg(long)]
    image: PathBuf,
    /// Where to write the control image (PNG, the photo's size).
    #[arg(long)]
    out: PathBuf,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// Default: f32 on the CPU, f16 on a GPU.
    #[arg(long)]
    dtype: Option<DType>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dtype = args.dtype.unwrap_or(args.device.default_dtype());
    let (device, _) = resolve(args.device, dtype)?;
    let photo = image::open(&args.image)
        .with_context(|| format!("reading {}", args.image.display()))?
        .to_rgb8();
    let (width, height) = photo.dimensions();

    let started = Instant::now();
    let (map, load_time) = match args.kind {
        Kind::Depth => {
            let estimator = DepthEstimator::load(&args.model, device, dtype)
                .with_context(|| format!("loading {}", args.model.display()))?;
            let load_time = started.elapsed();
            let map = estimator.depth_map(&photo)?;
            (image::DynamicImage::ImageLuma8(map).to_rgb8(), load_time)
        }
        Kind::Pose => {
            let estimator = PoseEstimator::load(&args.model, device, dtype)
                .with_context(|| format!("loading {}", args.model.display()))?;
            let load_time = started.elapsed();
            let people = estimator.people(&photo)?;
            match people.len() {
                1 => println!("1 person"),
                n => println!("{n} people"),
            }
            for (i, keypoints) in people.iter().enumerate() {
                let missing: Vec<&str> = keypoints
                    .iter()
                    .zip(PART_NAMES)
                    .filter(|(keypoint, _)| keypoint.is_none())
                    .map(|(_, name)| name)
                    .collect();
                let found = keypoints.len() - missing.len();
                if missing.is_empty() {
                    println!("person {}: all {found} parts", i + 1);
                } else {
                    println!(
                        "person {}: {found} of {} parts (no {})",
                        i + 1,
                        keypoints.len(),
                        missing.join(", ")
                    );
                }
            }
            (pose_map_of(&people, width, height), load_time)
        }
    };
    map.save(&args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!(
        "{width}×{height}: loaded in {:.2} s, drawn in {:.2} s → {}",
        load_time.as_secs_f64(),
        (started.elapsed() - load_time).as_secs_f64(),
        args.out.display()
    );
    Ok(())
}
