//! `darkroom-sdxl`: renders one SDXL image from a local model, for people and for checks.
//!
//! ```text
//! darkroom-sdxl --model PATH --prompt TEXT [--negative-prompt TEXT]
//!   [--init-image PNG --strength F] [--width W --height H] --steps N --guidance F --seed S
//!   --scheduler euler|euler-a|dpmpp-2m-karras|ddim [--device cpu|cuda] [--dtype f32|f16|bf16]
//!   [--kernels stock|fused|fused-nhwc]
//!   [--lora PATH[:WEIGHT]]… [--controlnet DIR:IMAGE[:SCALE[:START:END]]]…
//!   --out OUT.png [--save-latents OUT.safetensors]
//! ```
//!
//! `--controlnet` (repeatable) steers the image with a diffusers ControlNet folder and a control
//! image at the output size (the init image's size for img2img); SCALE defaults to 1, the window
//! START:END to 0:1 (fractions of the steps). The value is read from the right: up to three
//! trailing numbers, then IMAGE after the last remaining `:` and DIR before it — or, when DIR
//! itself contains `:`, the longest prefix that is an existing folder. Several `--controlnet`s
//! naming the same DIR load it once.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use darkroom_inference::device::{DType, DeviceSpec, resolve};
use darkroom_inference::kernels::KernelChoice;
use darkroom_inference::lora::{LoraSpec, LoraWeights};
use darkroom_inference::pipeline::{ControlInput, GenerateRequest, InitImage, SdxlPipeline};
use darkroom_inference::scheduler::SchedulerKind;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser)]
#[command(
    version,
    about = "Render an image with SDXL (diffusers folder or single-file checkpoint)"
)]
struct Args {
    /// A diffusers model folder or a single-file `.safetensors` SDXL checkpoint.
    #[arg(long)]
    model: PathBuf,
    /// For a single-file checkpoint that is not SDXL base-shaped: a diffusers folder with its
    /// configs and tokenizers.
    #[arg(long)]
    config: Option<PathBuf>,
    /// What to render.
    #[arg(long)]
    prompt: String,
    /// What to keep out of the image (default: none, as zero embeddings).
    #[arg(long)]
    negative_prompt: Option<String>,
    /// img2img: the image to start from (its size is used; sides must be multiples of 8).
    #[arg(long)]
    init_image: Option<PathBuf>,
    /// img2img: how much of the init image to repaint, 0–1.
    #[arg(long, default_value_t = 0.6, requires = "init_image")]
    strength: f64,
    /// Output width in pixels (txt2img).
    #[arg(long, default_value_t = 1024)]
    width: u32,
    /// Output height in pixels (txt2img).
    #[arg(long, default_value_t = 1024)]
    height: u32,
    /// Denoising steps.
    #[arg(long, default_value_t = 30)]
    steps: usize,
    /// Classifier-free guidance scale (≤ 1 turns it off).
    #[arg(long, default_value_t = 5.0)]
    guidance: f64,
    /// Seed; the same seed and inputs give the same image (and the same as diffusers on CPU).
    #[arg(long, default_value_t = 0)]
    seed: i64,
    /// Sampler: euler, euler-a, dpmpp-2m-karras or ddim.
    #[arg(long, default_value = "euler")]
    scheduler: SchedulerKind,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// f32, f16 or bf16 (f16 needs a GPU).
    #[arg(long)]
    dtype: Option<DType>,
    /// CUDA kernels: stock (libtorch's), fused (Darkroom's fused GroupNorm+SiLU, GEGLU and
    /// add+LayerNorm) or fused-nhwc (those, with channels-last convolutions). See BENCHMARKS.md.
    #[arg(long, default_value_t = KernelChoice::Stock)]
    kernels: KernelChoice,
    /// A LoRA `.safetensors` (kohya or diffusers/PEFT) fused before rendering, with an optional
    /// weight after the last `:` (default 1); repeat for several.
    #[arg(long = "lora", value_name = "PATH[:WEIGHT]")]
    loras: Vec<LoraSpec>,
    /// A ControlNet, repeatable: `DIR:IMAGE[:SCALE[:START:END]]`. DIR is a diffusers ControlNet
    /// folder, IMAGE a control image at the output size, SCALE its weight (default 1), START:END
    /// the fraction of the steps it acts on (default 0:1).
    #[arg(long = "controlnet", value_name = "DIR:IMAGE[:SCALE[:START:END]]")]
    controlnets: Vec<ControlSpec>,
    /// Where to write the PNG.
    #[arg(long)]
    out: PathBuf,
    /// Also write the final latents (`latents`, f32) as safetensors.
    #[arg(long)]
    save_latents: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dtype = args.dtype.unwrap_or(args.device.default_dtype());
    let (device, _) = resolve(args.device, dtype)?;

    let started = Instant::now();
    let mut pipeline = SdxlPipeline::load(&args.model, args.config.as_deref(), device, dtype)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let mut loaded = HashMap::new();
    let mut controls = Vec::with_capacity(args.controlnets.len());
    for spec in &args.controlnets {
        let id = match loaded.get(&spec.dir) {
            Some(id) => *id,
            None => {
                let id = pipeline
                    .load_controlnet(&spec.dir)
                    .with_context(|| format!("loading ControlNet {}", spec.dir.display()))?;
                loaded.insert(spec.dir.clone(), id);
                id
            }
        };
        controls.push(ControlInput {
            conditioning_scale: spec.scale,
            guidance_start: spec.start,
            guidance_end: spec.end,
            ..ControlInput::new(
                id,
                image::open(&spec.image)
                    .with_context(|| format!("reading {}", spec.image.display()))?
                    .to_rgb8(),
            )
        });
    }
    pipeline.use_kernels(args.kernels)?;
    let load_time = started.elapsed();
    if !args.loras.is_empty() {
        let loras = args
            .loras
            .iter()
            .map(|spec| {
                pipeline
                    .load_lora(&spec.path)
                    .with_context(|| format!("loading LoRA {}", spec.path.display()))
            })
            .collect::<anyhow::Result<Vec<LoraWeights>>>()?;
        let set: Vec<(&LoraWeights, f64)> = loras
            .iter()
            .zip(&args.loras)
            .map(|(lora, spec)| (lora, spec.weight))
            .collect();
        let switch = pipeline.set_loras(&set)?;
        eprintln!(
            "fused {} LoRA(s) into {} weights in {:.1} ms",
            set.len(),
            switch.fused,
            switch.elapsed.as_secs_f64() * 1e3
        );
    }

    let init = match &args.init_image {
        Some(path) => Some(InitImage {
            image: image::open(path)
                .with_context(|| format!("reading {}", path.display()))?
                .to_rgb8(),
            strength: args.strength,
        }),
        None => None,
    };
    let request = GenerateRequest {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        width: args.width,
        height: args.height,
        steps: args.steps,
        guidance: args.guidance,
        seed: args.seed,
        scheduler: args.scheduler,
        init,
        controls,
    };
    let progress = if std::io::stderr().is_terminal() {
        ProgressBar::new(0)
    } else {
        ProgressBar::hidden()
    };
    progress.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} steps {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let generated = pipeline.generate(&request, &mut |done, total| {
        progress.set_length(total as u64);
        progress.set_position(done as u64);
    })?;
    progress.finish_and_clear();

    generated
        .image
        .save(&args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    if let Some(path) = &args.save_latents {
        tch::Tensor::write_safetensors(&[("latents", &generated.latents)], path)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let t = generated.timings;
    let per_step = t.denoise.as_secs_f64() / t.steps.max(1) as f64;
    eprintln!(
        "wrote {} ({}×{}) — load {:.2}s, text {:.3}s, prepare {:.3}s, denoise {:.2}s ({} steps, {:.2} it/s), decode {:.2}s",
        args.out.display(),
        generated.image.width(),
        generated.image.height(),
        load_time.as_secs_f64(),
        t.text.as_secs_f64(),
        t.prepare.as_secs_f64(),
        t.denoise.as_secs_f64(),
        t.steps,
        1.0 / per_step.max(f64::EPSILON),
        t.decode.as_secs_f64(),
    );
    Ok(())
}

/// One `--controlnet DIR:IMAGE[:SCALE[:START:END]]`.
#[derive(Debug, Clone, PartialEq)]
struct ControlSpec {
    dir: PathBuf,
    image: PathBuf,
    scale: f64,
    start: f64,
    end: f64,
}

impl FromStr for ControlSpec {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = value.split(':').collect();
        let number = |part: &str| part.parse::<f64>().ok().filter(|n| n.is_finite());
        // DIR and IMAGE take at least one part each.
        let trailing = parts
            .iter()
            .skip(2)
            .rev()
            .take_while(|part| number(part).is_some())
            .count()
            .min(3);
        let (paths, numbers) = match trailing {
            2 => {
                return Err(format!(
                    "{value:?}: a guidance window needs both START and END, after SCALE \
                     (DIR:IMAGE[:SCALE[:START:END]])"
                ));
            }
            n => parts.split_at(parts.len() - n),
        };
        let numbers: Vec<f64> = numbers.iter().filter_map(|part| number(part)).collect();
        let (scale, start, end) = match numbers[..] {
            [] => (1.0, 0.0, 1.0),
            [scale] => (scale, 0.0, 1.0),
            [scale, start, end] => (scale, start, end),
            _ => return Err(format!("{value:?}: expected DIR:IMAGE[:SCALE[:START:END]]")),
        };
        let (dir, image) = split_dir_image(paths)
            .ok_or_else(|| format!("{value:?}: expected DIR:IMAGE[:SCALE[:START:END]]"))?;
        Ok(ControlSpec {
            dir,
            image,
            scale,
            start,
            end,
        })
    }
}

/// `DIR:IMAGE` from its `:`-separated parts: the longest prefix that is an existing folder is
/// DIR; if none is, IMAGE is the last part.
fn split_dir_image(parts: &[&str]) -> Option<(PathBuf, PathBuf)> {
    if parts.len() < 2 || parts.iter().any(|part| part.is_empty()) {
        return None;
    }
    let split = (1..parts.len())
        .rev()
        .find(|&at| Path::new(&parts[..at].join(":")).is_dir())
        .unwrap_or(parts.len() - 1);
    Some((
        PathBuf::from(parts[..split].join(":")),
        PathBuf::from(parts[split..].join(":")),
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn spec(value: &str) -> ControlSpec {
        value.parse().unwrap()
    }

    #[test]
    fn controlnet_values_parse_from_the_right() {
        let plain = spec("nets/canny:edges.png");
        assert_eq!(plain.dir, PathBuf::from("nets/canny"));
        assert_eq!(plain.image, PathBuf::from("edges.png"));
        assert_eq!((plain.scale, plain.start, plain.end), (1.0, 0.0, 1.0));
        let scaled = spec("nets/canny:edges.png:0.8");
        assert_eq!((scaled.scale, scaled.start, scaled.end), (0.8, 0.0, 1.0));
        let windowed = spec("nets/canny:edges.png:0.5:0.1:0.6");
        assert_eq!(windowed.image, PathBuf::from("edges.png"));
        assert_eq!(
            (windowed.scale, windowed.start, windowed.end),
            (0.5, 0.1, 0.6)
        );
        // A ':' in an image name that is not a number stays in the path.
        let odd = spec("dir:a:b.png");
        assert_eq!(odd.dir, PathBuf::from("dir:a"));
        assert_eq!(odd.image, PathBuf::from("b.png"));
        assert!(
            "nets/canny:edges.png:0.5:0.1"
                .parse::<ControlSpec>()
                .is_err()
        );
        assert!("nets/canny".parse::<ControlSpec>().is_err());
        assert!("nets/canny:".parse::<ControlSpec>().is_err());
    }

    #[test]
    fn a_folder_with_a_colon_is_found_on_disk() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("cn:v1");
        std::fs::create_dir(&dir).unwrap();
        let value = format!("{}:pose:left.png:1.2", dir.display());
        let parsed = spec(&value);
        assert_eq!(parsed.dir, dir);
        assert_eq!(parsed.image, PathBuf::from("pose:left.png"));
        assert_eq!(parsed.scale, 1.2);
    }
}
