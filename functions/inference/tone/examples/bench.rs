//! Speed of tone grading on one 1024×1024 picture, each variant side by side in one run:
//! a plain copy of the pixels (the floor), the grade without and with a 33³ LUT, at full and
//! partial strength, and a straightforward per-pixel version with `powf` instead of tables.
//!
//! ```text
//! cargo run --release -p darkroom-tone --example bench
//! ```
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use darkroom_tone::adaptation::white_balance;
use darkroom_tone::transfer::{linear_to_srgb, srgb_to_linear};
use darkroom_tone::{CubeLimits, CubeLut, ToneGrade, ToneSettings};
use image::RgbImage;

const SIDE: u32 = 1024;
const ROUNDS: usize = 41;

/// A picture of smooth gradients with some noise, so no branch or cache pattern is trivial.
fn picture() -> RgbImage {
    let mut state = 0x9e37_79b9_u32;
    RgbImage::from_fn(SIDE, SIDE, |x, y| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let noise = state & 31;
        image::Rgb([
            ((x * 255 / SIDE + noise) % 256) as u8,
            ((y * 255 / SIDE + noise) % 256) as u8,
            (((x + y) * 255 / (2 * SIDE) + noise) % 256) as u8,
        ])
    })
}

/// Time this thread has spent on a CPU (`CLOCK_THREAD_CPUTIME_ID`): unlike wall time, it does
/// not grow while other processes have the core.
fn on_cpu() -> Option<Duration> {
    let time = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Some(Duration::new(
        u64::try_from(time.tv_sec).ok()?,
        u32::try_from(time.tv_nsec).ok()?,
    ))
}

/// Medians over `ROUNDS` runs of `work` on a fresh copy of `source`: wall time, and time on a
/// CPU where the system tells it.
fn time(source: &RgbImage, mut work: impl FnMut(&mut RgbImage)) -> (Duration, Option<Duration>) {
    let mut walls = Vec::with_capacity(ROUNDS);
    let mut cpus = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let mut image = source.clone();
        let cpu_start = on_cpu();
        let start = Instant::now();
        work(black_box(&mut image));
        walls.push(start.elapsed());
        if let (Some(begin), Some(end)) = (cpu_start, on_cpu()) {
            cpus.push(end.saturating_sub(begin));
        }
        black_box(&image);
    }
    walls.sort();
    cpus.sort();
    (walls[ROUNDS / 2], cpus.get(cpus.len() / 2).copied())
}

/// The grade written plainly: exact curves in f64 for every sample, no tables.
fn naive_grade(image: &mut RgbImage, matrix: &[[f64; 3]; 3]) {
    for pixel in image.pixels_mut() {
        let linear = pixel.0.map(|value| srgb_to_linear(value as f64 / 255.0));
        for (channel, row) in matrix.iter().enumerate() {
            let value = row[0] * linear[0] + row[1] * linear[1] + row[2] * linear[2];
            pixel[channel] = (linear_to_srgb(value.clamp(0.0, 1.0)) * 255.0).round() as u8;
        }
    }
}

fn main() {
    let source = picture();
    let mut cube = String::from("LUT_3D_SIZE 33\n");
    for blue in 0..33 {
        for green in 0..33 {
            for red in 0..33 {
                let [r, g, b] = [red, green, blue].map(|index| index as f64 / 32.0);
                // A mild "film" look: lifted blacks, a little cross-talk.
                cube.push_str(&format!(
                    "{:.6} {:.6} {:.6}\n",
                    0.03 + 0.94 * (0.9 * r + 0.1 * g),
                    0.03 + 0.94 * g,
                    0.03 + 0.94 * (0.1 * r + 0.9 * b)
                ));
            }
        }
    }
    let lut = CubeLut::parse(&cube, &CubeLimits::default()).unwrap();
    let warm = ToneSettings {
        temperature_k: 5200.0,
        tint: 0.02,
        strength: 1.0,
    };
    let partial = ToneSettings {
        strength: 0.8,
        ..warm.clone()
    };
    let grade = |settings: &ToneSettings, lut| ToneGrade::new(settings, lut).unwrap();
    // Build the process's tables before timing.
    grade(&warm, None).apply(&mut source.clone());

    let matrix = white_balance(warm.temperature_k, warm.tint);
    let rows: Vec<(&str, (Duration, Option<Duration>))> = vec![
        (
            "write every byte (floor)",
            time(&source, |image| image.fill(1)),
        ),
        (
            "white balance",
            time(&source, |image| grade(&warm, None).apply(image)),
        ),
        (
            "white balance, strength 0.8",
            time(&source, |image| grade(&partial, None).apply(image)),
        ),
        (
            "white balance + 33³ LUT",
            time(&source, |image| grade(&warm, Some(&lut)).apply(image)),
        ),
        (
            "white balance + LUT, strength 0.8",
            time(&source, |image| grade(&partial, Some(&lut)).apply(image)),
        ),
        (
            "naive: f64 powf per sample",
            time(&source, |image| naive_grade(image, &matrix)),
        ),
    ];
    let reference = rows[1].1;
    println!("tone grading, {SIDE}×{SIDE} RGB, medians of {ROUNDS} runs, one thread");
    println!(
        "{:<36} {:>9} {:>11} {:>12} {:>14}",
        "variant", "wall ms", "on-CPU ms", "MP/s (CPU)", "× white bal."
    );
    for (name, (wall, cpu)) in rows {
        let cpu_ms = cpu.map(|cpu| cpu.as_secs_f64() * 1e3);
        let base = reference.1.unwrap_or(reference.0).as_secs_f64() * 1e3;
        let own = cpu_ms.unwrap_or(wall.as_secs_f64() * 1e3);
        println!(
            "{name:<36} {:>9.2} {:>11} {:>12.0} {:>14.2}",
            wall.as_secs_f64() * 1e3,
            cpu_ms.map_or("n/a".to_owned(), |ms| format!("{ms:.2}")),
            (SIDE * SIDE) as f64 / own / 1e3,
            own / base
        );
    }
}
