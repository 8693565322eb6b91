//! White balance measured on a neutral grey card: the mean colour of a uniform sRGB
//! (128, 128, 128) patch after each grade, against what the chromaticity math predicts.
//!
//! Expected directions: a temperature below 6500 K renders the card as lit by a warmer light,
//! so red rises and blue falls (R/B up); above 6500 K the reverse; positive tint pulls green
//! down (magenta), negative pushes it up. Expected magnitudes come from two independent
//! places: the published chromaticities of CIE D50 and D75 (the card must take exactly their
//! colour at 5000 K and 7500 K), and `reference/tone.py`, a float64 numpy implementation of
//! the same formulas, run through the project's venv.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use darkroom_tone::{ToneError, ToneGrade, ToneSettings};
use image::{Rgb, RgbImage};

const CARD: [u8; 3] = [128, 128, 128];

fn settings(temperature_k: f64, tint: f64, strength: f64) -> ToneSettings {
    ToneSettings {
        temperature_k,
        tint,
        strength,
    }
}

/// Grades a 64×64 grey card and returns its mean colour (0–255).
fn card_after(settings: &ToneSettings) -> [f64; 3] {
    let grade = ToneGrade::new(settings, None).unwrap();
    let mut card = RgbImage::from_pixel(64, 64, Rgb(CARD));
    grade.apply(&mut card);
    let mut sum = [0.0; 3];
    for pixel in card.pixels() {
        for channel in 0..3 {
            sum[channel] += pixel[channel] as f64;
        }
    }
    let count = (card.width() * card.height()) as f64;
    sum.map(|total| total / count)
}

fn srgb_to_linear(encoded: f64) -> f64 {
    if encoded <= 0.04045 {
        encoded / 12.92
    } else {
        ((encoded + 0.055) / 1.055).powf(2.4)
    }
}

fn linear_to_srgb(linear: f64) -> f64 {
    let linear = linear.clamp(0.0, 1.0);
    if linear <= 0.0031308 {
        linear * 12.92
    } else {
        1.055 * linear.powf(1.0 / 2.4) - 0.055
    }
}

/// The 8-bit colour of the grey card under a light of chromaticity (x, y), at the card's
/// luminance: XYZ of the light at Y = 1, into linear sRGB by the published XYZ → sRGB
/// matrix (IEC 61966-2-1), scaled by the card's linear value.
fn card_under_light(x: f64, y: f64) -> [f64; 3] {
    let xyz = [x / y, 1.0, (1.0 - x - y) / y];
    let to_rgb = [
        [3.2406, -1.5372, -0.4986],
        [-0.9689, 1.8758, 0.0415],
        [0.0557, -0.2040, 1.0570],
    ];
    let grey = srgb_to_linear(128.0 / 255.0);
    to_rgb.map(|row| {
        let linear = grey * (row[0] * xyz[0] + row[1] * xyz[1] + row[2] * xyz[2]);
        linear_to_srgb(linear) * 255.0
    })
}

fn assert_close(actual: [f64; 3], expected: [f64; 3], tolerance: f64, what: &str) {
    for channel in 0..3 {
        assert!(
            (actual[channel] - expected[channel]).abs() <= tolerance,
            "{what}: {actual:?} vs expected {expected:?} (±{tolerance})"
        );
    }
}

#[test]
fn neutral_6500k_leaves_the_card_and_every_colour_unchanged() {
    assert_eq!(card_after(&settings(6500.0, 0.0, 1.0)), [128.0; 3]);
    let grade = ToneGrade::new(&settings(6500.0, 0.0, 1.0), None).unwrap();
    // Every grey, and a lattice of colours.
    for value in 0..=255u8 {
        assert_eq!(grade.apply_to_colour([value; 3]), [value; 3]);
    }
    for red in (0..=255u8).step_by(15) {
        for green in (0..=255u8).step_by(15) {
            for blue in (0..=255u8).step_by(15) {
                let colour = [red, green, blue];
                assert_eq!(grade.apply_to_colour(colour), colour);
            }
        }
    }
}

#[test]
fn at_5000k_and_7500k_the_card_takes_the_colour_of_d50_and_d75() {
    // CIE 15:2004 table T.3. The grade's white differs from these by ≤ 2 × 10⁻⁴ in x and y
    // (polynomial vs spectral tables, and sRGB's D65 vs the polynomial's 6500 K), worth
    // ≤ 0.15 of a level here; the rest of the tolerance is the 8-bit rounding.
    let warm = card_after(&settings(5000.0, 0.0, 1.0));
    assert_close(
        warm,
        card_under_light(0.34567, 0.35850),
        0.7,
        "5000 K vs D50",
    );
    let cool = card_after(&settings(7500.0, 0.0, 1.0));
    assert_close(
        cool,
        card_under_light(0.29902, 0.31485),
        0.7,
        "7500 K vs D75",
    );
    // The size of the shift, for the record: 5000 K ≈ (138, 127, 110), 7500 K ≈ (124, 128, 136).
    assert!(
        warm[0] - warm[2] > 25.0 && warm[0] - warm[2] < 31.0,
        "{warm:?}"
    );
    assert!(
        cool[2] - cool[0] > 10.0 && cool[2] - cool[0] < 15.0,
        "{cool:?}"
    );
}

#[test]
fn warm_raises_red_over_blue_and_cool_lowers_it() {
    let ratio = |[red, _, blue]: [f64; 3]| red / blue;
    let neutral = ratio(card_after(&settings(6500.0, 0.0, 1.0)));
    let warm = ratio(card_after(&settings(5200.0, 0.02, 0.8)));
    let cool = ratio(card_after(&settings(7500.0, -0.02, 0.8)));
    let warmer = ratio(card_after(&settings(5000.0, 0.0, 1.0)));
    let cooler = ratio(card_after(&settings(8000.0, 0.0, 1.0)));
    assert_eq!(neutral, 1.0);
    assert!(
        warmer > warm && warm > neutral,
        "{warmer} > {warm} > {neutral}"
    );
    assert!(
        cooler < cool && cool < neutral,
        "{cooler} < {cool} < {neutral}"
    );
}

#[test]
fn tint_moves_green_against_magenta() {
    let magenta = card_after(&settings(6500.0, 0.5, 1.0));
    let green = card_after(&settings(6500.0, -0.5, 1.0));
    assert!(
        magenta[1] < 128.0 && magenta[0] > 128.0 && magenta[2] > 128.0,
        "{magenta:?}"
    );
    assert!(
        green[1] > 128.0 && green[0] < 128.0 && green[2] < 128.0,
        "{green:?}"
    );
    // A small tint still moves green the right way at full strength.
    let slight = card_after(&settings(6500.0, 0.1, 1.0));
    assert!(slight[1] < 128.0, "{slight:?}");
}

#[test]
fn strength_zero_is_the_identity_and_the_shift_grows_with_strength() {
    for temperature_k in [1000.0, 5200.0, 40000.0] {
        let grade = ToneGrade::new(&settings(temperature_k, 1.0, 0.0), None).unwrap();
        for value in [0u8, 1, 64, 128, 254, 255] {
            assert_eq!(
                grade.apply_to_colour([value, 255 - value, value / 2]),
                [value, 255 - value, value / 2]
            );
        }
    }
    let mut previous = 0.0;
    for step in 1..=10 {
        let [red, _, blue] = card_after(&settings(5000.0, 0.0, step as f64 / 10.0));
        let shift = red - blue;
        assert!(
            shift >= previous,
            "strength {step}/10: {shift} < {previous}"
        );
        previous = shift;
    }
    assert!(previous > 25.0);
}

#[test]
fn the_card_gets_steadily_cooler_as_the_temperature_rises() {
    // The 8-bit card: red never rises and blue never falls from 1000 K to 40000 K.
    let mut temperatures: Vec<f64> = (10..100).map(|hundreds| hundreds as f64 * 100.0).collect();
    temperatures.extend((20..=80).map(|halves| halves as f64 * 500.0));
    let mut previous = card_after(&settings(temperatures[0], 0.0, 1.0));
    for &kelvin in &temperatures[1..] {
        let card = card_after(&settings(kelvin, 0.0, 1.0));
        assert!(
            card[0] <= previous[0] && card[2] >= previous[2],
            "{kelvin} K: {card:?} after {previous:?}"
        );
        previous = card;
    }
    // Before rounding and clamping: the linear R/B of grey falls strictly, wherever blue is
    // positive (lights below about 1900 K are outside sRGB: their blue is negative).
    let mut previous_ratio = f64::INFINITY;
    let mut kelvin = 2000.0;
    while kelvin <= 40000.0 {
        let m = ToneGrade::new(&settings(kelvin, 0.0, 1.0), None)
            .unwrap()
            .white_balance();
        let red: f32 = m[0].iter().sum();
        let blue: f32 = m[2].iter().sum();
        assert!(blue > 0.0);
        let ratio = (red / blue) as f64;
        assert!(
            ratio < previous_ratio,
            "{kelvin} K: R/B {ratio} after {previous_ratio}"
        );
        previous_ratio = ratio;
        kelvin += 25.0;
    }
}

#[test]
fn out_of_range_settings_are_refused_with_their_field() {
    let cases = [
        (settings(999.0, 0.0, 1.0), "temperature_k"),
        (settings(40001.0, 0.0, 1.0), "temperature_k"),
        (settings(f64::NAN, 0.0, 1.0), "temperature_k"),
        (settings(6500.0, 1.01, 1.0), "tint"),
        (settings(6500.0, -1.01, 1.0), "tint"),
        (settings(6500.0, f64::INFINITY, 1.0), "tint"),
        (settings(6500.0, 0.0, -0.01), "strength"),
        (settings(6500.0, 0.0, 1.01), "strength"),
        (settings(6500.0, 0.0, f64::NAN), "strength"),
    ];
    for (settings, expected) in cases {
        match ToneGrade::new(&settings, None) {
            Err(ToneError::OutOfRange { field, .. }) => assert_eq!(field, expected, "{settings:?}"),
            other => panic!("{settings:?}: {other:?}"),
        }
    }
    // The ends of each range are allowed.
    for settings in [
        settings(1000.0, -1.0, 0.0),
        settings(40000.0, 1.0, 1.0),
        ToneSettings::default(),
    ] {
        ToneGrade::new(&settings, None).unwrap();
    }
}

#[test]
fn grades_match_the_float64_reference() {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("reference/tone.py");
    let stdout = darkroom_test_support::run_script(&script, std::iter::empty::<&str>());
    let reference: serde_json::Value = serde_json::from_slice(&stdout).unwrap();
    let number = |value: &serde_json::Value| value.as_f64().unwrap();
    let triple = |value: &serde_json::Value| {
        let items = value.as_array().unwrap();
        [number(&items[0]), number(&items[1]), number(&items[2])]
    };

    println!("grey card (128, 128, 128) after each grade:");
    println!(
        "{:>9} {:>6} {:>8}  {:>15}  {:>21}",
        "kelvin", "tint", "strength", "8-bit result", "reference"
    );
    let cases = reference["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let settings = settings(
            number(&case["temperature_k"]),
            number(&case["tint"]),
            number(&case["strength"]),
        );
        let grade = ToneGrade::new(&settings, None).unwrap();
        let white = case["white_xy"].as_array().unwrap();
        let ours = darkroom_tone::white_point::white_point(settings.temperature_k, settings.tint);
        assert!(
            (ours.x - number(&white[0])).abs() < 1e-9 && (ours.y - number(&white[1])).abs() < 1e-9
        );
        let probes = case["probes"].as_array().unwrap();
        let expected = case["expected"].as_array().unwrap();
        for (probe, expected) in probes.iter().zip(expected) {
            let colour = triple(probe).map(|value| value as u8);
            let graded = grade.apply_to_colour(colour).map(f64::from);
            // Rounding is half a level; f32 and the tables add at most 0.02.
            assert_close(
                graded,
                triple(expected),
                0.52,
                &format!("{settings:?} on {colour:?}"),
            );
            if colour == CARD {
                let [r, g, b] = triple(expected);
                println!(
                    "{:>9} {:>6} {:>8}  {:>15}  ({r:6.2}, {g:6.2}, {b:6.2})",
                    settings.temperature_k,
                    settings.tint,
                    settings.strength,
                    format!("{graded:?}")
                );
            }
        }
    }
}

#[test]
fn whole_pictures_are_graded_as_each_colour_alone() {
    // `apply` grades blocks of pixels together when there is no LUT; it must agree with the
    // pixel-by-pixel path everywhere, including the pixels left over after the last block.
    let mut state = 0x1234_5678_u32;
    let picture = RgbImage::from_fn(37, 29, |_, _| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        Rgb([state as u8, (state >> 8) as u8, (state >> 16) as u8])
    });
    for settings in [
        settings(5200.0, 0.02, 0.8),
        settings(7500.0, -0.02, 1.0),
        settings(1000.0, 1.0, 0.3),
    ] {
        let grade = ToneGrade::new(&settings, None).unwrap();
        let mut graded = picture.clone();
        grade.apply(&mut graded);
        for (before, after) in picture.pixels().zip(graded.pixels()) {
            assert_eq!(after.0, grade.apply_to_colour(before.0), "{settings:?}");
        }
    }
}
