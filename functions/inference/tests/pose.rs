//! The pose estimator against the annotator OpenPose ControlNets were trained with
//! (`controlnet_aux`'s `Body` and `draw_bodypose`), on the random-weight body model and the
//! synthetic maps `reference/pose.py` writes (CPU, f32):
//!
//! - the network: relative error ≤ 1e-4;
//! - the parse of the same maps into people: the same candidates (positions exact, scores
//!   1e-6) and the same people (parts exact, total scores 1e-9);
//! - the drawing: at most 1 % of the pixels differ from OpenCV's;
//! - a photo's maps (the network's stride-8 maps upsampled with OpenCV's Lanczos-4): relative
//!   error ≤ 1e-4.
#![allow(clippy::unwrap_used)]

mod common;

use darkroom_inference::EngineError;
use darkroom_inference::device::DType;
use darkroom_inference::loader::ModelError;
use darkroom_inference::pose::draw::{Keypoints, draw_people};
use darkroom_inference::pose::skeleton::{self, PARTS, PartMaps};
use darkroom_inference::pose::{PoseEstimator, WEIGHTS_FILE};
use tch::{Device, Kind, Tensor};

fn estimator() -> (PoseEstimator, std::collections::HashMap<String, Tensor>) {
    let dir = common::fixture("pose", &[]);
    let estimator = PoseEstimator::load(&dir, Device::Cpu, DType::F32).unwrap();
    let mut tensors = common::read_tensors(&dir.join("reference.safetensors"));
    tensors.extend(common::read_tensors(&dir.join("people.safetensors")));
    (estimator, tensors)
}

/// `[H, W, C]` → row-major planes, one per channel.
fn planes(maps: &Tensor) -> Vec<Vec<f32>> {
    let channels = maps.size()[2];
    (0..channels)
        .map(|c| Vec::<f32>::try_from(maps.select(2, c).contiguous().flatten(0, -1)).unwrap())
        .collect()
}

fn image(tensor: &Tensor) -> image::RgbImage {
    let (height, width, _) = tensor.size3().unwrap();
    let bytes = Vec::<u8>::try_from(tensor.flatten(0, -1)).unwrap();
    image::RgbImage::from_raw(width as u32, height as u32, bytes).unwrap()
}

#[test]
fn the_network_matches_the_annotators() {
    let (estimator, t) = estimator();
    let (fields, heatmaps) = estimator.network().forward(&t["network.input"]);
    for (name, actual) in [("paf", fields), ("heatmap", heatmaps)] {
        let error = common::relative_error(&actual, &t[&format!("network.{name}")]);
        println!("{name}: relative error {error:.3e}");
        assert!(error <= 1e-4, "{name}: relative error {error:e}");
    }
}

#[test]
fn the_same_maps_give_the_same_people() {
    let (_, t) = estimator();
    let heatmap = &t["maps.heatmap"];
    let (height, width, _) = heatmap.size3().unwrap();
    let maps = PartMaps {
        width: width as usize,
        height: height as usize,
        heatmaps: planes(heatmap),
        fields: planes(&t["maps.paf"]),
    };
    let (candidates, people) = skeleton::parse(&maps);

    let expected = t["maps.candidate"].to_kind(Kind::Double);
    assert_eq!(
        candidates.len() as i64,
        expected.size()[0],
        "candidate count"
    );
    for (i, peak) in candidates.iter().enumerate() {
        let row = expected.get(i as i64);
        let value = |k: i64| row.double_value(&[k]);
        assert_eq!(
            (peak.x as f64, peak.y as f64),
            (value(0), value(1)),
            "candidate {i}"
        );
        assert!((peak.score - value(2)).abs() < 1e-6, "candidate {i} score");
        assert_eq!(i as f64, value(3), "candidate {i} id");
    }

    let expected = t["maps.subset"].to_kind(Kind::Double);
    assert_eq!(people.len() as i64, expected.size()[0], "people");
    assert!(people.len() >= 2, "the scene has two whole people");
    for (p, person) in people.iter().enumerate() {
        let row = expected.get(p as i64);
        for (part, index) in person.parts.iter().enumerate() {
            let want = row.double_value(&[part as i64]);
            assert_eq!(
                index.map_or(-1.0, |i| i as f64),
                want,
                "person {p} part {part}"
            );
        }
        let (score, count) = (row.double_value(&[18]), row.double_value(&[19]));
        assert!(
            (person.score - score).abs() < 1e-9,
            "person {p}: {} vs {score}",
            person.score
        );
        assert_eq!(person.part_count as f64, count, "person {p} part count");
    }

    // Drawn as the annotator draws them.
    let keypoints: Vec<Keypoints> = people
        .iter()
        .map(|person| {
            let mut keypoints: Keypoints = [None; PARTS];
            for (keypoint, part) in keypoints.iter_mut().zip(person.parts) {
                *keypoint = part.map(|i| {
                    (
                        candidates[i].x as f64 / width as f64,
                        candidates[i].y as f64 / height as f64,
                    )
                });
            }
            keypoints
        })
        .collect();
    let mut canvas = image::RgbImage::new(width as u32, height as u32);
    draw_people(&mut canvas, &keypoints);
    let expected = image(&t["maps.canvas_u8"]);
    let differing = canvas
        .pixels()
        .zip(expected.pixels())
        .filter(|(a, b)| a != b)
        .count();
    let drawn = expected.pixels().filter(|p| p.0 != [0, 0, 0]).count();
    let fraction = differing as f64 / (width * height) as f64;
    println!(
        "drawing: {differing} of {} pixels differ ({drawn} drawn)",
        width * height
    );
    assert!(drawn > 1000, "the reference drew the people");
    assert!(fraction <= 0.01, "{differing} pixels differ");
}

#[test]
fn a_photos_maps_match_the_annotators() {
    let (estimator, t) = estimator();
    let photo = image(&t["photo.image_u8"]);
    let maps = estimator.maps(&photo).unwrap();
    for (name, actual, expected) in [
        ("heatmap", &maps.heatmaps, &t["photo.heatmap"]),
        ("paf", &maps.fields, &t["photo.paf"]),
    ] {
        let expected = planes(expected);
        let (mut worst, mut range) = (0.0f32, 0.0f32);
        for (a, e) in actual.iter().zip(&expected) {
            for (x, y) in a.iter().zip(e) {
                worst = worst.max((x - y).abs());
                range = range.max(y.abs());
            }
        }
        println!("photo {name}: max difference {worst:.3e} of range {range:.4}");
        assert_eq!(actual.len(), expected.len());
        assert!(worst <= 1e-4 * range, "{name}: {worst} of {range}");
    }
}

#[test]
fn a_pose_map_has_the_photos_size() {
    let (estimator, t) = estimator();
    let photo = image(&t["photo.image_u8"]);
    let map = estimator.pose_map(&photo).unwrap();
    assert_eq!(map.dimensions(), photo.dimensions());
    let empty = image::RgbImage::new(0, 0);
    assert!(matches!(
        estimator.pose_map(&empty),
        Err(EngineError::InvalidInput { .. })
    ));
    // A strip 10:1 would need maps of 5120×512 pixels: refused before any work.
    let strip = image::RgbImage::new(1000, 100);
    assert!(matches!(
        estimator.pose_map(&strip),
        Err(EngineError::InvalidInput { .. })
    ));
}

#[test]
fn bad_weights_are_typed_errors() {
    let good = common::fixture("pose", &[]).join(WEIGHTS_FILE);
    let dir = tempfile::tempdir().unwrap();
    // No weights in the folder.
    let error = PoseEstimator::load(dir.path(), Device::Cpu, DType::F32).unwrap_err();
    assert!(matches!(error, EngineError::Model(_)), "{error}");
    // A truncated file.
    let bytes = std::fs::read(&good).unwrap();
    let truncated = dir.path().join(WEIGHTS_FILE);
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let error = PoseEstimator::load(&truncated, Device::Cpu, DType::F32).unwrap_err();
    assert!(matches!(error, EngineError::Model(_)), "{error}");
    // The published pickle, named or found in the folder: refused with the conversion.
    let pickle = dir.path().join("body_pose_model.pth");
    std::fs::write(&pickle, b"PK\x03\x04 not loaded").unwrap();
    std::fs::remove_file(&truncated).unwrap();
    for path in [pickle.as_path(), dir.path()] {
        let error = PoseEstimator::load(path, Device::Cpu, DType::F32).unwrap_err();
        let message = error.to_string();
        assert!(
            matches!(error, EngineError::InvalidConfig { .. }),
            "{error}"
        );
        assert!(message.contains("save_file(torch.load("), "{message}");
        assert!(message.contains("body_pose_model.safetensors"), "{message}");
    }
    // Another model's weights: the depth estimator's.
    let depth = common::fixture("depth", &[])
        .join("small")
        .join("model.safetensors");
    let error = PoseEstimator::load(&depth, Device::Cpu, DType::F32).unwrap_err();
    assert!(
        matches!(error, EngineError::Model(ModelError::MissingTensor { .. })),
        "{error}"
    );
}

/// `darkroom-control-map` draws both kinds from a photo file and says why it cannot.
#[test]
fn the_control_map_command_draws_pose_and_depth_maps() {
    let (_, t) = estimator();
    let dir = tempfile::tempdir().unwrap();
    let photo = dir.path().join("photo.png");
    image(&t["photo.image_u8"]).save(&photo).unwrap();
    let run = |kind: &str, model: &std::path::Path, out: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_darkroom-control-map"))
            .args(["--kind", kind, "--device", "cpu"])
            .args(["--model".as_ref(), model.as_os_str()])
            .args(["--image".as_ref(), photo.as_os_str()])
            .args(["--out".as_ref(), out.as_os_str()])
            .output()
            .unwrap()
    };
    let pose_out = dir.path().join("pose.png");
    let output = run("pose", &common::fixture("pose", &[]), &pose_out);
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout
            .lines()
            .next()
            .is_some_and(|l| l.ends_with(" people")),
        "{stdout}"
    );
    let map = image::open(&pose_out).unwrap();
    assert_eq!((map.width(), map.height()), (136, 184));

    let depth_out = dir.path().join("depth.png");
    let depth_model = common::fixture("depth", &[]).join("small");
    let output = run("depth", &depth_model, &depth_out);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(image::open(&depth_out).unwrap().width(), 136);

    // The wrong kind of model for the map: an error naming the file, no output.
    let wrong = dir.path().join("wrong.png");
    let output = run("pose", &depth_model.join("model.safetensors"), &wrong);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("model.safetensors"), "{stderr}");
    assert!(!wrong.exists());
}
