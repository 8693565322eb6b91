//! LoRAs against diffusers on the tiny random SDXL (reference/lora.py): the same LoRA as a PEFT,
//! a kohya (SGM UNet names, alpha ≠ rank) and an old-diffusers file, two LoRAs at 0.7/0.4, and
//! img2img with a LoRA at strength 0.6, fused as `load_lora_weights` + `set_adapters` +
//! `fuse_lora` fuse them. Tolerances: fused weights relative error ≤ 1e-6 per parameter, max
//! pixel difference ≤ 3/255, latents relative error ≤ 1e-3. Switching sets is exact; LoRAs that
//! do not fit are refused with their keys listed and the model left as it was.
#![allow(clippy::unwrap_used)]

mod common;

use common::CaseParams as Params;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use darkroom_inference::EngineError;
use darkroom_inference::clip::canonical_parameter_name;
use darkroom_inference::device::DType;
use darkroom_inference::kernels::{KernelChoice, is_channels_last};
use darkroom_inference::loader::Component;
use darkroom_inference::lora::{
    LoraCache, LoraError, LoraFormat, LoraFuser, LoraSpec, LoraTarget, LoraWeights, Problem,
    benchmark_switch,
};
use darkroom_inference::pipeline::{GenerateRequest, InitImage, SdxlPipeline};
use tch::{Device, Kind, Tensor, nn};

fn fixture() -> PathBuf {
    common::fixture("lora", &[])
}

fn params(case: &Path) -> Params {
    Params::read(case)
}

fn request(params: &Params, init: &Path) -> GenerateRequest {
    GenerateRequest {
        prompt: params.prompt.clone(),
        negative_prompt: Some(params.negative_prompt.clone()),
        width: params.width,
        height: params.height,
        steps: params.steps,
        guidance: params.guidance,
        seed: params.seed,
        init: params.strength.map(|strength| InitImage {
            image: image::open(init).unwrap().to_rgb8(),
            strength,
        }),
        ..GenerateRequest::default()
    }
}

/// A small txt2img request (64×64, 3 steps) for tests that compare a pipeline with itself.
fn fox_request() -> GenerateRequest {
    GenerateRequest {
        prompt: "a storybook fox".to_owned(),
        width: 64,
        height: 64,
        steps: 3,
        seed: 3,
        ..GenerateRequest::default()
    }
}

fn load(fixture: &Path) -> SdxlPipeline {
    SdxlPipeline::load(&fixture.join("model"), None, Device::Cpu, DType::F32).unwrap()
}

fn lora(pipeline: &SdxlPipeline, fixture: &Path, file: &str) -> LoraWeights {
    pipeline
        .load_lora(&fixture.join("loras").join(file))
        .unwrap()
}

const ADAPTED: [Component; 3] = [
    Component::TextEncoder,
    Component::TextEncoder2,
    Component::Unet,
];

/// Copies of every weight of the UNet and the text encoders.
fn snapshot(pipeline: &SdxlPipeline) -> BTreeMap<String, Tensor> {
    let mut out = BTreeMap::new();
    for component in ADAPTED {
        for (name, tensor) in pipeline.var_store(component).unwrap().variables() {
            out.insert(format!("{component}.{name}"), tensor.copy());
        }
    }
    out
}

/// The names whose values differ (bit for bit) between two snapshots.
fn differing(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) -> Vec<String> {
    assert_eq!(a.len(), b.len());
    a.iter()
        .filter(|(name, tensor)| !tensor.equal(&b[*name]))
        .map(|(name, _)| name.clone())
        .collect()
}

/// The reference's `<component>.<parameter>` as this engine's variable name.
fn engine_name(reference: &str) -> (Component, String) {
    let (component, name) = reference.split_once('.').unwrap();
    match component {
        "unet" => (Component::Unet, name.to_owned()),
        "text_encoder" => (
            Component::TextEncoder,
            canonical_parameter_name(name).into_owned(),
        ),
        "text_encoder_2" => (Component::TextEncoder2, name.to_owned()),
        other => panic!("component {other}"),
    }
}

#[test]
fn every_format_and_set_matches_diffusers() {
    let fixture = fixture();
    let mut pipeline = load(&fixture);
    let base = snapshot(&pipeline);
    let mut cases: Vec<_> = std::fs::read_dir(fixture.join("cases"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|case| case.join("fused.safetensors").exists())
        .collect();
    cases.sort();
    assert_eq!(cases.len(), 5);
    for case in cases {
        let name = case.file_name().unwrap().to_string_lossy().into_owned();
        let params = params(&case);
        let loras: Vec<LoraWeights> = params
            .loras
            .iter()
            .map(|(file, _)| lora(&pipeline, &fixture, file))
            .collect();
        let set: Vec<(&LoraWeights, f64)> = loras
            .iter()
            .zip(&params.loras)
            .map(|(lora, (_, weight))| (lora, *weight))
            .collect();
        pipeline.set_loras(&set).unwrap();

        // The fused weights: exactly the parameters diffusers changed, to f32 rounding.
        let expected = common::read_tensors(&case.join("fused.safetensors"));
        let now = snapshot(&pipeline);
        let changed = differing(&base, &now);
        assert_eq!(changed.len(), expected.len(), "{name}: parameters changed");
        let mut worst: f64 = 0.0;
        for (reference, value) in &expected {
            let (component, parameter) = engine_name(reference);
            let ours = pipeline
                .var_store(component)
                .unwrap()
                .variables()
                .remove(&parameter)
                .unwrap_or_else(|| panic!("{name}: no {component} {parameter}"));
            worst = worst.max(common::relative_error(&ours, value));
        }
        assert!(
            worst <= 1e-6,
            "{name}: fused weights relative error {worst}"
        );

        let generated = pipeline
            .generate(&request(&params, &fixture.join("init.png")), &mut |_, _| {})
            .unwrap();
        let expected_image = image::open(case.join("result.png")).unwrap().to_rgb8();
        let expected_latents = common::read_tensors(&case.join("latents.safetensors"));
        let pixels = common::max_pixel_difference(&generated.image, &expected_image);
        let latents = common::relative_error(&generated.latents, &expected_latents["latents"]);
        eprintln!(
            "{name}: fused weights relative error {worst:.2e}, max pixel difference {pixels}, latents relative error {latents:.2e}"
        );
        assert!(pixels <= 3, "{name}: max pixel difference {pixels}");
        assert!(latents <= 1e-3, "{name}: latents relative error {latents}");
    }
    pipeline.set_loras(&[]).unwrap();
    assert!(differing(&base, &snapshot(&pipeline)).is_empty());
}

#[test]
fn the_formats_are_read_as_what_they_are() {
    let fixture = fixture();
    let pipeline = load(&fixture);
    let peft = lora(&pipeline, &fixture, "a_peft.safetensors");
    let kohya = lora(&pipeline, &fixture, "a_kohya.safetensors");
    let old = lora(&pipeline, &fixture, "a_old.safetensors");
    assert_eq!(peft.format(), LoraFormat::Peft);
    assert_eq!(kohya.format(), LoraFormat::Kohya);
    assert_eq!(old.format(), LoraFormat::DiffusersLegacy);
    // 146 UNet modules (conv 3×3 and 1×1 among them), 18 per text encoder.
    assert_eq!(peft.modules().len(), 182);
    for other in [&kohya, &old] {
        assert_eq!(other.modules().len(), peft.modules().len());
        for (a, b) in peft.modules().iter().zip(other.modules()) {
            assert_eq!(
                (a.component(), a.parameter()),
                (b.component(), b.parameter())
            );
        }
    }
    let scale = |lora: &LoraWeights, parameter: &str| {
        let module = lora
            .modules()
            .iter()
            .find(|m| m.parameter() == parameter)
            .unwrap();
        (module.rank(), module.scale(1.0))
    };
    // alpha 8: rank 4 → scale 2, the rank-2 conv → 4; the old format folds the scale in.
    let conv = "down_blocks.1.resnets.0.conv1.weight";
    assert_eq!(scale(&peft, conv), (2, 4.0));
    assert_eq!(scale(&kohya, conv), (2, 4.0));
    assert_eq!(scale(&old, conv), (2, 1.0));
    let q = "text_model.encoder.layers.1.self_attn.q_proj.weight";
    assert_eq!(scale(&peft, q), (4, 0.5));
    assert_eq!(scale(&kohya, q), (4, 0.5));
    // LoRA b has no metadata: alpha = rank.
    let b = lora(&pipeline, &fixture, "b_peft.safetensors");
    assert!(b.modules().iter().all(|m| m.scale(1.0) == 1.0));

    // kohya alphas count per module (as sd-scripts applies them; diffusers 0.42 gives every
    // module of a component its most common alpha); 0 or none means alpha = rank.
    let mut tensors = Tensor::read_safetensors(fixture.join("loras/a_kohya.safetensors")).unwrap();
    let unet_q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q";
    let te_q = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj";
    let te_k = "lora_te1_text_model_encoder_layers_0_self_attn_k_proj";
    for (name, value) in tensors.iter_mut() {
        if *name == format!("{unet_q}.alpha") {
            *value = Tensor::from(1.0f32);
        } else if *name == format!("{te_q}.alpha") {
            *value = Tensor::from(0.0f32);
        }
    }
    tensors.retain(|(name, _)| *name != format!("{te_k}.alpha"));
    let dir = tempfile::tempdir().unwrap();
    let varied = dir.path().join("varied.safetensors");
    Tensor::write_safetensors(&tensors, &varied).unwrap();
    let varied = pipeline.load_lora(&varied).unwrap();
    let scales = |parameter: &str| {
        varied
            .modules()
            .iter()
            .filter(|m| m.parameter() == parameter)
            .map(|m| m.scale(1.0))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        scales("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"),
        [0.25]
    );
    assert_eq!(
        scales("up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"),
        [2.0]
    );
    // The first text encoder's, then the second's (alpha 6).
    assert_eq!(
        scales("text_model.encoder.layers.0.self_attn.q_proj.weight"),
        [1.0, 1.5]
    );
    assert_eq!(
        scales("text_model.encoder.layers.0.self_attn.k_proj.weight"),
        [1.0, 1.5]
    );
    assert_eq!(
        scales("text_model.encoder.layers.0.self_attn.v_proj.weight"),
        [0.5, 1.5]
    );
}

#[test]
fn switching_sets_is_exact() {
    let fixture = fixture();
    let mut pipeline = load(&fixture);
    let a = lora(&pipeline, &fixture, "a_kohya.safetensors");
    let b = lora(&pipeline, &fixture, "b_peft.safetensors");
    let base = snapshot(&pipeline);
    let request = fox_request();

    pipeline.set_loras(&[(&a, 0.8)]).unwrap();
    let a_weights = snapshot(&pipeline);
    pipeline.set_loras(&[(&a, 0.7), (&b, 0.4)]).unwrap();
    pipeline.set_loras(&[(&b, 1.0)]).unwrap();
    let switch = pipeline.set_loras(&[(&a, 0.8)]).unwrap();
    let union: std::collections::BTreeSet<_> = a
        .modules()
        .iter()
        .chain(b.modules())
        .map(|m| (m.component(), m.parameter().to_owned()))
        .collect();
    assert!(
        union.len() < a.modules().len() + b.modules().len(),
        "a and b overlap"
    );
    assert_eq!(switch.fused, a.modules().len());
    assert_eq!(switch.fused + switch.restored, union.len());
    assert!(differing(&a_weights, &snapshot(&pipeline)).is_empty());
    let switched = pipeline.generate(&request, &mut |_, _| {}).unwrap();

    let mut fresh = load(&fixture);
    let a_fresh = lora(&fresh, &fixture, "a_kohya.safetensors");
    fresh.set_loras(&[(&a_fresh, 0.8)]).unwrap();
    assert!(differing(&a_weights, &snapshot(&fresh)).is_empty());
    let fresh_image = fresh.generate(&request, &mut |_, _| {}).unwrap();
    assert_eq!(
        common::max_pixel_difference(&switched.image, &fresh_image.image),
        0
    );
    assert!(switched.latents.equal(&fresh_image.latents));

    // Back to the base model, bit for bit; a weight of 0 is no LoRA.
    pipeline.set_loras(&[]).unwrap();
    assert!(differing(&base, &snapshot(&pipeline)).is_empty());
    pipeline.set_loras(&[(&b, 0.0)]).unwrap();
    assert!(differing(&base, &snapshot(&pipeline)).is_empty());
}

/// A pipeline remembers the text conditioning of the prompts it rendered; a LoRA switch that
/// changes what the text encoders have fused makes it encode them again: the image after the
/// switch is a fresh pipeline's, and a remembered prompt renders the same image as an encoded
/// one.
#[test]
fn a_lora_switch_forgets_remembered_prompts() {
    let fixture = fixture();
    let mut pipeline = load(&fixture);
    let a = lora(&pipeline, &fixture, "a_kohya.safetensors");
    assert!(
        a.modules().iter().any(|m| matches!(
            m.component(),
            Component::TextEncoder | Component::TextEncoder2
        )),
        "the LoRA adapts a text encoder"
    );
    let request = fox_request();
    let base = pipeline.generate(&request, &mut |_, _| {}).unwrap();
    let remembered = pipeline.generate(&request, &mut |_, _| {}).unwrap();
    assert!(!base.timings.prompt_remembered && remembered.timings.prompt_remembered);
    assert!(base.latents.equal(&remembered.latents));

    pipeline.set_loras(&[(&a, 0.8)]).unwrap();
    let switched = pipeline.generate(&request, &mut |_, _| {}).unwrap();
    assert!(!switched.timings.prompt_remembered);
    // The same set again (what a worker does per job) keeps what was remembered; another weight
    // does not.
    pipeline.set_loras(&[(&a, 0.8)]).unwrap();
    let again = pipeline.generate(&request, &mut |_, _| {}).unwrap();
    assert!(again.timings.prompt_remembered);
    assert!(again.latents.equal(&switched.latents));
    pipeline.set_loras(&[(&a, 0.7)]).unwrap();
    let other = pipeline.generate(&request, &mut |_, _| {}).unwrap();
    assert!(!other.timings.prompt_remembered);
    pipeline.set_loras(&[(&a, 0.8)]).unwrap();
    let fresh = load(&fixture);
    fresh.set_prompt_cache(0);
    let mut fresh = fresh;
    let a_fresh = lora(&fresh, &fixture, "a_kohya.safetensors");
    fresh.set_loras(&[(&a_fresh, 0.8)]).unwrap();
    let expected = fresh.generate(&request, &mut |_, _| {}).unwrap();
    assert!(switched.latents.equal(&expected.latents));
    assert!(!switched.latents.equal(&base.latents));
}

/// With the UNet's convolution weights stored channels-last (`set_channels_last`), a LoRA set
/// fuses into them exactly as into contiguous ones (the fixture's LoRAs adapt 3×3 and 1×1
/// convolutions), switching back restores the layout and the values bit for bit, and the image
/// is the same up to the convolution algorithms' rounding.
#[test]
fn channels_last_weights_take_lora_sets_and_give_the_same_image() {
    let fixture = fixture();
    let mut pipeline = load(&fixture);
    let a = lora(&pipeline, &fixture, "a_kohya.safetensors");
    let b = lora(&pipeline, &fixture, "b_peft.safetensors");
    let request = fox_request();
    let conv = |pipeline: &SdxlPipeline| {
        pipeline.var_store(Component::Unet).unwrap().variables()
            ["down_blocks.1.resnets.0.conv1.weight"]
            .shallow_clone()
    };
    pipeline.set_loras(&[(&a, 0.8)]).unwrap();
    let fused = snapshot(&pipeline);
    let expected = pipeline.generate(&request, &mut |_, _| {}).unwrap();

    pipeline.set_channels_last(true);
    assert!(pipeline.channels_last());
    assert!(is_channels_last(&conv(&pipeline)) && !conv(&pipeline).is_contiguous());
    assert!(differing(&fused, &snapshot(&pipeline)).is_empty());
    // Switching sets writes into the channels-last weights; A again is A exactly.
    pipeline.set_loras(&[(&b, 1.0)]).unwrap();
    pipeline.set_loras(&[(&a, 0.8)]).unwrap();
    assert!(differing(&fused, &snapshot(&pipeline)).is_empty());
    assert!(is_channels_last(&conv(&pipeline)));
    let channels_last = pipeline.generate(&request, &mut |_, _| {}).unwrap();
    let pixels = common::max_pixel_difference(&channels_last.image, &expected.image);
    let error = common::relative_error(&channels_last.latents, &expected.latents);
    assert!(pixels <= 1, "max pixel difference {pixels}");
    assert!(error <= 1e-5, "latents relative error {error}");

    pipeline.set_channels_last(false);
    assert!(conv(&pipeline).is_contiguous());
    assert!(differing(&fused, &snapshot(&pipeline)).is_empty());

    // The fused kernels are CUDA's: on the CPU they are refused, and nothing changes.
    let refused = pipeline.use_kernels(KernelChoice::FusedNhwc);
    assert!(
        matches!(&refused, Err(EngineError::InvalidConfig { component: "kernels", message })
            if message.contains("CUDA")),
        "{refused:?}"
    );
    assert!(!pipeline.channels_last());
    pipeline.use_kernels(KernelChoice::Stock).unwrap();
}

fn mismatch(error: EngineError) -> (Vec<String>, Vec<Problem>, Option<String>, String) {
    let message = error.to_string();
    match error {
        EngineError::Lora(LoraError::Mismatch { problems, hint, .. }) => (
            problems.iter().map(|p| p.key.clone()).collect(),
            problems.into_iter().map(|p| p.problem).collect(),
            hint,
            message,
        ),
        other => panic!("expected a mismatch, got {other}"),
    }
}

#[test]
fn loras_that_do_not_fit_are_refused_and_change_nothing() {
    let fixture = fixture();
    let mut pipeline = load(&fixture);
    let a = lora(&pipeline, &fixture, "a_peft.safetensors");
    pipeline.set_loras(&[(&a, 1.0)]).unwrap();
    let before = snapshot(&pipeline);
    let refuse = |file: &str| {
        pipeline
            .load_lora(&fixture.join("loras").join(file))
            .err()
            .unwrap()
    };

    let (keys, problems, _, message) = mismatch(refuse("bad_unknown.safetensors"));
    assert_eq!(
        keys,
        [
            "lora_te2_text_model_encoder_layers_9_mlp_fc1.lora_down.weight",
            "lora_unet_input_blocks_4_1_transformer_blocks_7_attn1_to_q.lora_down.weight",
        ]
    );
    assert!(matches!(
        problems[0],
        Problem::UnknownModule {
            component: Component::TextEncoder2
        }
    ));
    assert!(
        message.contains("lora_unet_input_blocks_4_1_transformer_blocks_7_attn1_to_q"),
        "{message}"
    );

    let (keys, problems, _, message) = mismatch(refuse("bad_shape.safetensors"));
    assert_eq!(
        keys,
        ["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight"]
    );
    assert!(
        matches!(&problems[0], Problem::Shape { parameter, expected, down, .. }
            if parameter == "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
                && expected == &[64, 96] && down == &[4, 77]),
        "{problems:?}"
    );
    eprintln!("{message}");

    let (keys, _, hint, message) = mismatch(refuse("sd15.safetensors"));
    // Every module of the SD 1.5 LoRA: 4 text-encoder modules fit CLIP-L's names but not its
    // width here, 9 UNet modules are missing or the wrong shape.
    assert_eq!(keys.len(), 13, "{message}");
    assert!(hint.unwrap().contains("Stable Diffusion 1.x"));
    assert!(message.contains("… and 3 more"), "{message}");
    eprintln!("{message}");

    // Not a LoRA at all.
    let not_lora = pipeline
        .load_lora(&fixture.join("model/unet/diffusion_pytorch_model.safetensors"))
        .err()
        .unwrap();
    assert!(
        matches!(not_lora, EngineError::Lora(LoraError::NotALora { .. })),
        "{not_lora}"
    );
    let missing = pipeline
        .load_lora(Path::new("/nonexistent/lora.safetensors"))
        .err()
        .unwrap();
    assert!(
        matches!(missing, EngineError::Lora(LoraError::File(_))),
        "{missing}"
    );
    assert!(
        pipeline
            .set_loras(&[(&a, f64::NAN)])
            .is_err_and(|e| matches!(e, EngineError::Lora(LoraError::InvalidWeight { .. })))
    );
    assert!(differing(&before, &snapshot(&pipeline)).is_empty());
}

/// A LoRA resolved for one model and applied to another whose shapes differ is refused before
/// anything changes.
#[test]
fn a_lora_for_another_model_is_refused_when_fused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.safetensors");
    Tensor::write_safetensors(
        &[
            (
                "unet.lin.lora_A.weight",
                &Tensor::ones([2, 6], (Kind::Float, Device::Cpu)),
            ),
            (
                "unet.lin.lora_B.weight",
                &Tensor::ones([8, 2], (Kind::Float, Device::Cpu)),
            ),
            (
                "unet.other.lora_A.weight",
                &Tensor::ones([2, 6], (Kind::Float, Device::Cpu)),
            ),
            (
                "unet.other.lora_B.weight",
                &Tensor::ones([8, 2], (Kind::Float, Device::Cpu)),
            ),
        ],
        &path,
    )
    .unwrap();
    let store = |inputs: i64| {
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = (vs.root() / "lin").zeros("weight", &[8, 6]);
        let _ = (vs.root() / "other").zeros("weight", &[8, inputs]);
        vs
    };
    let (fits, other) = (store(6), store(7));
    let target = LoraTarget::new(&[(Component::Unet, &fits)], None);
    let weights = LoraWeights::load(&path, &target).unwrap();
    assert_eq!(weights.modules().len(), 2);

    let mut fuser = LoraFuser::new();
    let error = fuser
        .apply(&[(Component::Unet, &other)], &[(&weights, 1.0)])
        .err()
        .unwrap();
    assert!(
        matches!(error, LoraError::Mismatch { ref problems, .. } if problems.len() == 1),
        "{error}"
    );
    let untouched = other.variables();
    assert_eq!(
        untouched["lin.weight"]
            .abs()
            .sum(Kind::Float)
            .double_value(&[]),
        0.0
    );

    let switch = fuser
        .apply(&[(Component::Unet, &fits)], &[(&weights, 0.5)])
        .unwrap();
    assert_eq!(switch.fused, 2);
    // ΔW = 0.5 · (2/2) · ones(8×2) @ ones(2×6) = 1.
    let fused = fits.variables();
    assert_eq!(fused["lin.weight"].mean(Kind::Float).double_value(&[]), 1.0);
    fuser.apply(&[(Component::Unet, &fits)], &[]).unwrap();
    assert_eq!(
        fits.variables()["lin.weight"]
            .abs()
            .sum(Kind::Float)
            .double_value(&[]),
        0.0
    );
}

#[test]
fn the_cache_keeps_loras_under_its_bound() {
    let fixture = fixture();
    let pipeline = load(&fixture);
    let target = pipeline.lora_target().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let copy = |from: &str, to: &str| {
        let path = dir.path().join(to);
        std::fs::copy(fixture.join("loras").join(from), &path).unwrap();
        path
    };
    let a = copy("a_peft.safetensors", "a.safetensors");
    let b = copy("b_peft.safetensors", "b.safetensors");
    let a_bytes = pipeline.load_lora(&a).unwrap().bytes();
    let b_bytes = pipeline.load_lora(&b).unwrap().bytes();
    assert!(a_bytes > b_bytes);

    let mut cache = LoraCache::new(a_bytes + b_bytes / 2);
    cache.get(&a, &target).unwrap();
    cache.get(&a, &target).unwrap();
    assert_eq!((cache.loads(), cache.len()), (1, 1));
    cache.get(&b, &target).unwrap();
    // Both do not fit: the least recently used (a) goes.
    assert!(!cache.contains(&a) && cache.contains(&b));
    assert!(cache.bytes() <= a_bytes + b_bytes / 2);

    // A set larger than the bound is held for its call.
    let specs = [
        LoraSpec {
            path: a.clone(),
            weight: 0.7,
        },
        LoraSpec {
            path: b.clone(),
            weight: 0.4,
        },
    ];
    let set = cache.get_many(&specs, &target).unwrap();
    assert_eq!(set.len(), 2);
    assert_eq!(set[1].1, 0.4);
    assert_eq!((cache.loads(), cache.len()), (3, 2));

    // A replaced file is read again.
    std::fs::copy(fixture.join("loras/a_kohya.safetensors"), &b).unwrap();
    let reread = cache.get(&b, &target).unwrap();
    assert_eq!(reread.format(), LoraFormat::Kohya);
    assert_eq!(cache.loads(), 4);
    assert!(
        cache
            .get(&dir.path().join("missing.safetensors"), &target)
            .is_err()
    );
}

/// CPU switch time between two LoRAs on the tiny model (for BENCHMARKS.md; not a timing
/// assertion). Run with `--nocapture` to see it.
#[test]
fn switch_time_on_the_tiny_model() {
    let fixture = fixture();
    let mut pipeline = load(&fixture);
    let a = lora(&pipeline, &fixture, "a_peft.safetensors");
    let b = lora(&pipeline, &fixture, "b_peft.safetensors");
    let result = benchmark_switch(&mut pipeline, &[(&a, 1.0)], &[(&b, 1.0)], 10).unwrap();
    eprintln!(
        "tiny SDXL, CPU, {} threads: LoRA switch A ({} parameters) ⇄ B ({} parameters): median {:.2} ms, min {:.2} ms, max {:.2} ms over {} switches; pristine copies {:.1} MB",
        tch::get_num_threads(),
        result.fused.0,
        result.fused.1,
        result.median.as_secs_f64() * 1e3,
        result.min.as_secs_f64() * 1e3,
        result.max.as_secs_f64() * 1e3,
        result.switches,
        result.pristine_bytes as f64 / 1e6,
    );
    assert_eq!(result.switches, 20);
}

#[test]
fn the_command_applies_loras() {
    let fixture = fixture();
    let case = fixture.join("cases/txt2img-two");
    let params = params(&case);
    let out = tempfile::tempdir().unwrap();
    let mut command = common::sdxl_command(&fixture, &params, &out.path().join("out.png"));
    for (file, weight) in &params.loras {
        let spec = format!("{}:{weight}", fixture.join("loras").join(file).display());
        command.args(["--lora", &spec]);
    }
    let status = command.status().unwrap();
    assert!(status.success());
    let image = image::open(out.path().join("out.png")).unwrap().to_rgb8();
    let expected = image::open(case.join("result.png")).unwrap().to_rgb8();
    assert!(common::max_pixel_difference(&image, &expected) <= 3);

    let bad = Command::new(env!("CARGO_BIN_EXE_darkroom-sdxl"))
        .args(["--model".as_ref(), fixture.join("model").as_os_str()])
        .args([
            "--prompt", "x", "--width", "64", "--height", "64", "--steps", "1",
        ])
        .args(["--out".as_ref(), out.path().join("bad.png").as_os_str()])
        .args([
            "--lora".as_ref(),
            fixture.join("loras/sd15.safetensors").as_os_str(),
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("Stable Diffusion 1.x"), "{stderr}");
    assert!(!out.path().join("bad.png").exists());
}
