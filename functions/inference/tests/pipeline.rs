//! Whole pipelines against diffusers on a tiny random SDXL (reference/pipeline.py): every
//! scheduler, txt2img square and non-square, img2img at two strengths; the same seed must give
//! the same image. Tolerances: max pixel difference ≤ 3/255, latents relative error ≤ 1e-3.
#![allow(clippy::unwrap_used)]

mod common;

use common::CaseParams as Params;

use std::path::Path;
use std::process::Command;

use darkroom_inference::device::DType;
use darkroom_inference::pipeline::{GenerateRequest, InitImage, SdxlPipeline};
use tch::Device;

fn request(case: &Path, init: &Path) -> GenerateRequest {
    let params = Params::read(case);
    GenerateRequest {
        prompt: params.prompt,
        negative_prompt: Some(params.negative_prompt),
        width: params.width,
        height: params.height,
        steps: params.steps,
        guidance: params.guidance,
        seed: params.seed,
        scheduler: params.scheduler.parse().unwrap(),
        init: params.strength.map(|strength| InitImage {
            image: image::open(init).unwrap().to_rgb8(),
            strength,
        }),
        controls: Vec::new(),
    }
}

#[test]
fn every_scheduler_matches_diffusers_in_txt2img_and_img2img() {
    let fixture = common::fixture("pipeline", &[]);
    let pipeline =
        SdxlPipeline::load(&fixture.join("model"), None, Device::Cpu, DType::F32).unwrap();
    let mut cases: Vec<_> = std::fs::read_dir(fixture.join("cases"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    cases.sort();
    assert_eq!(cases.len(), 16, "4 schedulers × (2 txt2img + 2 img2img)");
    for case in cases {
        let name = case.file_name().unwrap().to_string_lossy().into_owned();
        let generated = pipeline
            .generate(&request(&case, &fixture.join("init.png")), &mut |_, _| {})
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
fn a_single_file_checkpoint_renders_the_image_its_folder_does() {
    let fixture = common::fixture("single_file", &[]);
    let folder = fixture.join("diffusers");
    let request = GenerateRequest {
        prompt: "a storybook fox".to_owned(),
        width: 64,
        height: 64,
        steps: 3,
        seed: 3,
        ..GenerateRequest::default()
    };
    let from_folder = SdxlPipeline::load(&folder, None, Device::Cpu, DType::F32)
        .unwrap()
        .generate(&request, &mut |_, _| {})
        .unwrap();
    let from_file = SdxlPipeline::load(
        &fixture.join("sdxl_tiny.safetensors"),
        Some(&folder),
        Device::Cpu,
        DType::F32,
    )
    .unwrap()
    .generate(&request, &mut |_, _| {})
    .unwrap();
    assert_eq!(
        common::max_pixel_difference(&from_folder.image, &from_file.image),
        0
    );
    assert_eq!(
        common::relative_error(&from_file.latents, &from_folder.latents),
        0.0
    );
}

#[test]
fn the_command_renders_what_diffusers_renders() {
    let fixture = common::fixture("pipeline", &[]);
    let case = fixture.join("cases/img2img-euler-a-0.7");
    let params = request(&case, &fixture.join("init.png"));
    let out = tempfile::tempdir().unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_darkroom-sdxl"))
        .args(["--model".as_ref(), fixture.join("model").as_os_str()])
        .args(["--prompt", &params.prompt])
        .args([
            "--negative-prompt",
            params.negative_prompt.as_deref().unwrap(),
        ])
        .args([
            "--init-image".as_ref(),
            fixture.join("init.png").as_os_str(),
        ])
        .args([
            "--strength",
            "0.7",
            "--steps",
            "6",
            "--guidance",
            "5",
            "--seed",
            "42",
        ])
        .args(["--scheduler", "euler-a", "--device", "cpu"])
        .args(["--out".as_ref(), out.path().join("out.png").as_os_str()])
        .args([
            "--save-latents".as_ref(),
            out.path().join("latents.safetensors").as_os_str(),
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let image = image::open(out.path().join("out.png")).unwrap().to_rgb8();
    let expected = image::open(case.join("result.png")).unwrap().to_rgb8();
    assert!(common::max_pixel_difference(&image, &expected) <= 3);
    let latents = common::read_tensors(&out.path().join("latents.safetensors"));
    let expected_latents = common::read_tensors(&case.join("latents.safetensors"));
    assert!(common::relative_error(&latents["latents"], &expected_latents["latents"]) <= 1e-3);
}

#[test]
fn a_missing_model_is_a_typed_error() {
    let error = SdxlPipeline::load(
        Path::new("/nonexistent/model"),
        None,
        Device::Cpu,
        DType::F32,
    )
    .err()
    .unwrap();
    assert!(
        matches!(error, darkroom_inference::EngineError::Model(_)),
        "{error}"
    );
}

#[test]
fn a_generation_stops_between_steps_when_asked() {
    let fixture = common::fixture("pipeline", &[]);
    let pipeline =
        SdxlPipeline::load(&fixture.join("model"), None, Device::Cpu, DType::F32).unwrap();
    let request = GenerateRequest {
        prompt: "a lighthouse".to_owned(),
        width: 64,
        height: 64,
        steps: 5,
        ..GenerateRequest::default()
    };
    let mut seen = Vec::new();
    let error = pipeline
        .generate_until(&request, &mut |done, total| {
            seen.push((done, total));
            if done == 2 {
                std::ops::ControlFlow::Break(())
            } else {
                std::ops::ControlFlow::Continue(())
            }
        })
        .unwrap_err();
    assert!(
        matches!(
            error,
            darkroom_inference::EngineError::Stopped { step: 2, steps: 5 }
        ),
        "{error}"
    );
    assert_eq!(seen, [(1, 5), (2, 5)]);
    // The pipeline serves the next request as if nothing happened.
    let mut steps = 0;
    pipeline.generate(&request, &mut |_, _| steps += 1).unwrap();
    assert_eq!(steps, 5);
}

/// `darkroom-bench`, the instrument behind BENCHMARKS.md, runs end to end on a model folder:
/// the table, the phases outside the steps, the JSON, and `--kernel-profile` (libtorch's
/// profiler; on the CPU the operations the pipeline called, convolutions among them).
#[test]
fn the_bench_command_times_and_profiles_a_model() {
    let fixture = common::fixture("pipeline", &[]);
    let out = tempfile::tempdir().unwrap();
    let json = out.path().join("bench.json");
    let output = Command::new(env!("CARGO_BIN_EXE_darkroom-bench"))
        .args(["--model".as_ref(), fixture.join("model").as_os_str()])
        .args([
            "--device", "cpu", "--steps", "2", "--width", "64", "--height", "64",
        ])
        .args(["--runs", "2", "--no-diffusers", "--kernel-profile"])
        .args(["--json".as_ref(), json.as_os_str()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for expected in [
        "| Darkroom  |",
        "Darkroom outside the steps, mean per image: prompt",
        "#### Where one image's time goes: stock kernels",
        "operations called by the pipeline (top level)",
        "| aten::conv2d |",
    ] {
        assert!(stdout.contains(expected), "{expected:?} missing:\n{stdout}");
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let darkroom = &report["darkroom"];
    assert_eq!(darkroom["seconds"].as_array().unwrap().len(), 2);
    assert_eq!(darkroom["phases_s"].as_array().unwrap().len(), 2);
    assert_eq!(darkroom["steps"], 2);
}
