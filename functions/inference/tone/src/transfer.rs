//! The sRGB transfer function (IEC 61966-2-1), exact and as tables for the pixel loop.
//!
//! Decoding an 8-bit value is one lookup in a 256-entry table. Encoding a linear value
//! straight to 8 bits is one lookup in a 65536-entry table of bytes (64 KiB), indexed by the
//! linear value rounded to 1/65535: that rounding moves the encoded value by at most 0.025 of
//! a level (where the curve is steepest, its linear toe), so the result is the correctly
//! rounded level except within 0.025 of a half-level. Where a fractional encoded value is
//! needed (a LUT's input) or a fractional one decoded (a LUT's output), the exact curve is
//! interpolated linearly between [`TABLE_STEPS`]` + 1` samples: the worst error, where the
//! curve bends most (just above the toe), is 2 × 10⁻⁵, or 0.005 of a level. Every 8-bit value
//! survives decode → encode unchanged.

use std::sync::OnceLock;

/// Intervals in the interpolated tables.
pub const TABLE_STEPS: usize = 4096;

/// The exact sRGB decoding: encoded value in [0, 1] → linear light.
pub fn srgb_to_linear(encoded: f64) -> f64 {
    if encoded <= 0.04045 {
        encoded / 12.92
    } else {
        ((encoded + 0.055) / 1.055).powf(2.4)
    }
}

/// The exact sRGB encoding: linear light in [0, 1] → encoded value.
pub fn linear_to_srgb(linear: f64) -> f64 {
    if linear <= 0.0031308 {
        linear * 12.92
    } else {
        1.055 * linear.powf(1.0 / 2.4) - 0.055
    }
}

/// Entries of the linear → 8-bit table, less one.
const DIRECT_STEPS: usize = 65535;

/// The tables, built once per process on first use (about 74 000 evaluations of the curves,
/// a few milliseconds).
pub(crate) struct Tables {
    /// Linear light of each 8-bit sRGB value.
    pub(crate) decode_8bit: [f32; 256],
    /// The 8-bit level of linear light `i / DIRECT_STEPS`; a `u16` index needs no bounds check.
    encode_8bit: Box<[u8; DIRECT_STEPS + 1]>,
    /// [`linear_to_srgb`] at `i / TABLE_STEPS`, plus one guard entry.
    encode: Vec<f32>,
    /// [`srgb_to_linear`] at `i / TABLE_STEPS`, plus one guard entry.
    decode: Vec<f32>,
}

impl Tables {
    /// The process's tables.
    pub(crate) fn get() -> &'static Tables {
        static TABLES: OnceLock<Tables> = OnceLock::new();
        TABLES.get_or_init(|| {
            let sample = |curve: fn(f64) -> f64| {
                let mut table: Vec<f32> = (0..=TABLE_STEPS)
                    .map(|i| curve(i as f64 / TABLE_STEPS as f64) as f32)
                    .collect();
                // The guard entry lets an input of exactly 1.0 read table[i + 1].
                table.push(1.0);
                table
            };
            Tables {
                decode_8bit: std::array::from_fn(|value| {
                    srgb_to_linear(value as f64 / 255.0) as f32
                }),
                encode_8bit: Box::new(std::array::from_fn(|i| {
                    (linear_to_srgb(i as f64 / DIRECT_STEPS as f64) * 255.0).round() as u8
                })),
                encode: sample(linear_to_srgb),
                decode: sample(srgb_to_linear),
            }
        })
    }

    /// Linear light → 8-bit sRGB, clamped to [0, 1].
    #[inline]
    pub(crate) fn encode_8bit(&self, linear: f32) -> u8 {
        self.encode_8bit_at(encode_8bit_index(linear))
    }

    /// The entry [`encode_8bit_index`] chose.
    #[inline]
    pub(crate) fn encode_8bit_at(&self, index: u16) -> u8 {
        self.encode_8bit[index as usize]
    }

    /// Linear light → sRGB-encoded, clamped to [0, 1].
    #[inline]
    pub(crate) fn encode(&self, linear: f32) -> f32 {
        interpolate(&self.encode, linear)
    }

    /// sRGB-encoded → linear light, clamped to [0, 1].
    #[inline]
    pub(crate) fn decode(&self, encoded: f32) -> f32 {
        interpolate(&self.decode, encoded)
    }
}

/// Where [`Tables::encode_8bit`] looks `linear` up; apart so a block of pixels can compute its
/// indices in vector registers before the lookups.
#[inline]
pub(crate) fn encode_8bit_index(linear: f32) -> u16 {
    // In [0, 65535] by construction.
    scaled_unit(linear, DIRECT_STEPS as f32, 0.5) as u16
}

/// `x` clamped to [0, 1], a NaN to 0 (which `f32::clamp` would pass through).
#[inline]
#[allow(clippy::manual_clamp)]
pub(crate) fn unit(x: f32) -> f32 {
    x.max(0.0).min(1.0)
}

/// `x` clamped to [0, 1] (a NaN to 0), times `scale`, plus `offset`, truncated. Goes through
/// `i32`, whose conversions from and to `f32` are a single instruction, unlike `usize`'s.
#[inline]
fn scaled_unit(x: f32, scale: f32, offset: f32) -> i32 {
    (unit(x) * scale + offset) as i32
}

/// Reads `table` (samples at `i / TABLE_STEPS` plus a guard) at `x` clamped to [0, 1].
#[inline]
fn interpolate(table: &[f32], x: f32) -> f32 {
    let position = unit(x) * TABLE_STEPS as f32;
    let index = scaled_unit(x, TABLE_STEPS as f32, 0.0);
    let fraction = position - index as f32;
    let index = index as usize;
    match (table.get(index), table.get(index + 1)) {
        (Some(&low), Some(&high)) => low + fraction * (high - low),
        _ => 0.0,
    }
}

/// An encoded value in [0, 1] (clamped) to the nearest 8-bit level.
#[inline]
pub(crate) fn to_8bit(encoded: f32) -> u8 {
    scaled_unit(encoded, 255.0, 0.5) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_curves_are_inverse_and_continuous() {
        for i in 0..=1000 {
            let x = i as f64 / 1000.0;
            assert!((linear_to_srgb(srgb_to_linear(x)) - x).abs() < 1e-12);
        }
        // The two pieces meet (to the rounding of the standard's constants).
        assert!((srgb_to_linear(0.04045) - ((0.04045f64 + 0.055) / 1.055).powf(2.4)).abs() < 1e-7);
        assert!(
            (linear_to_srgb(0.0031308) - (1.055 * 0.0031308f64.powf(1.0 / 2.4) - 0.055)).abs()
                < 1e-7
        );
    }

    #[test]
    fn tables_follow_the_exact_curves() {
        let tables = Tables::get();
        let mut worst_encode: f64 = 0.0;
        let mut worst_decode: f64 = 0.0;
        for i in 0..=100_000 {
            let x = i as f64 / 100_000.0;
            worst_encode =
                worst_encode.max((tables.encode(x as f32) as f64 - linear_to_srgb(x)).abs());
            worst_decode =
                worst_decode.max((tables.decode(x as f32) as f64 - srgb_to_linear(x)).abs());
        }
        assert!(worst_encode < 3e-5, "encode error {worst_encode}");
        assert!(worst_decode < 1e-6, "decode error {worst_decode}");
        assert_eq!(tables.encode(-0.5), 0.0);
        assert_eq!(tables.encode(7.0), 1.0);
        assert_eq!(tables.encode(f32::NAN), 0.0);
    }

    #[test]
    fn every_8bit_value_round_trips() {
        let tables = Tables::get();
        for value in 0..=255u8 {
            let linear = tables.decode_8bit[value as usize];
            assert_eq!(to_8bit(tables.encode(linear)), value);
            assert_eq!(tables.encode_8bit(linear), value);
        }
    }

    #[test]
    fn the_direct_table_rounds_correctly_away_from_half_levels() {
        let tables = Tables::get();
        let mut wrong = 0;
        for i in 0..=1_000_000 {
            let linear = i as f64 / 1_000_000.0;
            let exact = linear_to_srgb(linear) * 255.0;
            let got = tables.encode_8bit(linear as f32);
            if (exact.fract() - 0.5).abs() > 0.025 {
                assert_eq!(got, exact.round() as u8, "linear {linear}");
            } else if got != exact.round() as u8 {
                wrong += 1;
                assert_eq!(got.abs_diff(exact.round() as u8), 1);
            }
        }
        assert!(
            wrong < 2000,
            "{wrong} of a million off by one near half-levels"
        );
        assert_eq!(tables.encode_8bit(-1.0), 0);
        assert_eq!(tables.encode_8bit(2.0), 255);
        assert_eq!(tables.encode_8bit(f32::NAN), 0);
    }
}
