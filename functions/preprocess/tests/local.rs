//! `darkroom-preprocess local`: the binary on a fixture, its files and JSON, and its exit
//! status and error JSON on a rejected upload.
#![allow(clippy::unwrap_used)]

use std::io::Cursor;
use std::path::Path;
use std::process::{Command, Output};

use darkroom_events::{InferenceJob, JobId};
use image::{ImageFormat, Rgb, RgbImage};
use md5::{Digest, Md5};

fn preprocess(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_darkroom-preprocess"))
        .args(args)
        // Only what the test sets: local-dev/env.sh exports DARKROOM_* variables.
        .env_clear()
        .env("DARKROOM_BUCKET", "photos")
        .output()
        .unwrap()
}

fn jpeg(width: u32, height: u32) -> Vec<u8> {
    let image = RgbImage::from_fn(width, height, |x, y| {
        let v = if (x / 40 + y / 40) % 2 == 0 { 230 } else { 20 };
        Rgb([v, (x % 256) as u8, (y % 256) as u8])
    });
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, ImageFormat::Jpeg).unwrap();
    out.into_inner()
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn a_photo_becomes_the_files_and_job_the_function_would_upload() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("desk photo.jpg");
    let bytes = jpeg(1600, 1200);
    std::fs::write(&input, &bytes).unwrap();
    let out = dir.path().join("out");
    let run = preprocess(&[
        "local",
        "--input",
        input.to_str().unwrap(),
        "--preset",
        "desk-setup",
        "--out",
        out.to_str().unwrap(),
        "--subject",
        "a walnut desk",
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(
        entries(&out),
        ["control-canny.png", "input.png", "job.json"]
    );

    let job: InferenceJob =
        serde_json::from_slice(&std::fs::read(out.join("job.json")).unwrap()).unwrap();
    // The id the same bytes get as a single-part upload to the inbox.
    let etag: String = Md5::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let expected = JobId::for_object("photos", "inbox/desk-setup/desk photo.jpg", &etag);
    assert_eq!(job.job_id, expected);
    assert_eq!(job.source.size, Some(bytes.len() as u64));
    assert_eq!(job.preset, "desk-setup");
    assert_eq!(job.init_image_key, format!("work/{expected}/input.png"));
    assert_eq!(job.control_images.len(), 1);
    assert_eq!(
        job.control_images[0].key,
        format!("work/{expected}/control-canny.png")
    );
    // 4:3 → the SDXL bucket 1152×896.
    assert_eq!((job.width, job.height), (1152, 896));
    assert!(
        job.render.prompt.contains("a walnut desk"),
        "{}",
        job.render.prompt
    );
    assert_eq!(job.render.steps, 30);

    for name in ["input.png", "control-canny.png"] {
        let png = std::fs::read(out.join(name)).unwrap();
        assert_eq!(
            darkroom_test_support::png_chunks(&png),
            ["IHDR", "IDAT", "IEND"],
            "{name}"
        );
        let image = image::load_from_memory(&png).unwrap();
        assert_eq!((image.width(), image.height()), (1152, 896), "{name}");
    }
    // The canny map is edges: black and white only, and some of each.
    let canny = image::open(out.join("control-canny.png"))
        .unwrap()
        .to_rgb8();
    assert!(canny.pixels().all(|p| p.0 == [0; 3] || p.0 == [255; 3]));
    assert!(canny.pixels().any(|p| p.0 == [255; 3]));
    assert!(canny.pixels().any(|p| p.0 == [0; 3]));
}

fn rejection(input_bytes: &[u8], file_name: &str, preset: &str) -> (Output, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join(file_name);
    std::fs::write(&input, input_bytes).unwrap();
    let out = dir.path().join("out");
    let run = preprocess(&[
        "local",
        "--input",
        input.to_str().unwrap(),
        "--preset",
        preset,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(entries(&out).is_empty(), "nothing is written on rejection");
    let json = serde_json::from_slice(&run.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?}", run.stdout));
    (run, json)
}

#[test]
fn an_svg_named_jpg_exits_non_zero_with_the_error_json() {
    let svg = br#"<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><script>alert(1)</script></svg>"#;
    let (run, json) = rejection(svg, "photo.jpg", "desk-setup");
    assert_eq!(run.status.code(), Some(2));
    assert_eq!(json["reason"], "unsupported_format");
    assert!(json["message"].as_str().unwrap().contains("svg"), "{json}");
}

#[test]
fn an_unknown_preset_exits_non_zero_with_the_error_json() {
    let (run, json) = rejection(&jpeg(64, 64), "photo.jpg", "no-such-preset");
    assert_eq!(run.status.code(), Some(2));
    assert_eq!(json["reason"], "unknown_preset");
    assert!(
        json["message"].as_str().unwrap().contains("profile-warm"),
        "lists the known presets: {json}"
    );
}
