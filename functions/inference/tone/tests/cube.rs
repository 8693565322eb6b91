//! `.cube` LUTs: parsing (what is accepted, what is refused and on which line, the limits on
//! both sides) and what a LUT does to a picture (identity, known transforms, order against
//! the white balance, strength).
#![allow(clippy::unwrap_used)]

use darkroom_tone::{CubeLimits, CubeLut, ToneError, ToneGrade, ToneSettings};
use image::{Rgb, RgbImage};

/// The text of a `.cube` file: `header` lines, then the table of `f` on a `size`³ grid over
/// [0, 1]³, red fastest.
fn cube_text(header: &str, size: usize, f: impl Fn([f64; 3]) -> [f64; 3]) -> String {
    let mut text = header.to_owned();
    let step = 1.0 / (size - 1) as f64;
    for blue in 0..size {
        for green in 0..size {
            for red in 0..size {
                let [r, g, b] = f([red as f64 * step, green as f64 * step, blue as f64 * step]);
                text.push_str(&format!("{r:.6} {g:.6} {b:.6}\n"));
            }
        }
    }
    text
}

fn lut(size: usize, f: impl Fn([f64; 3]) -> [f64; 3]) -> CubeLut {
    let text = cube_text(&format!("LUT_3D_SIZE {size}\n"), size, f);
    CubeLut::parse(&text, &CubeLimits::default()).unwrap()
}

/// Every grey and a lattice of colours, as one image.
fn test_card() -> RgbImage {
    let mut colours: Vec<[u8; 3]> = (0..=255u8).map(|value| [value; 3]).collect();
    for red in (0..=255u8).step_by(17) {
        for green in (0..=255u8).step_by(17) {
            for blue in (0..=255u8).step_by(17) {
                colours.push([red, green, blue]);
            }
        }
    }
    let mut card = RgbImage::new(colours.len() as u32, 1);
    for (x, colour) in colours.into_iter().enumerate() {
        card.put_pixel(x as u32, 0, Rgb(colour));
    }
    card
}

fn graded(settings: &ToneSettings, lut: Option<&CubeLut>) -> RgbImage {
    let mut card = test_card();
    ToneGrade::new(settings, lut).unwrap().apply(&mut card);
    card
}

/// Largest and mean absolute difference between `actual` and `expected(input)`.
fn differences(actual: &RgbImage, expected: impl Fn([u8; 3]) -> [u8; 3]) -> (u8, f64) {
    let input = test_card();
    let mut largest = 0;
    let mut total = 0.0;
    for (before, after) in input.pixels().zip(actual.pixels()) {
        let want = expected(before.0);
        for channel in 0..3 {
            let difference = after[channel].abs_diff(want[channel]);
            largest = largest.max(difference);
            total += difference as f64;
        }
    }
    // An image's length counts samples: three per pixel.
    (largest, total / input.len() as f64)
}

fn neutral() -> ToneSettings {
    ToneSettings::default()
}

#[test]
fn identity_luts_leave_the_picture_unchanged() {
    for size in [2, 17, 33] {
        let identity = lut(size, |rgb| rgb);
        let (largest, mean) = differences(&graded(&neutral(), Some(&identity)), |colour| colour);
        assert!(
            largest <= 1 && mean < 0.01,
            "size {size}: largest {largest}, mean {mean}"
        );
    }
}

#[test]
fn luts_of_affine_maps_give_those_maps() {
    let swap = lut(17, |[r, g, b]| [g, b, r]);
    let (largest, _) = differences(&graded(&neutral(), Some(&swap)), |[r, g, b]| [g, b, r]);
    assert!(largest <= 1, "channel swap: {largest}");
    let invert = lut(9, |rgb| rgb.map(|value| 1.0 - value));
    let (largest, _) = differences(&graded(&neutral(), Some(&invert)), |rgb| {
        rgb.map(|value| 255 - value)
    });
    assert!(largest <= 1, "inversion: {largest}");
}

#[test]
fn the_lut_applies_after_the_white_balance() {
    let warm = ToneSettings {
        temperature_k: 5200.0,
        ..ToneSettings::default()
    };
    let invert = lut(5, |rgb| rgb.map(|value| 1.0 - value));
    let grade = ToneGrade::new(&warm, None).unwrap();
    let (largest, _) = differences(&graded(&warm, Some(&invert)), |colour| {
        grade.apply_to_colour(colour).map(|value| 255 - value)
    });
    assert!(largest <= 1, "warm then invert: {largest}");
}

#[test]
fn strength_blends_the_lut_result_in_linear_light() {
    let half = ToneSettings {
        strength: 0.5,
        ..ToneSettings::default()
    };
    let invert = lut(3, |rgb| rgb.map(|value| 1.0 - value));
    let decode = |value: u8| {
        let encoded = value as f64 / 255.0;
        if encoded <= 0.04045 {
            encoded / 12.92
        } else {
            ((encoded + 0.055) / 1.055).powf(2.4)
        }
    };
    let encode = |linear: f64| {
        let encoded = if linear <= 0.0031308 {
            linear * 12.92
        } else {
            1.055 * linear.powf(1.0 / 2.4) - 0.055
        };
        (encoded * 255.0).round() as u8
    };
    let (largest, _) = differences(&graded(&half, Some(&invert)), |colour| {
        colour.map(|value| encode(0.5 * decode(value) + 0.5 * decode(255 - value)))
    });
    assert!(largest <= 1, "half-strength inversion: {largest}");
    // Black inverted is white; half and half in linear light is 0.5, which sRGB encodes as
    // 188, not 128.
    assert_eq!(graded(&half, Some(&invert)).get_pixel(0, 0).0, [188; 3]);
}

#[test]
fn a_separable_lut_interpolates_each_channel_linearly_between_grid_points() {
    // For a LUT that treats channels apart, tetrahedral interpolation is exactly linear
    // interpolation of each channel's curve, whichever tetrahedron the point falls in.
    let curve = |value: f64| value * value;
    let size = 5;
    let squares = lut(size, |rgb| rgb.map(curve));
    let piecewise = |value: f64| {
        let position = value * (size - 1) as f64;
        let cell = (position.floor() as usize).min(size - 2);
        let fraction = position - cell as f64;
        let (low, high) = (
            cell as f64 / (size - 1) as f64,
            (cell + 1) as f64 / (size - 1) as f64,
        );
        curve(low) + fraction * (curve(high) - curve(low))
    };
    let mut state = 0x2545_f491_u32;
    let mut random = || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        state as f64 / u32::MAX as f64
    };
    for _ in 0..10_000 {
        let point = [random(), random(), random()];
        let sampled = squares.sample(point.map(|value| value as f32));
        for channel in 0..3 {
            let expected = piecewise(point[channel]);
            assert!(
                (sampled[channel] as f64 - expected).abs() < 1e-5,
                "{point:?}: {sampled:?}, channel {channel} should be {expected}"
            );
        }
    }
    // Grid points are returned as stored, and inputs outside the domain are clamped to it.
    assert_eq!(squares.sample([0.25, 0.5, 0.75]), [0.0625, 0.25, 0.5625]);
    assert_eq!(squares.sample([-3.0, 7.0, f32::NAN]), [0.0, 1.0, 0.0]);
    assert_eq!(squares.entry(1, 2, 3), Some([0.0625, 0.25, 0.5625]));
    assert_eq!(squares.entry(5, 0, 0), None);
}

#[test]
fn a_non_linear_lut_is_followed_closely_between_grid_points() {
    let mix = |[r, g, b]: [f64; 3]| [r * g, g * b, (b + r) / 2.0];
    let size = 33;
    let table = lut(size, mix);
    let mut worst: f64 = 0.0;
    for i in 0..=40 {
        for j in 0..=40 {
            let point = [i as f64 / 40.0, j as f64 / 40.0, (i * j % 41) as f64 / 40.0];
            let sampled = table.sample(point.map(|value| value as f32));
            let exact = mix(point);
            for channel in 0..3 {
                worst = worst.max((sampled[channel] as f64 - exact[channel]).abs());
            }
        }
    }
    // A product's interpolation error is at most a quarter of a squared grid step.
    let step = 1.0 / (size - 1) as f64;
    assert!(worst <= step * step / 4.0 + 1e-5, "worst {worst}");
}

#[test]
fn domains_map_inputs_onto_the_grid() {
    // A LUT over [-0.5, 1.5]³ whose entries are the grid's own coordinates is the identity.
    let size = 9;
    let span = |value: f64| -0.5 + 2.0 * value;
    let body = cube_text("", size, |rgb| rgb.map(span));
    for header in [
        "DOMAIN_MIN -0.5 -0.5 -0.5\nDOMAIN_MAX 1.5 1.5 1.5\n",
        "LUT_3D_INPUT_RANGE -0.5 1.5\n",
    ] {
        let text = format!("LUT_3D_SIZE {size}\n{header}{body}");
        let table = CubeLut::parse(&text, &CubeLimits::default()).unwrap();
        assert_eq!(table.domain(), ([-0.5; 3], [1.5; 3]));
        let (largest, _) = differences(&graded(&neutral(), Some(&table)), |colour| colour);
        assert!(largest <= 1, "{header:?}: {largest}");
    }
}

#[test]
fn accepts_comments_titles_bom_and_crlf() {
    let header = "\u{feff}# made by hand\r\n\r\nTITLE \"Warm film look\"\r\n  # indented comment\r\nLUT_3D_SIZE 2\r\nDOMAIN_MIN 0 0 0\r\nDOMAIN_MAX 1 1 1\r\n";
    let text = cube_text(header, 2, |rgb| rgb)
        .replace('\n', "\r\n")
        .replace("\r\r\n", "\r\n");
    let table = CubeLut::parse(&text, &CubeLimits::default()).unwrap();
    assert_eq!(table.title(), Some("Warm film look"));
    assert_eq!(table.size(), 2);
    assert_eq!(table.entry(1, 0, 1), Some([1.0, 0.0, 1.0]));
}

/// Parses `text` (size-2 tables unless it says otherwise) and returns the error.
fn refusal(text: &str, limits: &CubeLimits) -> ToneError {
    match CubeLut::parse(text, limits) {
        Err(error) => error,
        Ok(table) => panic!("accepted {text:?} as {table:?}"),
    }
}

/// Whether an error is the one a case expects.
type Expected = fn(&ToneError) -> bool;

const EIGHT_ROWS: &str = "0 0 0\n1 0 0\n0 1 0\n1 1 0\n0 0 1\n1 0 1\n0 1 1\n1 1 1\n";

#[test]
fn refuses_malformed_files_naming_the_line() {
    let limits = CubeLimits::default();
    let with_rows = |header: &str| format!("{header}{EIGHT_ROWS}");
    let cases: Vec<(String, Expected, &str)> = vec![
        (
            with_rows("# hi\nLUT_3D_SIZE 2\nLUT_3D_SIZ 2\n"),
            |e| matches!(e, ToneError::LutUnknownKeyword { line: 3, keyword } if keyword == "LUT_3D_SIZ"),
            "unknown keyword",
        ),
        (
            with_rows("lut_3d_size 2\n"),
            |e| matches!(e, ToneError::LutUnknownKeyword { line: 1, .. }),
            "keywords are case-sensitive",
        ),
        (
            "LUT_1D_SIZE 1024\n0 0 0\n".to_owned(),
            |e| matches!(e, ToneError::LutOneDimensional { line: 1 }),
            "1D LUT",
        ),
        (
            with_rows("LUT_3D_SIZE 1\n"),
            |e| {
                matches!(
                    e,
                    ToneError::LutSize {
                        line: 1,
                        size: 1,
                        max: 129
                    }
                )
            },
            "size 1",
        ),
        (
            with_rows("\nLUT_3D_SIZE 130\n"),
            |e| {
                matches!(
                    e,
                    ToneError::LutSize {
                        line: 2,
                        size: 130,
                        ..
                    }
                )
            },
            "size over the limit",
        ),
        (
            with_rows("LUT_3D_SIZE 2.0\n"),
            |e| matches!(e, ToneError::LutNotANumber { line: 1, token } if token == "2.0"),
            "fractional size",
        ),
        (
            with_rows("LUT_3D_SIZE 99999999999999999999999\n"),
            |e| matches!(e, ToneError::LutNotANumber { line: 1, .. }),
            "size beyond u64",
        ),
        (
            "LUT_3D_SIZE 2\n0 0 0\n1 0 0\n0 1 0\n1 NaN 0\n0 0 1\n1 0 1\n0 1 1\n1 1 1\n".to_owned(),
            |e| matches!(e, ToneError::LutNotFinite { line: 5, token } if token == "NaN"),
            "NaN entry",
        ),
        (
            "LUT_3D_SIZE 2\nnan 0 0\n1 0 0\n0 1 0\n1 1 0\n0 0 1\n1 0 1\n0 1 1\n1 1 1\n".to_owned(),
            |e| matches!(e, ToneError::LutNotFinite { line: 2, .. }),
            "nan first on a line is data, not a keyword",
        ),
        (
            "LUT_3D_SIZE 2\n0 0 0\n1 0 0\n0 1 0\n1 1 0\n0 0 1\n1 0 1\n0 1 1\n1 1 inf\n".to_owned(),
            |e| matches!(e, ToneError::LutNotFinite { line: 9, .. }),
            "infinite entry",
        ),
        (
            "LUT_3D_SIZE 2\n0 0 0\n1 0 0\n0 1 0 5\n".to_owned(),
            |e| matches!(e, ToneError::LutSyntax { line: 4, .. }),
            "four numbers",
        ),
        (
            "LUT_3D_SIZE 2\n0 0 0\n1 0 x\n".to_owned(),
            |e| matches!(e, ToneError::LutNotANumber { line: 3, token } if token == "x"),
            "not a number",
        ),
        (
            "LUT_3D_SIZE 2\n0 0 0\n1 0 0\n\n# short\n".to_owned(),
            |e| {
                matches!(
                    e,
                    ToneError::LutEntryCount {
                        line: 5,
                        expected: 8,
                        found: 2
                    }
                )
            },
            "too few entries",
        ),
        (
            format!("LUT_3D_SIZE 2\n{EIGHT_ROWS}0.5 0.5 0.5\n"),
            |e| {
                matches!(
                    e,
                    ToneError::LutEntryCount {
                        line: 10,
                        expected: 8,
                        found: 9
                    }
                )
            },
            "too many entries",
        ),
        (
            format!("LUT_3D_SIZE 2\n0 0 0\nTITLE \"late\"\n{EIGHT_ROWS}"),
            |e| matches!(e, ToneError::LutSyntax { line: 3, .. }),
            "keyword after data",
        ),
        (
            format!("0 0 0\nLUT_3D_SIZE 2\n{EIGHT_ROWS}"),
            |e| matches!(e, ToneError::LutSyntax { line: 1, .. }),
            "data before the size",
        ),
        (
            with_rows("TITLE \"a\"\nLUT_3D_SIZE 2\nTITLE \"b\"\n"),
            |e| matches!(e, ToneError::LutSyntax { line: 3, .. }),
            "title twice",
        ),
        (
            with_rows("LUT_3D_SIZE 2\nLUT_3D_SIZE 2\n"),
            |e| matches!(e, ToneError::LutSyntax { line: 2, .. }),
            "size twice",
        ),
        (
            with_rows("TITLE unquoted\nLUT_3D_SIZE 2\n"),
            |e| matches!(e, ToneError::LutSyntax { line: 1, .. }),
            "unquoted title",
        ),
        (
            with_rows("LUT_3D_SIZE 2\nDOMAIN_MIN 0 0.5 0\nDOMAIN_MAX 1 0.5 1\n"),
            |e| {
                matches!(
                    e,
                    ToneError::LutEmptyDomain {
                        line: 3,
                        channel: "green",
                        ..
                    }
                )
            },
            "empty domain",
        ),
        (
            with_rows("LUT_3D_SIZE 2\nDOMAIN_MIN -3e38 0 0\nDOMAIN_MAX 3e38 1 1\n"),
            |e| {
                matches!(
                    e,
                    ToneError::LutEmptyDomain {
                        line: 3,
                        channel: "red",
                        ..
                    }
                )
            },
            "domain too wide for f32",
        ),
        (
            with_rows("LUT_3D_SIZE 2\nDOMAIN_MIN 0 0\n"),
            |e| matches!(e, ToneError::LutSyntax { line: 2, .. }),
            "two-number domain",
        ),
        (
            with_rows("LUT_3D_SIZE 2\nLUT_3D_INPUT_RANGE 0 1\nDOMAIN_MAX 1 1 1\n"),
            |e| matches!(e, ToneError::LutSyntax { line: 2, .. }),
            "input range and domain",
        ),
        (
            "TITLE \"empty\"\n# nothing\n".to_owned(),
            |e| matches!(e, ToneError::LutMissingSize),
            "no size",
        ),
    ];
    for (text, expected, what) in cases {
        let error = refusal(&text, &limits);
        assert!(expected(&error), "{what}: got {error:?}");
        assert!(!error.is_retryable(), "{what}");
        // Every message that has a line names it.
        let message = error.to_string();
        assert!(message.starts_with("LUT"), "{what}: {message}");
    }
}

#[test]
fn refuses_non_utf8_naming_the_line() {
    let mut bytes = b"LUT_3D_SIZE 2\n# caf".to_vec();
    bytes.push(0xe9);
    bytes.extend_from_slice(b"\n");
    bytes.extend_from_slice(EIGHT_ROWS.as_bytes());
    match CubeLut::from_bytes(&bytes, &CubeLimits::default()) {
        Err(ToneError::LutNotUtf8 { line: 2 }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn size_limits_hold_on_both_sides() {
    // A 65³ LUT, the largest common size, parses under the default limits.
    let big = cube_text("LUT_3D_SIZE 65\n", 65, |rgb| rgb);
    assert!(big.len() > 7_000_000);
    let table = CubeLut::parse(&big, &CubeLimits::default()).unwrap();
    assert_eq!(table.size(), 65);
    // The byte limit: exactly at it passes, one byte over does not, before any parsing.
    let small = cube_text("LUT_3D_SIZE 3\n", 3, |rgb| rgb);
    let limits = CubeLimits {
        max_bytes: small.len() as u64,
        ..CubeLimits::default()
    };
    CubeLut::parse(&small, &limits).unwrap();
    let over = format!("{small}#");
    assert!(matches!(
        CubeLut::parse(&over, &limits),
        Err(ToneError::LutTooLarge { .. })
    ));
    // The size limit is the caller's to set.
    let strict = CubeLimits {
        max_size: 2,
        ..CubeLimits::default()
    };
    assert!(matches!(
        CubeLut::parse(&small, &strict),
        Err(ToneError::LutSize {
            line: 1,
            size: 3,
            max: 2
        })
    ));
}

#[test]
fn files_are_read_by_plain_name_under_their_directory() {
    let dir = tempfile::tempdir().unwrap();
    let text = cube_text("TITLE \"warm\"\nLUT_3D_SIZE 3\n", 3, |[r, g, b]| {
        [r, g, b * 0.9]
    });
    std::fs::write(dir.path().join("warm.cube"), &text).unwrap();
    let table = CubeLut::load(dir.path(), "warm.cube", &CubeLimits::default()).unwrap();
    assert_eq!(table.title(), Some("warm"));
    assert_eq!(table.entry(2, 2, 2), Some([1.0, 1.0, 0.9]));

    for name in [
        "",
        "../warm.cube",
        "sub/warm.cube",
        ".warm.cube",
        "..",
        "a\\b.cube",
    ] {
        assert!(
            matches!(
                CubeLut::load(dir.path(), name, &CubeLimits::default()),
                Err(ToneError::LutName { .. })
            ),
            "{name:?}"
        );
    }
    match CubeLut::load(dir.path(), "missing.cube", &CubeLimits::default()) {
        Err(error @ ToneError::LutIo { .. }) => assert!(!error.is_retryable()),
        other => panic!("{other:?}"),
    }
    // A file over the byte limit is refused from its size, before it is read.
    let limits = CubeLimits {
        max_bytes: 100,
        ..CubeLimits::default()
    };
    assert!(matches!(
        CubeLut::load(dir.path(), "warm.cube", &limits),
        Err(ToneError::LutTooLarge { limit: 100 })
    ));
}
