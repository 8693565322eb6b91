//! Embedded colour profiles through [`prepare`]: wide-gamut photos come out in sRGB, sRGB and
//! untagged photos come out untouched.
//!
//! The fixtures are flat-colour images encoded here with an ICC profile built by `moxcms`
//! (Display P3, Adobe RGB 1998). The expected sRGB values do not come from a colour engine:
//! they are computed in this file from the colour spaces' published definitions (primaries,
//! D65 white, transfer curves), so a wrong profile or a wrong conversion fails the test.
#![allow(clippy::unwrap_used)]

use std::io::Cursor;

use darkroom_preprocess::{Bucket, PrepareOptions, prepare};
use image::{ExtendedColorType, ImageEncoder, Rgb, RgbImage};
use moxcms::ColorProfile;

/// Largest difference, in 8-bit levels, allowed between the pipeline and the exact value
/// (the engine works in fixed point with 8-bit tables; measured: at most 1).
const TOLERANCE: u8 = 2;

type Matrix = [[f64; 3]; 3];

/// A colour space as its specification defines it.
struct Space {
    /// (x, y) chromaticities of red, green and blue.
    primaries: [(f64, f64); 3],
    /// Encoded value in [0, 1] → linear light.
    decode: fn(f64) -> f64,
}

const D65: (f64, f64) = (0.3127, 0.3290);

fn srgb_decode(v: f64) -> f64 {
    if v <= 0.04045 {
        v / 12.92
    } else {
        ((v + 0.055) / 1.055).powf(2.4)
    }
}

fn srgb_encode(l: f64) -> f64 {
    if l <= 0.003_130_8 {
        l * 12.92
    } else {
        1.055 * l.powf(1.0 / 2.4) - 0.055
    }
}

/// Adobe RGB (1998) §4.3.1.2: gamma 563/256.
fn adobe_decode(v: f64) -> f64 {
    v.powf(563.0 / 256.0)
}

/// IEC 61966-2-1.
const SRGB: Space = Space {
    primaries: [(0.64, 0.33), (0.30, 0.60), (0.15, 0.06)],
    decode: srgb_decode,
};
/// Display P3: DCI-P3 primaries, D65 white, the sRGB transfer curve.
const DISPLAY_P3: Space = Space {
    primaries: [(0.680, 0.320), (0.265, 0.690), (0.150, 0.060)],
    decode: srgb_decode,
};
/// Adobe RGB (1998).
const ADOBE_RGB: Space = Space {
    primaries: [(0.64, 0.33), (0.21, 0.71), (0.15, 0.06)],
    decode: adobe_decode,
};

fn xyz((x, y): (f64, f64)) -> [f64; 3] {
    [x / y, 1.0, (1.0 - x - y) / y]
}

fn mul(m: &Matrix, v: [f64; 3]) -> [f64; 3] {
    [0, 1, 2].map(|r| (0..3).map(|c| m[r][c] * v[c]).sum())
}

fn inverse(m: &Matrix) -> Matrix {
    let det = m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]);
    let cof =
        |r0: usize, r1: usize, c0: usize, c1: usize| m[r0][c0] * m[r1][c1] - m[r0][c1] * m[r1][c0];
    [
        [cof(1, 2, 1, 2), -cof(0, 2, 1, 2), cof(0, 1, 1, 2)],
        [-cof(1, 2, 0, 2), cof(0, 2, 0, 2), -cof(0, 1, 0, 2)],
        [cof(1, 2, 0, 1), -cof(0, 2, 0, 1), cof(0, 1, 0, 1)],
    ]
    .map(|row| row.map(|v| v / det))
}

/// Linear RGB → XYZ for a D65 space: columns are the primaries scaled so white is (1, 1, 1).
fn rgb_to_xyz(space: &Space) -> Matrix {
    let p = space.primaries.map(xyz);
    let columns: Matrix = [0, 1, 2].map(|r| [p[0][r], p[1][r], p[2][r]]);
    let scale = mul(&inverse(&columns), xyz(D65));
    [0, 1, 2].map(|r| [0, 1, 2].map(|c| columns[r][c] * scale[c]))
}

/// The exact sRGB value of `colour` in `space` (both D65, so no white-point adaptation;
/// out-of-gamut channels clipped).
fn expected_srgb(space: &Space, colour: [u8; 3]) -> [u8; 3] {
    let linear = colour.map(|c| (space.decode)(f64::from(c) / 255.0));
    let xyz = mul(&rgb_to_xyz(space), linear);
    let srgb_linear = mul(&inverse(&rgb_to_xyz(&SRGB)), xyz);
    srgb_linear.map(|l| (srgb_encode(l.clamp(0.0, 1.0)) * 255.0).round() as u8)
}

fn flat(colour: [u8; 3]) -> RgbImage {
    RgbImage::from_pixel(96, 64, Rgb(colour))
}

#[derive(Clone, Copy, Debug)]
enum Codec {
    Png,
    Jpeg,
    Webp,
}

fn encode(image: &RgbImage, codec: Codec, icc: Option<&[u8]>) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    let (w, h) = image.dimensions();
    macro_rules! write_with {
        ($encoder:expr) => {{
            let mut encoder = $encoder;
            if let Some(icc) = icc {
                encoder.set_icc_profile(icc.to_vec()).unwrap();
            }
            encoder
                .write_image(image.as_raw(), w, h, ExtendedColorType::Rgb8)
                .unwrap();
        }};
    }
    match codec {
        Codec::Png => write_with!(image::codecs::png::PngEncoder::new(&mut out)),
        Codec::Jpeg => write_with!(image::codecs::jpeg::JpegEncoder::new_with_quality(
            &mut out, 100
        )),
        Codec::Webp => write_with!(image::codecs::webp::WebPEncoder::new_lossless(&mut out)),
    }
    out.into_inner()
}

/// Pipeline options framing to the fixtures' own size: the colour is what is tested, and
/// a 1 MP bucket would only make the (debug-build) test slow.
fn options() -> PrepareOptions {
    PrepareOptions {
        size: Some(Bucket {
            width: 96,
            height: 64,
        }),
        ..PrepareOptions::default()
    }
}

/// The centre pixel of the prepared image.
fn prepared_centre(bytes: &[u8]) -> [u8; 3] {
    let prepared = prepare(bytes, &options()).unwrap();
    let (w, h) = prepared.image.dimensions();
    prepared.image.get_pixel(w / 2, h / 2).0
}

fn assert_close(got: [u8; 3], want: [u8; 3], what: &str) {
    let worst = (0..3).map(|i| got[i].abs_diff(want[i])).max().unwrap();
    assert!(
        worst <= TOLERANCE,
        "{what}: got {got:?}, expected {want:?} (±{TOLERANCE})"
    );
}

const COLOURS: [[u8; 3]; 6] = [
    [200, 120, 80],
    [90, 160, 200],
    [128, 128, 128],
    [230, 200, 60],
    [40, 90, 50],
    // Outside sRGB in both spaces: clipped.
    [255, 0, 0],
];

#[test]
fn the_oracle_agrees_with_published_matrices() {
    // Display P3 → sRGB, linear, as published for the D65 pair (e.g. in the CSS Color 4
    // sample code, to four places): a check on the matrix arithmetic above.
    let m = mul(
        &inverse(&rgb_to_xyz(&SRGB)),
        mul(&rgb_to_xyz(&DISPLAY_P3), [1.0, 0.0, 0.0]),
    );
    assert!((m[0] - 1.2249).abs() < 1e-3, "{m:?}");
    assert!((m[1] + 0.0420).abs() < 1e-3, "{m:?}");
    assert!((m[2] + 0.0197).abs() < 1e-3, "{m:?}");
    assert_eq!(expected_srgb(&SRGB, [12, 200, 77]), [12, 200, 77]);
}

#[test]
fn display_p3_and_adobe_rgb_pngs_come_out_in_srgb() {
    for (name, space, profile) in [
        ("Display P3", &DISPLAY_P3, ColorProfile::new_display_p3()),
        ("Adobe RGB", &ADOBE_RGB, ColorProfile::new_adobe_rgb()),
    ] {
        let icc = profile.encode().unwrap();
        for colour in COLOURS {
            let got = prepared_centre(&encode(&flat(colour), Codec::Png, Some(&icc)));
            let want = expected_srgb(space, colour);
            assert_close(got, want, &format!("{name} {colour:?}"));
        }
        // A mid-tone really moves, so the test cannot pass by leaving pixels alone.
        let moved = expected_srgb(space, [200, 120, 80]);
        assert!(
            moved
                .iter()
                .zip([200, 120, 80])
                .any(|(a, b)| a.abs_diff(b) > 8)
        );
    }
}

#[test]
fn jpeg_and_webp_profiles_are_honoured_too() {
    let icc = ColorProfile::new_display_p3().encode().unwrap();
    for codec in [Codec::Jpeg, Codec::Webp] {
        for colour in COLOURS {
            // What the codec itself does to the colour (JPEG's YCbCr rounding) is measured on
            // the untagged twin, then converted by the oracle.
            let as_stored = prepared_centre(&encode(&flat(colour), codec, None));
            let got = prepared_centre(&encode(&flat(colour), codec, Some(&icc)));
            let want = expected_srgb(&DISPLAY_P3, as_stored);
            assert_close(got, want, &format!("{codec:?} {colour:?}"));
        }
    }
}

#[test]
fn srgb_tagged_and_untagged_images_are_untouched() {
    let photo = RgbImage::from_fn(300, 200, |x, y| {
        Rgb([
            (x % 256) as u8,
            (y % 256) as u8,
            ((x * 3 + y * 7) % 256) as u8,
        ])
    });
    let srgb = ColorProfile::new_srgb().encode().unwrap();
    for codec in [Codec::Png, Codec::Jpeg, Codec::Webp] {
        let untagged = prepare(&encode(&photo, codec, None), &options()).unwrap();
        let tagged = prepare(&encode(&photo, codec, Some(&srgb)), &options()).unwrap();
        assert_eq!(
            tagged.image.dimensions(),
            (96, 64),
            "framed to the size asked for"
        );
        assert!(untagged.image == tagged.image, "{codec:?}");
    }
    // Untagged PNG pixels are the stored ones: a flat colour survives the resize exactly.
    assert_eq!(
        prepared_centre(&encode(&flat([200, 120, 80]), Codec::Png, None)),
        [200, 120, 80]
    );
}

#[test]
fn a_broken_profile_is_ignored_not_fatal() {
    let mut icc = ColorProfile::new_display_p3().encode().unwrap();
    icc.truncate(60);
    let got = prepared_centre(&encode(&flat([200, 120, 80]), Codec::Png, Some(&icc)));
    assert_eq!(got, [200, 120, 80]);
}
