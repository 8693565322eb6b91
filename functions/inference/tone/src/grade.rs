//! The grade as a whole: settings checked once, then one pass over the pixels.

use image::RgbImage;

use crate::adaptation::white_balance;
use crate::cube::CubeLut;
use crate::transfer::{Tables, encode_8bit_index, to_8bit, unit};
use crate::white_point::{MAX_TEMPERATURE_K, MIN_TEMPERATURE_K, NEUTRAL_TEMPERATURE_K};
use crate::{Result, ToneError};

/// Pixels graded together by the matrix-only paths.
const BLOCK: usize = 16;

/// What a preset's `[tone]` table (or a job's `render.tone`) asks for, LUT aside.
#[derive(Debug, Clone, PartialEq)]
pub struct ToneSettings {
    /// Colour temperature of the light the picture is graded to, kelvin, 1000–40000 (default
    /// 6500, neutral): below 6500 warmer, above cooler.
    pub temperature_k: f64,
    /// Green (−) / magenta (+) shift, −1 to 1 (default 0); ±1 moves the light's chromaticity
    /// 0.05 off the blackbody locus in CIE 1960 (u, v).
    pub tint: f64,
    /// Blend of the toned picture over the untoned one in linear light, 0–1 (default 1).
    pub strength: f64,
}

impl Default for ToneSettings {
    fn default() -> Self {
        ToneSettings {
            temperature_k: NEUTRAL_TEMPERATURE_K,
            tint: 0.0,
            strength: 1.0,
        }
    }
}

impl ToneSettings {
    /// Checks every setting's range (NaN is out of every range).
    pub fn validate(&self) -> Result<()> {
        let check = |field, value: f64, min, max| {
            if (min..=max).contains(&value) {
                Ok(())
            } else {
                Err(ToneError::OutOfRange {
                    field,
                    value,
                    min,
                    max,
                })
            }
        };
        check(
            "temperature_k",
            self.temperature_k,
            MIN_TEMPERATURE_K,
            MAX_TEMPERATURE_K,
        )?;
        check("tint", self.tint, -1.0, 1.0)?;
        check("strength", self.strength, 0.0, 1.0)
    }
}

/// A grade ready to apply: the white-balance matrix, the strength, and the LUT it borrows.
#[derive(Debug, Clone)]
pub struct ToneGrade<'lut> {
    /// Linear sRGB → linear sRGB, rows first.
    white_balance: [[f32; 3]; 3],
    strength: f32,
    lut: Option<&'lut CubeLut>,
}

impl<'lut> ToneGrade<'lut> {
    /// Checks `settings` and builds the grade; `lut`, if any, is applied after the white
    /// balance.
    pub fn new(settings: &ToneSettings, lut: Option<&'lut CubeLut>) -> Result<ToneGrade<'lut>> {
        settings.validate()?;
        let matrix = white_balance(settings.temperature_k, settings.tint);
        Ok(ToneGrade {
            white_balance: matrix.map(|row| row.map(|cell| cell as f32)),
            strength: settings.strength as f32,
            lut,
        })
    }

    /// The white-balance matrix on linear sRGB (rows first).
    pub fn white_balance(&self) -> [[f32; 3]; 3] {
        self.white_balance
    }

    /// Grades `image` in place.
    pub fn apply(&self, image: &mut RgbImage) {
        if self.strength == 0.0 {
            return;
        }
        let tables = Tables::get();
        let samples: &mut [u8] = image;
        // Without a LUT, whole blocks of pixels go through the matrix together (see
        // `grade_block`); what is left, and every pixel with a LUT, one at a time.
        let mut blocks = samples.chunks_exact_mut(3 * BLOCK);
        match (self.lut, self.strength == 1.0) {
            (None, true) => blocks
                .by_ref()
                .for_each(|block| self.grade_block::<false>(tables, block)),
            (None, false) => blocks
                .by_ref()
                .for_each(|block| self.grade_block::<true>(tables, block)),
            (Some(_), _) => {}
        }
        let rest = match self.lut {
            None => blocks.into_remainder(),
            Some(_) => samples,
        };
        for pixel in rest.chunks_exact_mut(3) {
            let graded = self.grade(tables, [pixel[0], pixel[1], pixel[2]]);
            pixel.copy_from_slice(&graded);
        }
    }

    /// Grades `BLOCK` pixels without a LUT, as [`ToneGrade::grade`] would one by one, but a
    /// stage at a time over the block (decode, matrix and blend, table index, lookup), so the
    /// arithmetic runs in vector registers, several pixels per instruction.
    #[inline(always)]
    fn grade_block<const BLEND: bool>(&self, tables: &Tables, block: &mut [u8]) {
        let mut linear = [[0.0f32; BLOCK]; 3];
        for (pixel, samples) in block.chunks_exact(3).enumerate() {
            for channel in 0..3 {
                linear[channel][pixel] = tables.decode_8bit[samples[channel] as usize];
            }
        }
        let m = &self.white_balance;
        let strength = self.strength;
        let mut index = [[0u16; BLOCK]; 3];
        for pixel in 0..BLOCK {
            let [r, g, b] = [linear[0][pixel], linear[1][pixel], linear[2][pixel]];
            for channel in 0..3 {
                let balanced = m[channel][0] * r + m[channel][1] * g + m[channel][2] * b;
                let value = if BLEND {
                    let own = linear[channel][pixel];
                    own + strength * (unit(balanced) - own)
                } else {
                    balanced
                };
                index[channel][pixel] = encode_8bit_index(value);
            }
        }
        for (pixel, samples) in block.chunks_exact_mut(3).enumerate() {
            for channel in 0..3 {
                samples[channel] = tables.encode_8bit_at(index[channel][pixel]);
            }
        }
    }

    /// Grades one 8-bit sRGB colour, exactly as [`ToneGrade::apply`] grades a pixel.
    pub fn apply_to_colour(&self, colour: [u8; 3]) -> [u8; 3] {
        if self.strength == 0.0 {
            return colour;
        }
        self.grade(Tables::get(), colour)
    }

    // Written channel by channel: `[T; 3]::map` is not always inlined, and this runs a million
    // times a picture.
    #[inline(always)]
    fn grade(&self, tables: &Tables, colour: [u8; 3]) -> [u8; 3] {
        let linear = [
            tables.decode_8bit[colour[0] as usize],
            tables.decode_8bit[colour[1] as usize],
            tables.decode_8bit[colour[2] as usize],
        ];
        let m = &self.white_balance;
        let balanced = [
            m[0][0] * linear[0] + m[0][1] * linear[1] + m[0][2] * linear[2],
            m[1][0] * linear[0] + m[1][1] * linear[1] + m[1][2] * linear[2],
            m[2][0] * linear[0] + m[2][1] * linear[1] + m[2][2] * linear[2],
        ];
        let full = self.strength == 1.0;
        let toned = match self.lut {
            None if full => {
                return [
                    tables.encode_8bit(balanced[0]),
                    tables.encode_8bit(balanced[1]),
                    tables.encode_8bit(balanced[2]),
                ];
            }
            None => [unit(balanced[0]), unit(balanced[1]), unit(balanced[2])],
            Some(lut) => {
                let looked_up = lut.sample([
                    tables.encode(balanced[0]),
                    tables.encode(balanced[1]),
                    tables.encode(balanced[2]),
                ]);
                if full {
                    return [
                        to_8bit(looked_up[0]),
                        to_8bit(looked_up[1]),
                        to_8bit(looked_up[2]),
                    ];
                }
                [
                    tables.decode(looked_up[0]),
                    tables.decode(looked_up[1]),
                    tables.decode(looked_up[2]),
                ]
            }
        };
        let strength = self.strength;
        let mix = |channel: usize| {
            let mixed = linear[channel] + strength * (toned[channel] - linear[channel]);
            tables.encode_8bit(mixed)
        };
        [mix(0), mix(1), mix(2)]
    }
}
