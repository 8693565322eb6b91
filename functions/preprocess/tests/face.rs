//! Face detection and portrait framing on real photos that ship in packages:
//!
//! - scikit-image's `astronaut.png` (Eileen Collins' NASA portrait, public domain),
//!   read from the wheel in the project venv by `tests/face_fixtures.py` (with Pillow
//!   it also writes an EXIF-rotated and a 4× enlarged JPEG);
//! - the `rustface` crate's `test.png` (the 1927 Solvay conference group photo, with
//!   the crate demo's red boxes drawn on it) and `jpeg-decoder`'s bench photos
//!   (`tower.jpg`, `large_image.jpg`: the Eiffel tower, a hibiscus flower; no faces),
//!   found in the cargo registry through `cargo metadata`.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

use darkroom_events::FailureReason;
use darkroom_preprocess::{
    Bucket, CannyOptions, FaceBox, FaceDetector, FaceOptions, Limits, PORTRAIT_BUCKET,
    PrepareOptions, Prepared, PreprocessError, SourceFormat, prepare,
};

/// Where the photos from scikit-image were written (once per test binary).
fn astronaut_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/face_fixtures.py");
        darkroom_test_support::run_script(&script, [dir.path()]);
        dir
    })
    .path()
}

fn astronaut(name: &str) -> Vec<u8> {
    std::fs::read(astronaut_dir().join(name)).unwrap()
}

/// A file inside a dependency's package, located with `cargo metadata`.
fn package_file(package: &str, file: &str) -> Vec<u8> {
    static METADATA: OnceLock<serde_json::Value> = OnceLock::new();
    let metadata = METADATA.get_or_init(|| {
        let out = Command::new(env!("CARGO"))
            .args(["metadata", "--format-version", "1"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("run cargo metadata");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    });
    let manifest = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == package)
        .unwrap_or_else(|| panic!("{package} is not in the dependency graph"))["manifest_path"]
        .as_str()
        .unwrap();
    let path = Path::new(manifest).parent().unwrap().join(file);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn solvay() -> Vec<u8> {
    package_file("rustface", "test.png")
}

fn face_options(head_ratio: f64) -> PrepareOptions {
    PrepareOptions {
        face: Some(FaceOptions {
            head_ratio,
            ..FaceOptions::default()
        }),
        ..PrepareOptions::default()
    }
}

fn detector() -> FaceDetector {
    FaceDetector::new(Default::default()).unwrap()
}

/// The face in `astronaut.png`, checked by eye on a crop with the box drawn: the box
/// runs from the hairline to the chin and between the ears. Landmarks read off the
/// same crop: eyes at about (202, 100) and (245, 100), mouth at (222, 145), chin
/// bottom near y = 160.
fn assert_astronaut_face(face: &FaceBox, scale: f64) {
    let s = |v: f64| v * scale;
    let (cx, cy) = face.centre();
    assert!(
        (cx - s(224.0)).abs() <= s(8.0) && (cy - s(115.0)).abs() <= s(8.0),
        "face centre ({cx}, {cy}) is not near ({}, {}): {face:?}",
        s(224.0),
        s(115.0)
    );
    assert!(
        (s(80.0)..=s(115.0)).contains(&face.height),
        "face height {} is not {}–{}: {face:?}",
        face.height,
        s(80.0),
        s(115.0)
    );
    for (x, y) in [
        (202.0, 100.0),
        (245.0, 100.0),
        (222.0, 145.0),
        (224.0, 158.0),
    ] {
        let (x, y) = (s(x), s(y));
        assert!(
            face.x <= x && x <= face.x + face.width && face.y <= y && y <= face.y + face.height,
            "({x}, {y}) is outside {face:?}"
        );
    }
}

/// Re-detects on the output and checks the face sits where the framing put it.
fn assert_framed(prepared: &Prepared, head_ratio: f64) {
    let Bucket { width, height } = prepared.bucket;
    assert_eq!(prepared.bucket, PORTRAIT_BUCKET);
    assert_eq!(prepared.image.dimensions(), (width, height));
    let framing = prepared.face.as_ref().unwrap().framing.unwrap();
    assert!(!framing.shrunk && !framing.shifted, "{framing:?}");
    let faces = detector().detect(&prepared.image).unwrap();
    assert_eq!(faces.len(), 1, "{faces:?}");
    let (cx, cy) = faces[0].centre();
    let (fx, fy) = (cx / f64::from(width), cy / f64::from(height));
    let ratio = faces[0].height / f64::from(height);
    eprintln!("re-detected: centre ({fx:.3}, {fy:.3}) of the output, height {ratio:.3}");
    // The detector's boxes move by a few % between pyramid levels.
    assert!(
        (fx - 0.5).abs() <= 0.03,
        "centre x {fx:.3} is not 0.5 ± 0.03"
    );
    assert!(
        (fy - 0.4).abs() <= 0.03,
        "centre y {fy:.3} is not 0.4 ± 0.03"
    );
    assert!(
        (ratio - head_ratio).abs() <= 0.15 * head_ratio,
        "face height ratio {ratio:.3} is not {head_ratio} ± 15 %"
    );
}

#[test]
fn astronaut_face_is_found_where_it_is() {
    let image = image::load_from_memory(&astronaut("astronaut.png"))
        .unwrap()
        .into_rgb8();
    let faces = detector().detect(&image).unwrap();
    assert_eq!(faces.len(), 1, "{faces:?}");
    eprintln!("astronaut: {:?}", faces[0]);
    assert_astronaut_face(&faces[0], 1.0);
}

#[test]
fn portrait_is_framed_around_the_face_with_canny_on_the_output() {
    let mut options = face_options(0.4);
    options.canny = Some(CannyOptions::default());
    let prepared = prepare(&astronaut("astronaut.png"), &options).unwrap();
    let report = prepared.face.as_ref().unwrap();
    assert_eq!(report.faces.len(), 1);
    assert_astronaut_face(&report.faces[0], 1.0);
    let framing = report.framing.unwrap();
    assert_eq!(framing.face, report.faces[0]);
    assert!((framing.head_ratio - 0.4).abs() < 1e-9);
    // A 96-px face at 40 % of 1152: enlarged about 4.8×, and said so.
    assert!(framing.scale > 4.0, "{framing:?}");
    assert_framed(&prepared, 0.4);
    let canny = prepared.canny.as_ref().unwrap();
    assert_eq!(
        canny.as_raw(),
        darkroom_preprocess::canny::canny(&prepared.image, &CannyOptions::default()).as_raw(),
        "the control map is computed on the framed output"
    );
}

#[test]
fn exif_rotated_upload_is_detected_upright() {
    let prepared = prepare(&astronaut("astronaut_orient6.jpg"), &face_options(0.35)).unwrap();
    assert_eq!(
        (prepared.original_width, prepared.original_height),
        (512, 512)
    );
    assert_eq!(
        prepared.orientation,
        darkroom_preprocess::Orientation::Rotate90
    );
    let report = prepared.face.as_ref().unwrap();
    assert_eq!(report.faces.len(), 1, "{:?}", report.faces);
    // In upright coordinates, where the PNG has it.
    assert_astronaut_face(&report.faces[0], 1.0);
    assert_framed(&prepared, 0.35);
}

#[test]
fn large_jpeg_detects_at_reduced_scale_and_frames_at_full() {
    let bytes = astronaut("astronaut_x4.jpg");
    let prepared = prepare(&bytes, &face_options(0.4)).unwrap();
    let report = prepared.face.as_ref().unwrap();
    assert_eq!(report.faces.len(), 1, "{:?}", report.faces);
    // Found on the half-scale decode, reported in the 2048×2048 original's pixels.
    assert_astronaut_face(&report.faces[0], 4.0);
    assert_framed(&prepared, 0.4);
    // The crop (960 px high for a 1152-px output) needs more than the half-scale
    // decode, so the JPEG was decoded again in full: the output is exactly the crop
    // rendered from a full decode.
    let framing = report.framing.unwrap();
    let full = darkroom_preprocess::decode::open(&bytes, SourceFormat::Jpeg, &Limits::default())
        .unwrap()
        .decode(None)
        .unwrap();
    let expected = darkroom_preprocess::frame::render(&full, framing.crop, 896, 1152).unwrap();
    assert_eq!(prepared.image.as_raw(), expected.as_raw());
    // Detection on the full decode (DCT scaling off) finds the same face, give or
    // take a pyramid level (the box sizes step by a few %).
    let unscaled = prepare(
        &bytes,
        &PrepareOptions {
            disable_dct_scaling: true,
            ..face_options(0.4)
        },
    )
    .unwrap();
    let a = report.faces[0];
    let b = unscaled.face.as_ref().unwrap().faces[0];
    let tolerance = 0.05 * b.height;
    assert!(
        (a.centre().0 - b.centre().0).abs() < tolerance
            && (a.centre().1 - b.centre().1).abs() < tolerance
            && (a.height - b.height).abs() < tolerance,
        "{a:?} vs {b:?}"
    );
}

#[test]
fn group_photo_is_multiple_faces() {
    let err = prepare(&solvay(), &face_options(0.35)).unwrap_err();
    let PreprocessError::MultipleFaces { count } = err else {
        panic!("expected MultipleFaces, got {err:?}");
    };
    eprintln!("Solvay 1927: {count} faces");
    // 29 people; a few turned or half hidden faces score under the threshold.
    assert!((20..=29).contains(&count), "{count}");
    assert_eq!(err.reason(), FailureReason::MultipleFaces);
    assert!(err.is_permanent());
}

#[test]
fn group_photo_without_required_face_gets_the_plain_crop() {
    let bytes = solvay();
    let options = PrepareOptions {
        face: Some(FaceOptions {
            required: false,
            ..FaceOptions::default()
        }),
        ..PrepareOptions::default()
    };
    let prepared = prepare(&bytes, &options).unwrap();
    let report = prepared.face.as_ref().unwrap();
    assert!(report.faces.len() >= 20, "{}", report.faces.len());
    assert!(report.framing.is_none());
    let plain = prepare(&bytes, &PrepareOptions::default()).unwrap();
    assert_eq!(prepared.bucket, plain.bucket);
    assert_eq!(prepared.image.as_raw(), plain.image.as_raw());
}

#[test]
fn photos_without_faces_are_no_face() {
    let gradient = {
        let image = image::RgbImage::from_fn(800, 600, |x, y| {
            image::Rgb([(x / 4) as u8, (y / 3) as u8, ((x + y) / 8) as u8])
        });
        darkroom_preprocess::encode_png(&image)
    };
    for (name, bytes) in [
        (
            "tower.jpg",
            package_file("jpeg-decoder", "benches/tower.jpg"),
        ),
        (
            "large_image.jpg",
            package_file("jpeg-decoder", "benches/large_image.jpg"),
        ),
        ("gradient", gradient),
    ] {
        let err = prepare(&bytes, &face_options(0.35)).unwrap_err();
        assert_eq!(err, PreprocessError::NoFace, "{name}");
        assert_eq!(err.reason(), FailureReason::NoFaceFound);
        // Not required: the plain bucket crop, with an empty report.
        let options = PrepareOptions {
            face: Some(FaceOptions {
                required: false,
                ..FaceOptions::default()
            }),
            ..PrepareOptions::default()
        };
        let prepared = prepare(&bytes, &options).unwrap();
        let report = prepared.face.unwrap();
        assert!(
            report.faces.is_empty() && report.framing.is_none(),
            "{name}"
        );
        let plain = prepare(&bytes, &PrepareOptions::default()).unwrap();
        assert_eq!(prepared.image.as_raw(), plain.image.as_raw(), "{name}");
    }
}

#[test]
fn preset_without_face_runs_no_detection() {
    // The desk-setup shape: no face options. The astronaut would be framed otherwise;
    // here nothing is reported and the output is the plain centred bucket crop.
    let bytes = astronaut("astronaut.png");
    let prepared = prepare(&bytes, &PrepareOptions::default()).unwrap();
    assert!(prepared.face.is_none());
    assert_eq!(
        prepared.bucket,
        Bucket {
            width: 1024,
            height: 1024
        }
    );
    let decoded = image::load_from_memory(&bytes).unwrap().into_rgb8();
    let expected = darkroom_preprocess::bucket::fit_to_size(&decoded, 1024, 1024).unwrap();
    assert_eq!(prepared.image.as_raw(), expected.as_raw());
}
