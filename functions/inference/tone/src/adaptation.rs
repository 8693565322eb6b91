//! White balance as a chromatic adaptation: one 3×3 matrix on linear sRGB.
//!
//! A grade to temperature T (and tint) renders the picture as if its light were that of
//! [`white_point`]`(T, tint)` instead of the neutral 6500 K (D65, sRGB's white): a surface
//! that was neutral grey takes on the colour of the new light, at the same luminance. So
//! **5000 K looks warmer** (a grey card comes out yellowish: R/B rises) and **8000 K cooler**
//! (bluish: R/B falls). This is the "light" sense of a temperature, as in a lighting preset;
//! a raw converter's white-balance slider uses the opposite sense (it *corrects for* a light
//! of that temperature, so 5000 K there cools the picture).
//!
//! The adaptation is the linearised Bradford transform (a von Kries scaling in Bradford's
//! sharpened cone space; K. M. Lam, 1985, as used by ICC v4 and by Lindbloom's tables):
//! `A = B⁻¹ · diag(B·W_dst / B·W_src) · B` in CIE XYZ, with both whites at Y = 1 so luminance
//! of neutrals is kept. It is carried to linear sRGB as `M = S⁻¹ · A · S`, S being the
//! IEC 61966-2-1 sRGB→XYZ matrix. The source white is [`illuminant`]`(6500)` from the same
//! formula as the destination, so 6500 K with no tint is exactly the identity (it differs from
//! sRGB's D65 by 10⁻⁴ in y, far below one 8-bit level).
//!
//! [`white_point`]: crate::white_point::white_point
//! [`illuminant`]: crate::white_point::illuminant

use crate::white_point::{NEUTRAL_TEMPERATURE_K, illuminant, white_point};

/// A 3×3 matrix, rows first; it multiplies column vectors.
pub type Matrix3 = [[f64; 3]; 3];

/// The Bradford cone-response matrix (XYZ → sharpened LMS).
pub const BRADFORD: Matrix3 = [
    [0.8951, 0.2664, -0.1614],
    [-0.7502, 1.7135, 0.0367],
    [0.0389, -0.0685, 1.0296],
];

/// Linear sRGB → CIE XYZ (IEC 61966-2-1), D65 white.
pub const SRGB_TO_XYZ: Matrix3 = [
    [0.4124, 0.3576, 0.1805],
    [0.2126, 0.7152, 0.0722],
    [0.0193, 0.1192, 0.9505],
];

/// The identity matrix.
pub const IDENTITY: Matrix3 = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];

/// `a · b`.
pub fn multiply(a: &Matrix3, b: &Matrix3) -> Matrix3 {
    let mut product = [[0.0; 3]; 3];
    for (row, product_row) in product.iter_mut().enumerate() {
        for (column, cell) in product_row.iter_mut().enumerate() {
            *cell = (0..3).map(|k| a[row][k] * b[k][column]).sum();
        }
    }
    product
}

/// `m · v`.
pub fn transform(m: &Matrix3, v: [f64; 3]) -> [f64; 3] {
    [0, 1, 2].map(|row| m[row][0] * v[0] + m[row][1] * v[1] + m[row][2] * v[2])
}

/// The inverse of `m` by its adjugate. Only called on the constant, well-conditioned
/// matrices above (determinants 0.94 and 0.22 for Bradford and sRGB).
pub fn invert(m: &Matrix3) -> Matrix3 {
    let cofactor =
        |r0: usize, r1: usize, c0: usize, c1: usize| m[r0][c0] * m[r1][c1] - m[r0][c1] * m[r1][c0];
    let adjugate = [
        [
            cofactor(1, 2, 1, 2),
            -cofactor(0, 2, 1, 2),
            cofactor(0, 1, 1, 2),
        ],
        [
            -cofactor(1, 2, 0, 2),
            cofactor(0, 2, 0, 2),
            -cofactor(0, 1, 0, 2),
        ],
        [
            cofactor(1, 2, 0, 1),
            -cofactor(0, 2, 0, 1),
            cofactor(0, 1, 0, 1),
        ],
    ];
    let determinant =
        m[0][0] * adjugate[0][0] + m[0][1] * adjugate[1][0] + m[0][2] * adjugate[2][0];
    adjugate.map(|row| row.map(|cell| cell / determinant))
}

/// The Bradford adaptation in CIE XYZ that maps the white `source` (XYZ) to the white
/// `destination` (XYZ).
pub fn bradford(source: [f64; 3], destination: [f64; 3]) -> Matrix3 {
    let source_cones = transform(&BRADFORD, source);
    let destination_cones = transform(&BRADFORD, destination);
    let mut gains = [[0.0; 3]; 3];
    for channel in 0..3 {
        gains[channel][channel] = destination_cones[channel] / source_cones[channel];
    }
    multiply(&invert(&BRADFORD), &multiply(&gains, &BRADFORD))
}

/// The white-balance matrix on linear sRGB for a grade to `temperature_k` and `tint` (see the
/// module documentation). Arguments are not range-checked here; [`crate::ToneGrade::new`]
/// does that.
pub fn white_balance(temperature_k: f64, tint: f64) -> Matrix3 {
    let source = illuminant(NEUTRAL_TEMPERATURE_K).to_xy().to_xyz();
    let destination = white_point(temperature_k, tint).to_xyz();
    let xyz = bradford(source, destination);
    multiply(&invert(&SRGB_TO_XYZ), &multiply(&xyz, &SRGB_TO_XYZ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::white_point::Xy;

    fn assert_matrix(actual: &Matrix3, expected: &Matrix3, tolerance: f64) {
        for row in 0..3 {
            for column in 0..3 {
                assert!(
                    (actual[row][column] - expected[row][column]).abs() <= tolerance,
                    "[{row}][{column}]: {actual:?} vs {expected:?}"
                );
            }
        }
    }

    #[test]
    fn bradford_d65_to_d50_is_the_published_matrix() {
        // B. Lindbloom, "Chromatic Adaptation", Bradford D65 → D50, with his whites
        // D65 = (0.95047, 1, 1.08883) and D50 = (0.96422, 1, 0.82521).
        let published = [
            [1.0478112, 0.0228866, -0.0501270],
            [0.0295424, 0.9904844, -0.0170491],
            [-0.0092345, 0.0150436, 0.7521316],
        ];
        let adapted = bradford([0.95047, 1.0, 1.08883], [0.96422, 1.0, 0.82521]);
        assert_matrix(&adapted, &published, 2e-7);
    }

    #[test]
    fn the_neutral_grade_is_the_identity() {
        assert_matrix(&white_balance(6500.0, 0.0), &IDENTITY, 1e-12);
        assert_matrix(
            &multiply(&SRGB_TO_XYZ, &invert(&SRGB_TO_XYZ)),
            &IDENTITY,
            1e-12,
        );
    }

    #[test]
    fn grey_takes_the_colour_of_the_new_light_at_the_same_luminance() {
        for (kelvin, tint) in [
            (2700.0, 0.0),
            (5200.0, 0.02),
            (7500.0, -0.02),
            (12000.0, 0.5),
        ] {
            let grey = transform(&white_balance(kelvin, tint), [0.2, 0.2, 0.2]);
            let [x, y, z] = transform(&SRGB_TO_XYZ, grey);
            let chromaticity = Xy {
                x: x / (x + y + z),
                y: y / (x + y + z),
            };
            let expected = white_point(kelvin, tint);
            // sRGB's own white (0.3127, 0.3290) sits 1.1 × 10⁻⁴ from illuminant(6500).
            assert!(
                (chromaticity.x - expected.x).abs() < 3e-4
                    && (chromaticity.y - expected.y).abs() < 3e-4,
                "{kelvin} K: {chromaticity:?} vs {expected:?}"
            );
            assert!((y - 0.2).abs() < 1e-4, "luminance {y}");
        }
    }
}
