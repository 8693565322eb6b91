//! Hostile and awkward uploads through [`prepare`]. Every fixture is generated here
//! (with the `image` crate, or Pillow via `tests/make_fixtures.py` for what `image`
//! cannot write: EXIF orientation and GPS, CMYK JPEG, palette PNG, animated WebP).

use std::io::Cursor;
use std::path::Path;
use std::sync::OnceLock;

use darkroom_events::FailureReason;
use darkroom_preprocess::{
    Limits, PrepareOptions, Prepared, PreprocessError, SourceFormat, encode_png, prepare,
};
use image::{ImageFormat, Rgb, RgbImage};

fn options() -> PrepareOptions {
    PrepareOptions::default()
}

fn encode(image: &RgbImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, format).expect("encode fixture");
    out.into_inner()
}

fn photo(width: u32, height: u32) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| {
        Rgb([
            (x % 256) as u8,
            (y % 256) as u8,
            ((x / 7 + y / 5) % 256) as u8,
        ])
    })
}

fn refusal(bytes: &[u8]) -> PreprocessError {
    match prepare(bytes, &options()) {
        Err(e) => e,
        Ok(p) => panic!("accepted a hostile upload as {:?}", p.source_format),
    }
}

/// Pillow-made fixtures, written once per test process.
fn pillow_fixtures() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/make_fixtures.py");
        darkroom_test_support::run_script(&script, [dir.path()]);
        dir
    })
    .path()
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(pillow_fixtures().join(name)).expect("fixture")
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&u32::try_from(data.len()).expect("len").to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// A few KB claiming `width`×`height` RGB8: valid signature, IHDR and CRCs, then junk.
fn png_bomb(width: u32, height: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    png_chunk(&mut out, b"IHDR", &ihdr);
    // A zlib header then a deflate stream of zeros would inflate to 10 GB.
    let mut idat = vec![0x78, 0x9C];
    idat.extend(std::iter::repeat_n(0u8, 4096));
    png_chunk(&mut out, b"IDAT", &idat);
    png_chunk(&mut out, b"IEND", &[]);
    out
}

/// Rewrites a baseline JPEG's SOF0 dimensions.
fn patch_jpeg_size(mut jpeg: Vec<u8>, width: u16, height: u16) -> Vec<u8> {
    let sof = jpeg
        .windows(2)
        .position(|w| w == [0xFF, 0xC0])
        .expect("SOF0 marker");
    jpeg[sof + 5..sof + 7].copy_from_slice(&height.to_be_bytes());
    jpeg[sof + 7..sof + 9].copy_from_slice(&width.to_be_bytes());
    jpeg
}

fn peak_rss_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

fn assert_close(actual: Rgb<u8>, expected: [u8; 3], tolerance: u8, what: &str) {
    let ok = actual
        .0
        .iter()
        .zip(expected)
        .all(|(&a, e)| a.abs_diff(e) <= tolerance);
    assert!(ok, "{what}: got {:?}, expected ≈{expected:?}", actual.0);
}

/// Quadrant centres of the Pillow fixtures' upright picture.
fn assert_quadrants(p: &Prepared, tolerance: u8, what: &str) {
    let (w, h) = p.image.dimensions();
    let at = |x: u32, y: u32| *p.image.get_pixel(x, y);
    assert_close(
        at(w / 4, h / 4),
        [255, 0, 0],
        tolerance,
        &format!("{what} top-left"),
    );
    assert_close(
        at(3 * w / 4, h / 4),
        [0, 255, 0],
        tolerance,
        &format!("{what} top-right"),
    );
    assert_close(
        at(w / 4, 3 * h / 4),
        [0, 0, 255],
        tolerance,
        &format!("{what} bottom-left"),
    );
    assert_close(
        at(3 * w / 4, 3 * h / 4),
        [255, 255, 255],
        tolerance,
        &format!("{what} bottom-right"),
    );
}

#[test]
fn zero_bytes_is_unsupported() {
    let e = refusal(b"");
    assert_eq!(e, PreprocessError::UnsupportedFormat { detected: "empty" });
    assert_eq!(e.reason(), FailureReason::UnsupportedFormat);
    assert!(e.is_permanent());
}

#[test]
fn non_images_named_jpg_are_refused_by_content() {
    let cases: [(&[u8], &str); 6] = [
        (b"<?xml version=\"1.0\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\"><script>alert(1)</script></svg>", "svg"),
        (b"<!DOCTYPE html><html><body>not a photo</body></html>", "html"),
        (b"PK\x03\x04\x14\x00\x00\x00\x08\x00payload.jpg", "zip"),
        (b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj", "pdf"),
        (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00!", "gif"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "heic"),
    ];
    for (bytes, detected) in cases {
        let e = refusal(bytes);
        assert_eq!(
            e,
            PreprocessError::UnsupportedFormat { detected },
            "{detected}"
        );
        assert_eq!(e.reason(), FailureReason::UnsupportedFormat);
    }
}

#[test]
fn truncated_files_fail_to_decode() {
    let image = photo(640, 480);
    for format in [ImageFormat::Jpeg, ImageFormat::Png] {
        let bytes = encode(&image, format);
        for keep in [bytes.len() / 2, bytes.len() - 20] {
            let e = refusal(&bytes[..keep]);
            assert!(
                matches!(e, PreprocessError::DecodeFailed { .. }),
                "{format:?} cut at {keep}: {e:?}"
            );
            assert_eq!(e.reason(), FailureReason::DecodeFailed);
        }
    }
}

#[test]
fn png_bomb_is_refused_from_the_header_in_bounded_memory() {
    let bomb = png_bomb(60_000, 60_000);
    assert!(bomb.len() < 8 * 1024);
    let e = refusal(&bomb);
    assert_eq!(
        e,
        PreprocessError::SideTooLong {
            width: 60_000,
            height: 60_000,
            max_side: 16_384
        }
    );
    assert_eq!(e.reason(), FailureReason::LimitExceeded);
    // Legal sides, too many pixels.
    let e = refusal(&png_bomb(16_000, 16_000));
    assert!(
        matches!(
            e,
            PreprocessError::TooLarge {
                width: 16_000,
                height: 16_000,
                ..
            }
        ),
        "{e:?}"
    );
    // 60000² RGB would be 10.8 GB; the whole test process stays far below.
    let peak_mb = peak_rss_kb() / 1024;
    assert!(peak_mb < 300, "peak RSS {peak_mb} MB");
}

#[test]
fn jpeg_bomb_is_refused_from_the_header() {
    let small = encode(&photo(64, 64), ImageFormat::Jpeg);
    let e = refusal(&patch_jpeg_size(small.clone(), 65_000, 65_000));
    assert!(
        matches!(e, PreprocessError::SideTooLong { width: 65_000, .. }),
        "{e:?}"
    );
    let e = refusal(&patch_jpeg_size(small, 10_000, 10_000));
    assert!(
        matches!(e, PreprocessError::TooLarge { width: 10_000, .. }),
        "{e:?}"
    );
}

#[test]
fn limits_are_exact_on_both_sides() {
    let limits = Limits {
        max_pixels: 1_000_000,
        max_side: 2_000,
        ..Limits::default()
    };
    let run = |w: u32, h: u32| {
        let bytes = encode(&photo(w, h), ImageFormat::Png);
        prepare(
            &bytes,
            &PrepareOptions {
                limits: limits.clone(),
                ..options()
            },
        )
    };
    assert!(run(1000, 1000).is_ok());
    assert!(matches!(
        run(1001, 1000),
        Err(PreprocessError::TooLarge { .. })
    ));
    assert!(run(2000, 10).is_ok());
    assert!(matches!(
        run(2001, 10),
        Err(PreprocessError::SideTooLong { .. })
    ));

    let bytes = encode(&photo(100, 100), ImageFormat::Png);
    let at = |max_bytes| {
        let limits = Limits {
            max_bytes,
            ..Limits::default()
        };
        prepare(
            &bytes,
            &PrepareOptions {
                limits,
                ..options()
            },
        )
    };
    assert!(at(bytes.len()).is_ok());
    let e = at(bytes.len() - 1).expect_err("one byte over");
    assert!(matches!(e, PreprocessError::TooManyBytes { .. }));
    assert_eq!(e.reason(), FailureReason::LimitExceeded);
}

#[test]
fn a_twelve_megapixel_jpeg_passes_with_default_limits() {
    let image = RgbImage::from_fn(4000, 3000, |x, _| {
        if x < 2000 {
            Rgb([200, 30, 30])
        } else {
            Rgb([30, 30, 200])
        }
    });
    let bytes = encode(&image, ImageFormat::Jpeg);
    let scaled = prepare(&bytes, &options()).expect("legal photo");
    assert_eq!(scaled.source_format, SourceFormat::Jpeg);
    assert_eq!(
        (scaled.original_width, scaled.original_height),
        (4000, 3000)
    );
    assert_eq!(scaled.image.dimensions(), (1152, 896));
    assert_close(*scaled.image.get_pixel(100, 448), [200, 30, 30], 12, "left");
    assert_close(
        *scaled.image.get_pixel(1050, 448),
        [30, 30, 200],
        12,
        "right",
    );
    // The DCT-scaled decode agrees with a full decode up to resampling noise.
    let full = prepare(
        &bytes,
        &PrepareOptions {
            disable_dct_scaling: true,
            ..options()
        },
    )
    .expect("full decode");
    let worst = scaled
        .image
        .as_raw()
        .iter()
        .zip(full.image.as_raw())
        .map(|(a, b)| a.abs_diff(*b))
        .max();
    assert!(worst <= Some(24), "worst channel difference {worst:?}");
}

#[test]
fn jpeg_is_handled_whatever_the_name() {
    // An upload called `photo.png` holding a JPEG: the name never reaches the pipeline.
    let bytes = encode(&photo(300, 200), ImageFormat::Jpeg);
    let p = prepare(&bytes, &options()).expect("jpeg");
    assert_eq!(p.source_format, SourceFormat::Jpeg);
}

#[test]
fn every_exif_orientation_comes_out_upright() {
    for n in 1..=8 {
        let p = prepare(&fixture(&format!("orient_{n}.jpg")), &options())
            .unwrap_or_else(|e| panic!("orientation {n}: {e}"));
        assert_eq!(p.orientation.to_exif(), n);
        assert_eq!(
            (p.original_width, p.original_height),
            (300, 200),
            "orientation {n}"
        );
        assert_eq!(p.image.dimensions(), (1216, 832), "orientation {n}");
        assert_quadrants(&p, 40, &format!("orientation {n}"));
    }
}

#[test]
fn gps_exif_never_reaches_the_output() {
    let bytes = fixture("orient_6.jpg");
    assert!(
        bytes.windows(4).any(|w| w == b"Exif"),
        "fixture carries EXIF"
    );
    let p = prepare(
        &bytes,
        &PrepareOptions {
            canny: Some(Default::default()),
            ..options()
        },
    )
    .expect("prepare");
    for png in [
        encode_png(&p.image),
        encode_png(p.canny.as_ref().expect("canny")),
    ] {
        assert_eq!(
            darkroom_test_support::png_chunks(&png)
                .first()
                .map(String::as_str),
            Some("IHDR")
        );
        assert!(
            darkroom_test_support::png_chunks(&png)
                .iter()
                .all(|k| k == "IHDR" || k == "IDAT" || k == "IEND"),
            "{:?}",
            darkroom_test_support::png_chunks(&png)
        );
        assert!(!png.windows(4).any(|w| w == b"Exif"));
    }
}

#[test]
fn a_huge_exif_block_is_only_skipped() {
    // Sixty 64 KB APP1 segments (3.9 MB of junk metadata) ahead of a small JPEG.
    let jpeg = encode(&photo(300, 200), ImageFormat::Jpeg);
    let mut bytes = jpeg[..2].to_vec();
    for _ in 0..60 {
        bytes.extend_from_slice(&[0xFF, 0xE1, 0xFF, 0xFF]);
        bytes.extend_from_slice(b"Exif\0\0MM\0*");
        bytes.extend(std::iter::repeat_n(0xAB, 0xFFFF - 2 - 10));
    }
    bytes.extend_from_slice(&jpeg[2..]);
    let p = prepare(&bytes, &options()).expect("big metadata, small image");
    assert_eq!(p.image.dimensions(), (1216, 832));
}

#[test]
fn cmyk_jpeg_becomes_rgb() {
    let p = prepare(&fixture("cmyk.jpg"), &options()).expect("cmyk");
    assert_quadrants(&p, 40, "cmyk");
}

#[test]
fn sixteen_bit_grey_and_alpha_pngs_become_rgb8() {
    let rgb16 = image::ImageBuffer::<Rgb<u16>, _>::from_fn(300, 200, |x, _| {
        if x < 150 {
            Rgb([65_535, 0, 0])
        } else {
            Rgb([0, 0, 65_535])
        }
    });
    let mut bytes = Cursor::new(Vec::new());
    rgb16.write_to(&mut bytes, ImageFormat::Png).expect("png16");
    let p = prepare(bytes.get_ref(), &options()).expect("16-bit");
    assert_close(*p.image.get_pixel(100, 400), [255, 0, 0], 2, "16-bit left");

    let grey = image::GrayImage::from_pixel(300, 200, image::Luma([77]));
    let mut bytes = Cursor::new(Vec::new());
    grey.write_to(&mut bytes, ImageFormat::Png).expect("grey");
    let p = prepare(bytes.get_ref(), &options()).expect("grey");
    assert!(p.image.pixels().all(|px| px.0 == [77, 77, 77]));

    // Fully transparent pixels are composited over white, not left as black.
    let clear = image::RgbaImage::from_pixel(300, 200, image::Rgba([0, 0, 0, 0]));
    let mut bytes = Cursor::new(Vec::new());
    clear.write_to(&mut bytes, ImageFormat::Png).expect("rgba");
    let p = prepare(bytes.get_ref(), &options()).expect("rgba");
    assert!(p.image.pixels().all(|px| px.0 == [255, 255, 255]));
}

#[test]
fn palette_png_becomes_rgb8() {
    let p = prepare(&fixture("palette.png"), &options()).expect("palette");
    assert_eq!(p.source_format, SourceFormat::Png);
    assert_quadrants(&p, 8, "palette");
}

#[test]
fn animated_webp_gives_its_first_frame() {
    let path = pillow_fixtures().join("animated.webp");
    if !path.exists() {
        eprintln!("Pillow without WebP: animated WebP not tested");
        return;
    }
    let p = prepare(&fixture("animated.webp"), &options()).expect("animated webp");
    assert_eq!(p.source_format, SourceFormat::Webp);
    assert!(
        p.image.pixels().all(|px| px.0 == [255, 0, 0]),
        "first frame is red"
    );
}

#[test]
fn still_webp_decodes() {
    let bytes = encode(&photo(300, 200), ImageFormat::WebP);
    let p = prepare(&bytes, &options()).expect("webp");
    assert_eq!(p.source_format, SourceFormat::Webp);
    assert_eq!(p.image.dimensions(), (1216, 832));
}

#[test]
fn canny_map_has_the_bucket_size_and_only_black_and_white() {
    let bytes = encode(&photo(640, 480), ImageFormat::Png);
    let p = prepare(
        &bytes,
        &PrepareOptions {
            canny: Some(Default::default()),
            ..options()
        },
    )
    .expect("prepare");
    let canny = p.canny.expect("canny");
    assert_eq!(canny.dimensions(), p.image.dimensions());
    assert!(
        canny
            .pixels()
            .all(|px| px.0 == [0, 0, 0] || px.0 == [255, 255, 255])
    );
    assert!(canny.pixels().any(|px| px.0 == [255, 255, 255]));
}
