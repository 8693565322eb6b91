//! The canny control map against OpenCV itself (`tests/reference_canny.py`, run with
//! the venv's Python: `$VIRTUAL_ENV/bin/python`, else `python3`, with `cv2`).

use std::path::Path;

use darkroom_preprocess::canny::{CannyOptions, canny_gray, rgb_to_gray};
use image::{GrayImage, Rgb, RgbImage};

/// Deterministic xorshift, so fixtures need no `rand`.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn byte(&mut self) -> u8 {
        (self.next() >> 24) as u8
    }
}

fn fixtures() -> Vec<(&'static str, RgbImage)> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut out = Vec::new();
    out.push((
        "gradient",
        RgbImage::from_fn(320, 200, |x, y| {
            Rgb([
                (x * 255 / 319) as u8,
                (y * 255 / 199) as u8,
                ((x + y) % 256) as u8,
            ])
        }),
    ));
    out.push((
        "radial",
        RgbImage::from_fn(257, 263, |x, y| {
            let (dx, dy) = (x as f64 - 128.0, y as f64 - 131.0);
            let r = (dx * dx + dy * dy).sqrt();
            let v = (128.0 + 127.0 * (r / 2.5).sin()) as u8;
            Rgb([v, v, v / 2])
        }),
    ));
    out.push((
        "shapes",
        RgbImage::from_fn(400, 300, |x, y| {
            let (fx, fy) = (x as f64, y as f64);
            let circle = (fx - 120.0).powi(2) + (fy - 140.0).powi(2) < 80.0f64.powi(2);
            let rect = (220..360).contains(&x) && (40..200).contains(&y);
            let line = ((fx * 0.37 - fy + 180.0).abs()) < 2.0;
            let triangle = fy > 220.0 && (fx - 300.0).abs() < (fy - 220.0);
            let v = match (circle, rect, line, triangle) {
                (true, _, _, _) => [230, 40, 40],
                (_, true, _, _) => [20, 90, 200],
                (_, _, true, _) => [250, 250, 250],
                (_, _, _, true) => [120, 200, 60],
                _ => [60, 60, 60],
            };
            Rgb(v)
        }),
    ));
    out.push((
        "noise",
        RgbImage::from_fn(256, 192, |_, _| Rgb([rng.byte(), rng.byte(), rng.byte()])),
    ));
    // Smooth noise: low-contrast blobs exercise weak edges and hysteresis chains.
    let coarse: Vec<u8> = (0..(34 * 26)).map(|_| rng.byte()).collect();
    out.push((
        "blobs",
        RgbImage::from_fn(264, 200, |x, y| {
            let (gx, gy) = (x as f64 / 8.0, y as f64 / 8.0);
            let (x0, y0) = (gx.floor() as usize, gy.floor() as usize);
            let (tx, ty) = (gx.fract(), gy.fract());
            let at = |i: usize, j: usize| f64::from(coarse[j * 34 + i]);
            let v = at(x0, y0) * (1.0 - tx) * (1.0 - ty)
                + at(x0 + 1, y0) * tx * (1.0 - ty)
                + at(x0, y0 + 1) * (1.0 - tx) * ty
                + at(x0 + 1, y0 + 1) * tx * ty;
            Rgb([v as u8, (v * 0.7) as u8, 255 - v as u8])
        }),
    ));
    out.push((
        "lines",
        RgbImage::from_fn(360, 360, |x, y| {
            // Spokes at many angles hit every NMS direction and both diagonals.
            let (dx, dy) = (x as f64 - 180.0, y as f64 - 180.0);
            let angle = dy.atan2(dx).to_degrees();
            let v = if (angle / 7.5).round() as i64 % 2 == 0 {
                200
            } else {
                30
            };
            Rgb([v, v, v])
        }),
    ));
    out.push((
        "noisy_shapes",
        RgbImage::from_fn(300, 220, |x, y| {
            let base: i32 = if (x / 40 + y / 40) % 2 == 0 { 170 } else { 80 };
            let n = i32::from(rng.byte() % 61) - 30;
            let v = (base + n).clamp(0, 255) as u8;
            Rgb([v, v.saturating_add(10), v])
        }),
    ));
    for (name, w, h) in [
        ("tiny_1x1", 1, 1),
        ("tiny_1x9", 1, 9),
        ("tiny_7x2", 7, 2),
        ("tiny_3x3", 3, 3),
    ] {
        out.push((
            name,
            RgbImage::from_fn(w, h, |_, _| Rgb([rng.byte(), rng.byte(), rng.byte()])),
        ));
    }
    out
}

/// Differing pixels (compares raw data: `ImageBuffer`'s `==` also compares colour
/// space metadata, and a huge `Debug` dump helps nobody).
fn count_diff(a: &GrayImage, b: &GrayImage) -> usize {
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .filter(|(x, y)| x != y)
        .count()
}

fn load_gray(path: &Path) -> GrayImage {
    image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_luma8()
}

#[test]
fn canny_matches_opencv_exactly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fixtures = fixtures();
    for (name, image) in &fixtures {
        image
            .save(dir.path().join(format!("{name}.png")))
            .expect("write fixture");
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference_canny.py");
    let stdout = darkroom_test_support::run_script(&script, [dir.path()]);
    eprintln!("OpenCV {}", String::from_utf8_lossy(&stdout).trim());

    let (mut total, mut differing) = (0usize, 0usize);
    for (name, image) in &fixtures {
        let gray = rgb_to_gray(image);
        let expected_gray = load_gray(&dir.path().join(format!("{name}.gray.png")));
        let gray_diff = count_diff(&gray, &expected_gray);
        assert_eq!(
            gray_diff, 0,
            "{name}: grey differs from cvtColor at {gray_diff} pixels"
        );
        for (suffix, l2_gradient) in [("l1", false), ("l2", true)] {
            let expected = load_gray(&dir.path().join(format!("{name}.{suffix}.png")));
            let options = CannyOptions {
                l2_gradient,
                ..CannyOptions::default()
            };
            let actual = canny_gray(&gray, &options);
            let diff = count_diff(&actual, &expected);
            let edges = expected.pixels().filter(|p| p[0] == 255).count();
            eprintln!("{name} {suffix}: {edges} edge pixels, {diff} differ");
            total += expected.len();
            differing += diff;
        }
    }
    assert_eq!(
        differing, 0,
        "{differing} of {total} pixels differ from OpenCV"
    );
}
