//! The schedulers against diffusers 0.42 (reference/schedulers.py): timesteps, sigmas,
//! init_noise_sigma, and every intermediate sample of a fake denoising loop, txt2img and img2img
//! at strengths 0.3 and 0.6, on f32 CPU tensors.
//!
//! Tolerances:
//! - timesteps: exactly equal, except Euler with Karras sigmas, whose fractional timesteps come
//!   from logs that NumPy computes with its own SIMD `log` (last-ulp differences): |Δ| ≤ 1e-3
//!   on values up to 999 (one f32 ulp there is 6e-5).
//! - sigmas and init_noise_sigma: relative 1e-6 (NumPy's SIMD `pow`/`log` vs libm, in f64,
//!   before the cast to f32).
//! - samples: max |rust − diffusers| / max |diffusers| ≤ 1e-5 at every step.
//! - the seeded noise (tch vs torch CPU generator): bit-identical.
//!
//! Measured on the dev machine (libtorch 2.11 CPU): everything bit-identical in all 28 cases but
//! one Euler Karras timestep of `euler-karras-bounds-7` one ulp off (max sample error 6.3e-8).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use darkroom_inference::EngineError;
use darkroom_inference::scheduler::{
    Scheduler, SchedulerConfig, SchedulerKind, TimestepSpacing, step_noise_like,
};
use serde::Deserialize;
use tch::{Device, Kind, Tensor};

/// Serializes the tests that draw from libtorch's global CPU generator.
static RNG: Mutex<()> = Mutex::new(());

const SHAPE: [i64; 4] = [2, 4, 6, 5];
const SAMPLE_TOLERANCE: f64 = 1e-5;
const SIGMA_TOLERANCE: f64 = 1e-6;
const KARRAS_TIMESTEP_TOLERANCE: f64 = 1e-3;

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    kind: String,
    steps: usize,
    seed: i64,
    timesteps: Vec<f64>,
    sigmas: Option<Vec<f64>>,
    init_noise_sigma: f64,
    img2img: Vec<Img2Img>,
}

#[derive(Debug, Deserialize)]
struct Img2Img {
    strength: f64,
    seed: i64,
    begin_index: usize,
    remaining_steps: usize,
}

fn fixture() -> PathBuf {
    common::fixture("schedulers", &[])
}

fn cases(dir: &Path, kind: SchedulerKind) -> Vec<Case> {
    let text = std::fs::read_to_string(dir.join("cases.json")).unwrap();
    let all: Vec<Case> = serde_json::from_str(&text).unwrap();
    let selected: Vec<Case> = all
        .into_iter()
        .filter(|c| c.kind.parse::<SchedulerKind>().unwrap() == kind)
        .collect();
    assert!(!selected.is_empty(), "no {kind} cases");
    selected
}

/// The reference's stand-in for the UNet: `0.1 * input + cos(t / 300) * pattern` in f32.
fn fake_model(input: &Tensor, timestep: f64, pattern: &Tensor) -> Tensor {
    let c = (Tensor::from(timestep as f32) / 300.0).cos();
    input * 0.1 + c * pattern
}

/// Runs steps `begin..` from `latents` and returns every sample (the start included).
fn denoise(scheduler: &mut Scheduler, latents: Tensor, pattern: &Tensor) -> Vec<Tensor> {
    let mut samples = vec![latents.shallow_clone()];
    let mut latents = latents;
    for i in scheduler.begin_index()..scheduler.timesteps().len() {
        let t = scheduler.timesteps()[i];
        let input = scheduler.scale_model_input(&latents, i).unwrap();
        let model_output = fake_model(&input, t, pattern);
        let noise = scheduler
            .needs_step_noise()
            .then(|| step_noise_like(&model_output));
        latents = scheduler
            .step(&model_output, i, &latents, noise.as_ref())
            .unwrap();
        samples.push(latents.shallow_clone());
    }
    samples
}

fn compare_samples(
    case: &str,
    prefix: &str,
    actual: &[Tensor],
    expected: &std::collections::HashMap<String, Tensor>,
) -> f64 {
    let mut worst = 0.0f64;
    for (i, sample) in actual.iter().enumerate() {
        let reference = &expected[&format!("{prefix}.{i}")];
        let error = common::relative_error(sample, reference);
        assert!(
            error <= SAMPLE_TOLERANCE,
            "{case} {prefix} sample {i}: relative error {error:e}"
        );
        worst = worst.max(error);
    }
    assert_eq!(
        actual.len(),
        expected
            .keys()
            .filter(|k| k.starts_with(&format!("{prefix}.")) && !k.ends_with(".noise"))
            .count(),
        "{case} {prefix}: number of samples"
    );
    worst
}

/// Checks every case of `kind`; returns the worst sample error.
fn check_kind(kind: SchedulerKind) -> f64 {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let dir = fixture();
    let inputs = common::read_tensors(&dir.join("inputs.safetensors"));
    let (pattern, image_latents) = (&inputs["pattern"], &inputs["image_latents"]);
    let mut worst = 0.0f64;
    for case in cases(&dir, kind) {
        let name = case.name.as_str();
        let config = SchedulerConfig::from_model_dir(&dir.join(name)).unwrap();
        let expected = common::read_tensors(&dir.join(format!("{name}.safetensors")));
        let mut scheduler = Scheduler::new(kind, &config, case.steps).unwrap();

        let karras_euler = kind == SchedulerKind::Euler && config.use_karras_sigmas;
        assert_eq!(scheduler.timesteps().len(), case.timesteps.len(), "{name}");
        for (i, (&a, &e)) in scheduler
            .timesteps()
            .iter()
            .zip(&case.timesteps)
            .enumerate()
        {
            let tolerance = if karras_euler {
                KARRAS_TIMESTEP_TOLERANCE
            } else {
                0.0
            };
            assert!(
                (a - e).abs() <= tolerance,
                "{name} timestep {i}: {a} vs {e}"
            );
        }
        match (scheduler.sigmas(), &case.sigmas) {
            (Some(actual), Some(reference)) => {
                assert_eq!(actual.len(), reference.len(), "{name} sigmas");
                for (i, (&a, &e)) in actual.iter().zip(reference).enumerate() {
                    let error = (f64::from(a) - e).abs() / e.abs().max(1e-12);
                    assert!(error <= SIGMA_TOLERANCE, "{name} sigma {i}: {a} vs {e}");
                }
            }
            (None, None) => {}
            (actual, reference) => panic!("{name}: sigmas {actual:?} vs {reference:?}"),
        }
        let init = scheduler.init_noise_sigma();
        assert!(
            (init - case.init_noise_sigma).abs() <= SIGMA_TOLERANCE * case.init_noise_sigma,
            "{name} init_noise_sigma {init} vs {}",
            case.init_noise_sigma
        );

        // txt2img, seeded like `torch.Generator("cpu").manual_seed(seed)`.
        tch::manual_seed(case.seed);
        let noise = Tensor::randn(SHAPE, (Kind::Float, Device::Cpu));
        assert!(
            noise.equal(&expected["txt2img.noise"]),
            "{name}: seeded noise differs"
        );
        let latents = &noise * scheduler.init_noise_sigma();
        let samples = denoise(&mut scheduler, latents, pattern);
        worst = worst.max(compare_samples(name, "txt2img", &samples, &expected));

        for (k, img) in case.img2img.iter().enumerate() {
            let mut scheduler = Scheduler::new(kind, &config, case.steps).unwrap();
            let begin = scheduler.set_strength(img.strength).unwrap();
            assert_eq!(begin, img.begin_index, "{name} strength {}", img.strength);
            assert_eq!(
                scheduler.denoising_timesteps(),
                &scheduler.timesteps()[begin..],
                "{name}"
            );
            assert_eq!(
                scheduler.num_inference_steps() - begin,
                img.remaining_steps,
                "{name} remaining steps"
            );
            tch::manual_seed(img.seed);
            let noise = Tensor::randn(SHAPE, (Kind::Float, Device::Cpu));
            let prefix = format!("img2img{k}");
            assert!(
                noise.equal(&expected[&format!("{prefix}.noise")]),
                "{name}: seeded noise differs"
            );
            let latents = scheduler.add_noise(image_latents, &noise, begin).unwrap();
            let samples = denoise(&mut scheduler, latents, pattern);
            worst = worst.max(compare_samples(name, &prefix, &samples, &expected));
        }
    }
    println!("{kind}: worst relative error {worst:e}");
    worst
}

#[test]
fn euler_matches_diffusers() {
    check_kind(SchedulerKind::Euler);
}

#[test]
fn euler_ancestral_matches_diffusers() {
    check_kind(SchedulerKind::EulerAncestral);
}

#[test]
fn dpmpp_2m_karras_matches_diffusers() {
    check_kind(SchedulerKind::DpmPlusPlus2MKarras);
}

#[test]
fn ddim_matches_diffusers() {
    check_kind(SchedulerKind::Ddim);
}

#[test]
fn sdxl_base_constructor_matches_the_config_file() {
    let dir = fixture();
    let from_file = SchedulerConfig::from_model_dir(&dir.join("euler-sdxl-30")).unwrap();
    assert_eq!(from_file, SchedulerConfig::sdxl_base());
    assert_eq!(from_file.timestep_spacing, Some(TimestepSpacing::Leading));
}

#[test]
fn two_runs_with_the_same_inputs_agree() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let pattern = Tensor::linspace(
        -1.0,
        1.0,
        SHAPE.iter().product(),
        (Kind::Float, Device::Cpu),
    )
    .reshape(SHAPE);
    let config = SchedulerConfig::sdxl_base();
    for kind in SchedulerKind::ALL {
        let run = || {
            let mut scheduler = Scheduler::new(kind, &config, 12).unwrap();
            tch::manual_seed(7);
            let latents =
                Tensor::randn(SHAPE, (Kind::Float, Device::Cpu)) * scheduler.init_noise_sigma();
            denoise(&mut scheduler, latents, &pattern).pop().unwrap()
        };
        let (first, second) = (run(), run());
        assert!(first.equal(&second), "{kind}: two runs differ");
        assert!(
            first.isfinite().all().int64_value(&[]) == 1,
            "{kind}: non-finite"
        );
    }
}

#[test]
fn misuse_is_a_typed_error() {
    let config = SchedulerConfig::sdxl_base();
    let x = Tensor::zeros(SHAPE, (Kind::Float, Device::Cpu));
    let schedule_error =
        |r: Result<_, EngineError>| matches!(r, Err(EngineError::InvalidSchedule(_)));

    for kind in SchedulerKind::ALL {
        assert!(
            schedule_error(Scheduler::new(kind, &config, 0).map(|_| ())),
            "{kind} 0 steps"
        );
        assert!(
            schedule_error(Scheduler::new(kind, &config, 1001).map(|_| ())),
            "{kind} too many"
        );
        let mut s = Scheduler::new(kind, &config, 10).unwrap();
        let noise = Tensor::zeros(SHAPE, (Kind::Float, Device::Cpu));
        assert!(
            schedule_error(s.step(&x, 1, &x, Some(&noise)).map(|_| ())),
            "{kind} out of order"
        );
        assert!(
            schedule_error(s.scale_model_input(&x, 10).map(|_| ())),
            "{kind} past the end"
        );
        assert!(
            schedule_error(s.set_strength(0.0).map(|_| ())),
            "{kind} strength 0"
        );
        assert!(
            schedule_error(s.set_strength(1.5).map(|_| ())),
            "{kind} strength 1.5"
        );
        let _ = s.step(&x, 0, &x, Some(&noise)).unwrap();
        assert!(
            schedule_error(s.set_begin_index(3)),
            "{kind} begin after start"
        );
        for i in 1..10 {
            let _ = s.step(&x, i, &x, Some(&noise)).unwrap();
        }
        assert!(
            schedule_error(s.step(&x, 10, &x, Some(&noise)).map(|_| ())),
            "{kind} past the end"
        );
        // Strength 1 keeps every step.
        let mut s = Scheduler::new(kind, &config, 10).unwrap();
        assert_eq!(s.set_strength(1.0).unwrap(), 0);
    }
    let mut s = Scheduler::new(SchedulerKind::EulerAncestral, &config, 10).unwrap();
    assert!(
        schedule_error(s.step(&x, 0, &x, None).map(|_| ())),
        "euler-a without noise"
    );
}

#[test]
fn unsupported_configs_are_rejected() {
    let invalid = |json: &str| {
        matches!(
            SchedulerConfig::from_json_str(json).and_then(|c| Scheduler::new(
                SchedulerKind::Euler,
                &c,
                10
            )),
            Err(EngineError::InvalidConfig {
                component: "scheduler",
                ..
            })
        )
    };
    assert!(invalid(r#"{"beta_schedule": "squaredcos_cap_v2"}"#));
    assert!(invalid(r#"{"prediction_type": "sample"}"#));
    assert!(invalid(r#"{"timestep_spacing": "random"}"#));
    assert!(invalid(r#"{"thresholding": true}"#));
    assert!(invalid(r#"{"use_exponential_sigmas": true}"#));
    assert!(invalid(r#"{"trained_betas": [0.1, 0.2]}"#));
    assert!(invalid("not json"));
    // Unknown keys are ignored, nulls read as Python's None, missing keys take defaults.
    let config = SchedulerConfig::from_json_str(
        r#"{"_class_name": "PNDMScheduler", "skip_prk_steps": true, "use_karras_sigmas": null, "trained_betas": null}"#,
    )
    .unwrap();
    assert_eq!(config, SchedulerConfig::default());
    assert!(matches!(
        SchedulerConfig::from_model_dir(Path::new("/nonexistent")),
        Err(EngineError::InvalidConfig { .. })
    ));
}

#[test]
fn reduced_precision_runs_keep_the_model_dtype() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let pattern = Tensor::linspace(
        -1.0,
        1.0,
        SHAPE.iter().product(),
        (Kind::Float, Device::Cpu),
    )
    .reshape(SHAPE);
    let config = SchedulerConfig::sdxl_base();
    for kind in SchedulerKind::ALL {
        let run = |dtype: Kind| {
            let mut scheduler = Scheduler::new(kind, &config, 12).unwrap();
            tch::manual_seed(11);
            let latents =
                Tensor::randn(SHAPE, (Kind::Float, Device::Cpu)) * scheduler.init_noise_sigma();
            denoise(
                &mut scheduler,
                latents.to_kind(dtype),
                &pattern.to_kind(dtype),
            )
            .pop()
            .unwrap()
        };
        let (full, reduced) = (run(Kind::Float), run(Kind::BFloat16));
        assert_eq!(reduced.kind(), Kind::BFloat16, "{kind}");
        assert!(
            reduced.isfinite().all().int64_value(&[]) == 1,
            "{kind}: non-finite"
        );
        // Euler ancestral draws its step noise in the model's dtype, as diffusers does, and
        // libtorch's bf16 normal draws differ from its f32 ones: no f32 comparison there.
        if kind != SchedulerKind::EulerAncestral {
            let error = common::relative_error(&reduced, &full);
            assert!(
                error < 0.05,
                "{kind}: bf16 run drifts from f32 by {error:e}"
            );
        }
    }
}

#[test]
fn schedulers_can_move_between_threads() {
    fn assert_send<T: Send>() {}
    assert_send::<Scheduler>();
}
