//! LoRA and ControlNet together against diffusers (reference/combined.py): the profile preset's
//! shape (img2img 0.6 + one ControlNet + one LoRA) and everything at once (two LoRAs at different
//! weights, two ControlNets with different scales and guidance windows), txt2img and img2img.
//! Tolerances: max pixel difference ≤ 3/255, latents relative error ≤ 1e-3.
#![allow(clippy::unwrap_used)]

mod common;

use common::CaseParams as Params;

use std::collections::HashMap;
use std::path::Path;

use darkroom_inference::device::DType;
use darkroom_inference::kernels::is_channels_last;
use darkroom_inference::loader::Component;
use darkroom_inference::pipeline::{ControlInput, GenerateRequest, InitImage, SdxlPipeline};
use tch::Device;

fn render(
    pipeline: &mut SdxlPipeline,
    fixture: &Path,
    case: &str,
    nets: &HashMap<String, darkroom_inference::pipeline::ControlNetId>,
) -> (image::RgbImage, tch::Tensor) {
    let dir = fixture.join("cases").join(case);
    let params = Params::read(&dir);
    let loras: Vec<_> = params
        .loras
        .iter()
        .map(|(file, _)| {
            pipeline
                .load_lora(&fixture.join("loras").join(file))
                .unwrap()
        })
        .collect();
    let set: Vec<_> = loras
        .iter()
        .zip(&params.loras)
        .map(|(l, (_, w))| (l, *w))
        .collect();
    pipeline.set_loras(&set).unwrap();
    let controls = params
        .controls
        .iter()
        .map(|c| ControlInput {
            conditioning_scale: c.scale,
            guidance_start: c.start,
            guidance_end: c.end,
            ..ControlInput::new(
                nets[&c.net],
                image::open(fixture.join("controls").join(&c.image))
                    .unwrap()
                    .to_rgb8(),
            )
        })
        .collect();
    let request = GenerateRequest {
        prompt: params.prompt,
        negative_prompt: Some(params.negative_prompt),
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
        controls,
    };
    let generated = pipeline.generate(&request, &mut |_, _| {}).unwrap();
    (generated.image, generated.latents)
}

#[test]
fn loras_and_controlnets_together_match_diffusers() {
    let fixture = common::fixture("combined", &[]);
    let mut pipeline =
        SdxlPipeline::load(&fixture.join("model"), None, Device::Cpu, DType::F32).unwrap();
    let mut nets = HashMap::new();
    for name in ["controlnet-a", "controlnet-b"] {
        nets.insert(
            name.to_owned(),
            pipeline.load_controlnet(&fixture.join(name)).unwrap(),
        );
    }
    // One pipeline for every case: each switches the LoRA set, as the service does.
    for case in [
        "profile-img2img",
        "all-txt2img",
        "all-img2img",
        "profile-img2img",
    ] {
        assert_matches_diffusers(&mut pipeline, &fixture, case, &nets);
    }
}

/// Renders `case` and checks it against diffusers' image and latents (the tolerances above).
fn assert_matches_diffusers(
    pipeline: &mut SdxlPipeline,
    fixture: &Path,
    case: &str,
    nets: &HashMap<String, darkroom_inference::pipeline::ControlNetId>,
) {
    let (image, latents) = render(pipeline, fixture, case, nets);
    let dir = fixture.join("cases").join(case);
    let expected = image::open(dir.join("result.png")).unwrap().to_rgb8();
    let expected_latents = common::read_tensors(&dir.join("latents.safetensors"));
    let pixels = common::max_pixel_difference(&image, &expected);
    let error = common::relative_error(&latents, &expected_latents["latents"]);
    eprintln!("{case}: max pixel difference {pixels}, latents relative error {error:.2e}");
    assert!(pixels <= 3, "{case}: max pixel difference {pixels}");
    assert!(error <= 1e-3, "{case}: latents relative error {error}");
}

/// The same with the UNet's, the VAE's and the ControlNets' convolution weights stored
/// channels-last (the GPU layout option), one ControlNet loaded before the switch and one after:
/// img2img, so the VAE encodes and decodes channels-last.
#[test]
fn with_channels_last_weights_loras_and_controlnets_still_match_diffusers() {
    let fixture = common::fixture("combined", &[]);
    let mut pipeline =
        SdxlPipeline::load(&fixture.join("model"), None, Device::Cpu, DType::F32).unwrap();
    let mut nets = HashMap::new();
    let mut load = |pipeline: &mut SdxlPipeline, name: &str| {
        let id = pipeline.load_controlnet(&fixture.join(name)).unwrap();
        nets.insert(name.to_owned(), id);
    };
    load(&mut pipeline, "controlnet-a");
    pipeline.set_channels_last(true);
    load(&mut pipeline, "controlnet-b");
    let stores = [
        ("unet", pipeline.var_store(Component::Unet).unwrap()),
        ("vae", pipeline.var_store(Component::Vae).unwrap()),
        (
            "controlnet-a",
            pipeline
                .controlnet(nets["controlnet-a"])
                .unwrap()
                .var_store(),
        ),
        (
            "controlnet-b",
            pipeline
                .controlnet(nets["controlnet-b"])
                .unwrap()
                .var_store(),
        ),
    ];
    for (name, vs) in stores {
        let convs: Vec<_> = vs
            .variables()
            .into_values()
            .filter(|v| v.dim() == 4)
            .collect();
        assert!(!convs.is_empty());
        assert!(convs.iter().all(is_channels_last), "{name}");
    }
    assert_matches_diffusers(&mut pipeline, &fixture, "all-img2img", &nets);
}
