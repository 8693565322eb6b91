//! ControlNet against diffusers on the tiny random SDXL (reference/controlnet.py): the module's
//! residuals (relative error ≤ 1e-4), whole txt2img and img2img generations with one and with two
//! ControlNets (max pixel difference ≤ 3/255, latents relative error ≤ 1e-3), the command line,
//! and the typed errors for ControlNets and control images that do not fit.
#![allow(clippy::unwrap_used)]

mod common;

use common::CaseParams as Params;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use darkroom_inference::EngineError;
use darkroom_inference::controlnet::{
    ControlNet, ControlNetConfig, ControlNetModel, ControlNetOutput,
};
use darkroom_inference::device::DType;
use darkroom_inference::pipeline::{
    ControlInput, ControlNetId, GenerateRequest, InitImage, SdxlPipeline, controlnet_keep,
};
use darkroom_inference::profile::{self, ProfiledEvent};
use darkroom_inference::unet::{
    AddedConditioning, ControlResiduals, UNet2DConditionModel, UNetConfig,
};
use tch::{Device, Tensor, nn};

fn fixture() -> PathBuf {
    common::fixture("controlnet", &[])
}

fn params(case: &Path) -> Params {
    Params::read(case)
}

fn request(fixture: &Path, params: &Params, ids: &dyn Fn(&str) -> ControlNetId) -> GenerateRequest {
    GenerateRequest {
        prompt: params.prompt.clone(),
        negative_prompt: Some(params.negative_prompt.clone()),
        width: params.width,
        height: params.height,
        steps: params.steps,
        guidance: params.guidance,
        seed: params.seed,
        scheduler: params.scheduler.parse().unwrap(),
        init: params.strength.map(|strength| InitImage {
            image: image::open(fixture.join("init.png")).unwrap().to_rgb8(),
            strength,
        }),
        controls: params
            .controls
            .iter()
            .map(|c| ControlInput {
                conditioning_scale: c.scale,
                guidance_start: c.start,
                guidance_end: c.end,
                ..ControlInput::new(
                    ids(&c.net),
                    image::open(fixture.join("controls").join(&c.image))
                        .unwrap()
                        .to_rgb8(),
                )
            })
            .collect(),
    }
}

/// The pipeline with controlnet-a and controlnet-b loaded.
fn pipeline(fixture: &Path) -> (SdxlPipeline, ControlNetId, ControlNetId) {
    let mut pipeline =
        SdxlPipeline::load(&fixture.join("model"), None, Device::Cpu, DType::F32).unwrap();
    let a = pipeline
        .load_controlnet(&fixture.join("controlnet-a"))
        .unwrap();
    let b = pipeline
        .load_controlnet(&fixture.join("controlnet-b"))
        .unwrap();
    (pipeline, a, b)
}

/// The recorded module inputs (module.safetensors).
fn module_inputs() -> HashMap<String, Tensor> {
    common::read_tensors(&fixture().join("module.safetensors"))
}

/// `model` on the recorded inputs, with `cond` as the control image.
fn forward_recorded(
    model: &ControlNetModel,
    t: &HashMap<String, Tensor>,
    cond: &Tensor,
) -> ControlNetOutput {
    model
        .forward(
            &t["sample"],
            421.0,
            &t["encoder_hidden_states"],
            cond,
            0.7,
            Some(&AddedConditioning {
                text_embeds: &t["text_embeds"],
                time_ids: &t["time_ids"],
            }),
        )
        .unwrap()
}

/// Runs controlnet-a (or the folder given) on the recorded inputs; returns the residuals and the
/// reference tensors.
fn module_run(folder: &str) -> (Vec<Tensor>, Vec<Tensor>) {
    let net = ControlNet::load(&fixture().join(folder), Device::Cpu, DType::F32).unwrap();
    let t = module_inputs();
    let output = forward_recorded(net.model(), &t, &t["controlnet_cond"]);
    assert_eq!(output.down.len(), 9, "SDXL layout: 9 down residuals");
    assert_eq!(net.model().num_down_residuals(), 9);
    let mut actual = output.down;
    actual.push(output.mid);
    let mut expected: Vec<Tensor> = (0..9)
        .map(|i| t[&format!("down.{i}")].shallow_clone())
        .collect();
    expected.push(t["mid"].shallow_clone());
    (actual, expected)
}

#[test]
fn residuals_match_diffusers() {
    let (actual, expected) = module_run("controlnet-a");
    let mut worst = 0f64;
    for (i, (a, e)) in actual.iter().zip(&expected).enumerate() {
        let error = common::relative_error(a, e);
        worst = worst.max(error);
        assert!(error <= 1e-4, "residual {i}: relative error {error}");
    }
    eprintln!("ControlNet residuals: max relative error {worst:.2e}");
}

#[test]
fn the_fp16_variant_loads_and_stays_close() {
    // The folder holds only diffusion_pytorch_model.fp16.safetensors: an f32 load falls back to it.
    let (actual, expected) = module_run("controlnet-a-fp16");
    let worst = actual
        .iter()
        .zip(&expected)
        .map(|(a, e)| common::relative_error(a, e))
        .fold(0f64, f64::max);
    eprintln!("ControlNet from fp16 weights: max relative error {worst:.2e}");
    assert!(worst <= 1e-2, "relative error {worst}");
}

/// controlnet-a's weights under another config (same parameters).
fn variant_model(edit: impl FnOnce(&mut ControlNetConfig)) -> (nn::VarStore, ControlNetModel) {
    let dir = fixture().join("controlnet-a");
    let mut config =
        ControlNetConfig::from_json(&std::fs::read_to_string(dir.join("config.json")).unwrap())
            .unwrap();
    edit(&mut config);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = ControlNetModel::new(vs.root(), &config).unwrap();
    vs.load(dir.join("diffusion_pytorch_model.safetensors"))
        .unwrap();
    (vs, model)
}

#[test]
fn bgr_order_and_global_pooling_follow_diffusers() {
    let t = module_inputs();
    let run = |model: &ControlNetModel, cond: &Tensor| forward_recorded(model, &t, cond);
    let (_rgb_vs, rgb) = variant_model(|_| {});
    let (_bgr_vs, bgr) = variant_model(|c| c.controlnet_conditioning_channel_order = "bgr".into());
    let cond = &t["controlnet_cond"];
    let expected = run(&rgb, cond);
    let flipped = run(&bgr, &cond.flip([1]));
    for (a, b) in flipped.down.iter().zip(&expected.down) {
        assert!(a.equal(b));
    }
    assert!(flipped.mid.equal(&expected.mid));

    let (_pool_vs, pooled) = variant_model(|c| c.global_pool_conditions = true);
    let output = run(&pooled, cond);
    for (a, b) in output.down.iter().zip(&expected.down) {
        let mean = b.mean_dim([2i64, 3].as_slice(), true, None::<tch::Kind>);
        assert_eq!(a.size(), mean.size());
        assert!(common::relative_error(a, &mean) <= 1e-6);
    }
}

/// The control image's embedding computed once (`remember_condition`) gives the residuals of
/// computing it every step, bit for bit — in the BGR channel order too; an image changed in
/// place needs remembering again, and after `forget_condition` it is computed afresh.
#[test]
fn a_remembered_control_image_gives_the_same_residuals() {
    let t = module_inputs();
    let run = |model: &ControlNetModel, cond: &Tensor| {
        let output = forward_recorded(model, &t, cond);
        let mut all = output.down;
        all.push(output.mid);
        all
    };
    let same = |a: &[Tensor], b: &[Tensor]| a.iter().zip(b).all(|(x, y)| x.equal(y));
    for order in ["rgb", "bgr"] {
        let (_vs, model) =
            variant_model(|c| c.controlnet_conditioning_channel_order = order.into());
        let mut cond = t["controlnet_cond"].copy();
        let fresh = run(&model, &cond);
        model.remember_condition(&cond);
        assert!(same(&run(&model, &cond), &fresh), "{order}");

        // Changed in place: the remembered embedding is stale until remembered again.
        let _ = cond.g_mul_scalar_(0.5);
        let halved = t["controlnet_cond"].copy() * 0.5;
        let expected = run(&model, &halved);
        assert!(!same(&expected, &fresh));
        assert!(
            same(&run(&model, &cond), &fresh),
            "{order}: stale, as documented"
        );
        model.remember_condition(&cond);
        assert!(same(&run(&model, &cond), &expected), "{order}");

        // Forgotten: computed from the tensor's contents again.
        model.forget_condition(&cond);
        let _ = cond.g_mul_scalar_(2.0);
        assert!(
            same(&run(&model, &cond), &run(&model, &t["controlnet_cond"])),
            "{order}"
        );
    }
}

/// The pipeline embeds each control image once per image, not once per step: the convolutions
/// an extra step calls (libtorch's profiler) are the UNet's and a ControlNet forward's with its
/// image remembered — the conditioning embedding's are not among them.
#[test]
fn the_pipeline_embeds_a_control_image_once_per_image() {
    let fixture = fixture();
    let (pipeline, a, b) = pipeline(&fixture);
    let ids = |name: &str| if name == "controlnet-a" { a } else { b };
    let mut request = request(
        &fixture,
        &params(&fixture.join("cases/txt2img-one-euler")),
        &ids,
    );
    assert_eq!(request.controls.len(), 1);
    let count_convs =
        |ops: Vec<&ProfiledEvent>| ops.iter().filter(|op| op.name == "aten::conv2d").count();
    let convs_per_step = |request: &mut GenerateRequest| {
        let mut convs = Vec::new();
        for steps in [2, 3] {
            request.steps = steps;
            let (_, recorded) = profile::record(false, || {
                pipeline.generate(request, &mut |_, _| {}).unwrap()
            })
            .unwrap();
            convs.push(count_convs(recorded.top_level_ops()));
        }
        convs[1] - convs[0]
    };
    let with_control = convs_per_step(&mut request);
    request.controls.clear();
    let without = convs_per_step(&mut request);

    let t = module_inputs();
    let model = pipeline.controlnet(a).unwrap().model();
    let forward_convs = || {
        let (_, recorded) =
            profile::record(false, || forward_recorded(model, &t, &t["controlnet_cond"])).unwrap();
        count_convs(recorded.top_level_ops())
    };
    let fresh = forward_convs();
    model.remember_condition(&t["controlnet_cond"]);
    let remembered = forward_convs();
    model.forget_condition(&t["controlnet_cond"]);
    let levels = model
        .config()
        .conditioning_embedding_out_channels
        .as_ref()
        .unwrap()
        .len();
    // conv_in, two per level after the first, conv_out.
    assert_eq!(fresh - remembered, 2 * levels);
    assert_eq!(with_control - without, remembered);
}

#[test]
fn config_parses_and_sdxl_is_from_unet() {
    let fixture = fixture();
    let json = std::fs::read_to_string(fixture.join("controlnet-a/config.json")).unwrap();
    let config = ControlNetConfig::from_json(&json).unwrap();
    let unet_json = std::fs::read_to_string(fixture.join("model/unet/config.json")).unwrap();
    let unet = UNetConfig::from_json(&unet_json).unwrap();
    // diffusers' from_unet produced the folder's config.
    let derived = ControlNetConfig::from_unet(&unet);
    assert_eq!(derived, config);
    config.check_compatible(&unet).unwrap();
    let sdxl = ControlNetConfig::sdxl();
    assert_eq!(sdxl.cross_attention_dim, 2048);
    assert_eq!(sdxl.projection_class_embeddings_input_dim, Some(2816));
    assert_eq!(
        sdxl.conditioning_embedding_out_channels,
        Some(vec![16, 32, 96, 256])
    );
    sdxl.check_compatible(&UNetConfig::sdxl_base()).unwrap();
}

#[test]
fn every_case_matches_diffusers() {
    let fixture = fixture();
    let (pipeline, a, b) = pipeline(&fixture);
    let ids = |name: &str| match name {
        "controlnet-a" => a,
        "controlnet-b" => b,
        other => panic!("unknown net {other}"),
    };
    let mut cases: Vec<_> = std::fs::read_dir(fixture.join("cases"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    cases.sort();
    assert_eq!(
        cases.len(),
        8,
        "2 schedulers × (txt2img, img2img) × (one, two ControlNets)"
    );
    for case in cases {
        let name = case.file_name().unwrap().to_string_lossy().into_owned();
        let generated = pipeline
            .generate(&request(&fixture, &params(&case), &ids), &mut |_, _| {})
            .unwrap();
        let expected_image = image::open(case.join("result.png")).unwrap().to_rgb8();
        let expected_latents = common::read_tensors(&case.join("latents.safetensors"));
        let pixels = common::max_pixel_difference(&generated.image, &expected_image);
        let latents = common::relative_error(&generated.latents, &expected_latents["latents"]);
        eprintln!("{name}: max pixel difference {pixels}, latents relative error {latents:.2e}");
        assert!(pixels <= 3, "{name}: max pixel difference {pixels}");
        assert!(latents <= 1e-3, "{name}: latents relative error {latents}");
    }
}

#[test]
fn controls_change_the_image_and_unloading_forgets_them() {
    let fixture = fixture();
    let (mut pipeline, a, b) = pipeline(&fixture);
    let ids = |name: &str| if name == "controlnet-a" { a } else { b };
    let mut request = request(
        &fixture,
        &params(&fixture.join("cases/txt2img-one-euler")),
        &ids,
    );
    let with = pipeline.generate(&request, &mut |_, _| {}).unwrap();
    let controls = std::mem::take(&mut request.controls);
    let without = pipeline.generate(&request, &mut |_, _| {}).unwrap();
    // The fixture's residuals are strong: leaving the ControlNet out is far beyond tolerance.
    let difference = common::relative_error(&without.latents, &with.latents);
    assert!(difference > 1e-2, "ControlNet barely matters: {difference}");

    assert_eq!(pipeline.controlnet_ids(), vec![a, b]);
    assert!(pipeline.remove_controlnet(a).is_some());
    request.controls = controls;
    let error = pipeline.generate(&request, &mut |_, _| {}).unwrap_err();
    assert!(
        matches!(
            error,
            EngineError::InvalidInput {
                component: "controlnet",
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn skipping_a_controlnet_outside_its_window_is_exact() {
    // diffusers runs a ControlNet outside its window with scale 0 and adds the zeros; the engine
    // skips it. Zero residuals must leave the UNet's output bit for bit unchanged.
    let fixture = fixture();
    let dir = fixture.join("model/unet");
    let config =
        UNetConfig::from_json(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let mut vs = nn::VarStore::new(Device::Cpu);
    let unet = UNet2DConditionModel::new(vs.root(), &config).unwrap();
    vs.load(dir.join("diffusion_pytorch_model.safetensors"))
        .unwrap();
    let net = ControlNet::load(&fixture.join("controlnet-a"), Device::Cpu, DType::F32).unwrap();
    let t = common::read_tensors(&fixture.join("module.safetensors"));
    let added = AddedConditioning {
        text_embeds: &t["text_embeds"],
        time_ids: &t["time_ids"],
    };
    let zero = net
        .model()
        .forward(
            &t["sample"],
            421.0,
            &t["encoder_hidden_states"],
            &t["controlnet_cond"],
            0.0,
            Some(&added),
        )
        .unwrap();
    let residuals = ControlResiduals {
        down: &zero.down,
        mid: &zero.mid,
    };
    let with_zeros = unet
        .forward_with_control(
            &t["sample"],
            421.0,
            &t["encoder_hidden_states"],
            Some(&added),
            Some(&residuals),
        )
        .unwrap();
    let skipped = unet
        .forward(
            &t["sample"],
            421.0,
            &t["encoder_hidden_states"],
            Some(&added),
        )
        .unwrap();
    assert!(
        with_zeros.equal(&skipped),
        "zero residuals changed the output"
    );

    // diffusers' controlnet_keep over 6 steps for the windows of the two-ControlNet cases.
    let keeps = |start, end| {
        (0..6)
            .map(|i| controlnet_keep(i, 6, start, end))
            .collect::<Vec<_>>()
    };
    assert_eq!(keeps(0.0, 0.6), [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]);
    assert_eq!(keeps(0.3, 1.0), [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]);
    assert_eq!(keeps(0.0, 1.0), [1.0; 6]);
}

#[test]
fn a_controlnet_for_another_base_is_refused() {
    let fixture = fixture();
    let mut pipeline =
        SdxlPipeline::load(&fixture.join("model"), None, Device::Cpu, DType::F32).unwrap();
    let error = pipeline
        .load_controlnet(&fixture.join("controlnet-wide-text"))
        .unwrap_err();
    match &error {
        EngineError::InvalidConfig {
            component: "controlnet",
            message,
        } => assert!(
            message.contains("cross_attention_dim is 64, the base UNet's 96"),
            "{message}"
        ),
        other => panic!("expected InvalidConfig, got {other}"),
    }
    // Shuffle-style global pooling (diffusers switches to guess mode) is refused too.
    let pooled = tempfile::tempdir().unwrap();
    let source = fixture.join("controlnet-a");
    let config = std::fs::read_to_string(source.join("config.json")).unwrap();
    let config = config.replace(
        "\"global_pool_conditions\": false",
        "\"global_pool_conditions\": true",
    );
    std::fs::write(pooled.path().join("config.json"), config).unwrap();
    std::fs::copy(
        source.join("diffusion_pytorch_model.safetensors"),
        pooled.path().join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let error = pipeline.load_controlnet(pooled.path()).unwrap_err();
    assert!(
        matches!(&error, EngineError::InvalidConfig { component: "controlnet", message }
            if message.contains("global_pool_conditions")),
        "{error}"
    );
    assert!(pipeline.controlnet_ids().is_empty());
    // Not a ControlNet folder at all.
    let error = pipeline
        .load_controlnet(&fixture.join("controls"))
        .unwrap_err();
    assert!(matches!(error, EngineError::Model(_)), "{error}");
}

#[test]
fn bad_control_inputs_are_typed_errors() {
    let fixture = fixture();
    let (pipeline, a, _) = pipeline(&fixture);
    let edges = |size: &str| {
        image::open(fixture.join(format!("controls/edges-{size}.png")))
            .unwrap()
            .to_rgb8()
    };
    let base = GenerateRequest {
        prompt: "a fox".to_owned(),
        width: 64,
        height: 64,
        steps: 2,
        ..GenerateRequest::default()
    };
    let failing = |controls: Vec<ControlInput>, init: Option<InitImage>| {
        let request = GenerateRequest {
            controls,
            init,
            ..base.clone()
        };
        let error = pipeline.generate(&request, &mut |_, _| {}).unwrap_err();
        match error {
            EngineError::InvalidInput {
                component: "controlnet",
                message,
            } => message,
            other => panic!("expected InvalidInput, got {other}"),
        }
    };
    // txt2img at 64×64 with a 96×64 control image.
    let message = failing(vec![ControlInput::new(a, edges("96x64"))], None);
    assert!(message.contains("96×64, the output 64×64"), "{message}");
    // img2img: the init image (96×64) sets the size.
    let init = InitImage {
        image: image::open(fixture.join("init.png")).unwrap().to_rgb8(),
        strength: 0.5,
    };
    let message = failing(vec![ControlInput::new(a, edges("64x64"))], Some(init));
    assert!(message.contains("64×64, the output 96×64"), "{message}");
    for (start, end) in [(0.6, 0.6), (-0.1, 1.0), (0.0, 1.5), (0.7, 0.2)] {
        let input = ControlInput {
            guidance_start: start,
            guidance_end: end,
            ..ControlInput::new(a, edges("64x64"))
        };
        let message = failing(vec![input], None);
        assert!(message.contains("guidance window"), "{message}");
    }
    let input = ControlInput {
        conditioning_scale: f64::NAN,
        ..ControlInput::new(a, edges("64x64"))
    };
    assert!(failing(vec![input], None).contains("not finite"));
}

#[test]
fn the_command_takes_controlnets() {
    let fixture = fixture();
    let case = fixture.join("cases/txt2img-two-euler-a");
    let params = params(&case);
    let out = tempfile::tempdir().unwrap();
    let mut command = common::sdxl_command(&fixture, &params, &out.path().join("out.png"));
    command.args([
        "--save-latents".as_ref(),
        out.path().join("latents.safetensors").as_os_str(),
    ]);
    for c in &params.controls {
        let value = format!(
            "{}:{}:{}:{}:{}",
            fixture.join(&c.net).display(),
            fixture.join("controls").join(&c.image).display(),
            c.scale,
            c.start,
            c.end
        );
        command.args(["--controlnet", &value]);
    }
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let image = image::open(out.path().join("out.png")).unwrap().to_rgb8();
    let expected = image::open(case.join("result.png")).unwrap().to_rgb8();
    assert!(common::max_pixel_difference(&image, &expected) <= 3);
    let latents = common::read_tensors(&out.path().join("latents.safetensors"));
    let expected_latents = common::read_tensors(&case.join("latents.safetensors"));
    assert!(common::relative_error(&latents["latents"], &expected_latents["latents"]) <= 1e-3);
}

/// The per-step cost a ControlNet adds, on the tiny model (prints the figure BENCHMARKS.md
/// quotes). Times whole denoising loops (20 steps, 64×64, CFG) with and without one ControlNet,
/// best of 3 each, single-threaded libtorch on the CPU. Ignored by default (it sets libtorch's
/// process-wide thread count); run it alone:
/// `cargo test -p darkroom-inference --test controlnet -- --ignored controlnet_overhead_per_step --nocapture`.
#[test]
#[ignore = "timing; run on demand"]
fn controlnet_overhead_per_step() {
    let fixture = fixture();
    let (pipeline, a, _) = pipeline(&fixture);
    tch::set_num_threads(1);
    let edges = image::open(fixture.join("controls/edges-64x64.png"))
        .unwrap()
        .to_rgb8();
    let plain = GenerateRequest {
        prompt: "a fox".to_owned(),
        width: 64,
        height: 64,
        steps: 20,
        ..GenerateRequest::default()
    };
    let controlled = GenerateRequest {
        controls: vec![ControlInput::new(a, edges)],
        ..plain.clone()
    };
    let per_step = |request: &GenerateRequest| {
        (0..3)
            .map(|_| {
                let generated = pipeline.generate(request, &mut |_, _| {}).unwrap();
                generated.timings.denoise.as_secs_f64() / generated.timings.steps as f64
            })
            .fold(f64::INFINITY, f64::min)
    };
    let unet = per_step(&plain);
    let with_control = per_step(&controlled);
    eprintln!(
        "tiny SDXL, 64×64, CFG, CPU 1 thread: UNet step {:.2} ms, with 1 ControlNet {:.2} ms \
         (+{:.2} ms, +{:.0}%)",
        unet * 1e3,
        with_control * 1e3,
        (with_control - unet) * 1e3,
        (with_control / unet - 1.0) * 100.0
    );
    assert!(with_control > unet);
}
