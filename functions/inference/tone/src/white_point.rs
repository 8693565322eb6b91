//! The chromaticity of the light a picture is graded to: a colour temperature on the
//! blackbody / daylight locus, moved off it by a tint.
//!
//! # Temperature
//!
//! Temperatures are *nominal*, as in the names of the CIE illuminants D50 and D65: the CIE
//! defined the D series when the second radiation constant was c₂ = 1.4380 × 10⁻² m·K, and its
//! current value is 1.4388 × 10⁻² m·K, so D65 is a 6504 K light. [`illuminant`] multiplies the
//! nominal temperature by 1.4388 / 1.4380 before evaluating the locus, which makes `5000` D50
//! and `6500` D65 (to 2 × 10⁻⁴ in x and y; the published D-series values come from spectral
//! tables, not the polynomial).
//!
//! The locus itself, as a function of the correlated colour temperature T (kelvin):
//!
//! - **T ≤ 4000 K: the Planckian (blackbody) locus**, Krystek's rational approximation in CIE
//!   1960 (u, v), accurate to about 10⁻⁵ from 1000 K to 15000 K (M. Krystek, "An algorithm to
//!   calculate correlated colour temperature", *Color Research & Application* 10(1), 1985):
//!   `u = (0.860117757 + 1.54118254e-4 T + 1.28641212e-7 T²) / (1 + 8.42420235e-4 T + 7.08145163e-7 T²)`,
//!   `v = (0.317398726 + 4.22806245e-5 T + 4.20481691e-8 T²) / (1 − 2.89741816e-5 T + 1.61456053e-7 T²)`.
//!   Incandescent light (2700–3200 K) is a blackbody.
//! - **T ≥ 5000 K: the CIE daylight locus** (CIE 15:2004, eq. 3.3–3.4):
//!   `x = −4.6070e9/T³ + 2.9678e6/T² + 0.09911e3/T + 0.244063` for T ≤ 7000 K,
//!   `x = −2.0064e9/T³ + 1.9018e6/T² + 0.24748e3/T + 0.237040` above, `y = −3x² + 2.87x − 0.275`.
//!   The CIE defines it for 4000–25000 K; from 25000 K to 40000 K the polynomial in 1/T is
//!   extrapolated (1/T moves from 4.0 × 10⁻⁵ to 2.5 × 10⁻⁵, and x keeps falling smoothly towards
//!   its limit 0.23704).
//! - **4000–5000 K: a blend.** At 4000 K daylight lies 0.007 in y (0.0028 in (u, v)) above the
//!   blackbody, so switching from one locus to the other would jump. Between 4000 K and
//!   5000 K the two are mixed in (u, v) with weight `w = s²(3 − 2s)` (smoothstep), `s` going
//!   from 0 to 1 linearly in reciprocal temperature (mired): continuous, with a continuous
//!   first derivative.
//!
//! # Tint
//!
//! Tint moves the white point perpendicular to the locus in CIE 1960 (u, v), the plane in
//! which lines of constant correlated colour temperature are normal to the blackbody locus, and
//! in which the distance from the locus, Duv, is measured (ANSI C78.377). Positive tint is
//! **magenta** (below the locus, towards the purples, negative Duv); negative tint is
//! **green** (above it). Full scale, ±1, is a Duv of ∓[`TINT_DUV_AT_FULL_SCALE`] (0.05), a heavy
//! cast: about eight times the ±0.006 that ANSI C78.377 allows a white lamp. The direction of
//! the normal is taken from the locus's tangent by central differences (±0.5 mired).

/// Lowest temperature accepted, kelvin.
pub const MIN_TEMPERATURE_K: f64 = 1000.0;

/// Highest temperature accepted, kelvin.
pub const MAX_TEMPERATURE_K: f64 = 40000.0;

/// The neutral temperature: D65, the white of sRGB. Grading to it with no tint changes nothing.
pub const NEUTRAL_TEMPERATURE_K: f64 = 6500.0;

/// Distance from the locus in CIE 1960 (u, v) of a tint of ±1.
pub const TINT_DUV_AT_FULL_SCALE: f64 = 0.05;

/// Converts a nominal temperature (the CIE's c₂ = 1.4380 × 10⁻² m·K) to today's scale.
const NOMINAL_TO_CCT: f64 = 1.4388 / 1.4380;

/// Below this correlated colour temperature the locus is the blackbody's.
const BLACKBODY_UNTIL_K: f64 = 4000.0;

/// From this correlated colour temperature on the locus is daylight's.
const DAYLIGHT_FROM_K: f64 = 5000.0;

/// Half the step, in mired, of the central difference that gives the locus's tangent.
const TANGENT_HALF_STEP_MIRED: f64 = 0.5;

/// A CIE 1931 chromaticity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Xy {
    /// x.
    pub x: f64,
    /// y.
    pub y: f64,
}

/// A CIE 1960 UCS chromaticity (the plane in which Duv is measured).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Uv {
    /// u.
    pub u: f64,
    /// v.
    pub v: f64,
}

impl Xy {
    /// The same colour in CIE 1960 (u, v).
    pub fn to_uv(self) -> Uv {
        let denominator = -2.0 * self.x + 12.0 * self.y + 3.0;
        Uv {
            u: 4.0 * self.x / denominator,
            v: 6.0 * self.y / denominator,
        }
    }

    /// CIE XYZ of this chromaticity at luminance Y = 1.
    pub fn to_xyz(self) -> [f64; 3] {
        [self.x / self.y, 1.0, (1.0 - self.x - self.y) / self.y]
    }
}

impl Uv {
    /// The same colour in CIE 1931 (x, y).
    pub fn to_xy(self) -> Xy {
        let denominator = 2.0 * self.u - 8.0 * self.v + 4.0;
        Xy {
            x: 3.0 * self.u / denominator,
            y: 2.0 * self.v / denominator,
        }
    }

    /// Euclidean distance in the (u, v) plane.
    pub fn distance(self, other: Uv) -> f64 {
        (self.u - other.u).hypot(self.v - other.v)
    }
}

/// The blackbody at correlated colour temperature `cct_k` (today's scale), by Krystek's
/// approximation (1000–15000 K).
pub fn planckian_locus(cct_k: f64) -> Uv {
    let t = cct_k;
    let t2 = t * t;
    Uv {
        u: (0.860117757 + 1.54118254e-4 * t + 1.28641212e-7 * t2)
            / (1.0 + 8.42420235e-4 * t + 7.08145163e-7 * t2),
        v: (0.317398726 + 4.22806245e-5 * t + 4.20481691e-8 * t2)
            / (1.0 - 2.89741816e-5 * t + 1.61456053e-7 * t2),
    }
}

/// CIE daylight at correlated colour temperature `cct_k` (today's scale); defined for
/// 4000–25000 K, extrapolated above.
pub fn daylight_locus(cct_k: f64) -> Xy {
    let t = cct_k;
    let (a3, a2, a1, a0) = if t <= 7000.0 {
        (-4.6070e9, 2.9678e6, 0.09911e3, 0.244063)
    } else {
        (-2.0064e9, 1.9018e6, 0.24748e3, 0.237040)
    };
    let x = a3 / (t * t * t) + a2 / (t * t) + a1 / t + a0;
    Xy {
        x,
        y: -3.0 * x * x + 2.87 * x - 0.275,
    }
}

/// The light of nominal colour temperature `temperature_k`: blackbody up to 4000 K, daylight
/// from 5000 K, blended between (see the module documentation). Any positive temperature is
/// evaluated; callers keep to [`MIN_TEMPERATURE_K`]–[`MAX_TEMPERATURE_K`].
pub fn illuminant(temperature_k: f64) -> Uv {
    let cct = temperature_k * NOMINAL_TO_CCT;
    if cct <= BLACKBODY_UNTIL_K {
        return planckian_locus(cct);
    }
    let daylight = daylight_locus(cct).to_uv();
    if cct >= DAYLIGHT_FROM_K {
        return daylight;
    }
    let s =
        (1.0 / BLACKBODY_UNTIL_K - 1.0 / cct) / (1.0 / BLACKBODY_UNTIL_K - 1.0 / DAYLIGHT_FROM_K);
    let weight = s * s * (3.0 - 2.0 * s);
    let blackbody = planckian_locus(cct);
    Uv {
        u: blackbody.u + weight * (daylight.u - blackbody.u),
        v: blackbody.v + weight * (daylight.v - blackbody.v),
    }
}

/// The unit normal to the locus at `temperature_k` in (u, v), pointing to the magenta side
/// (towards lower v).
pub fn magenta_normal(temperature_k: f64) -> Uv {
    let mired = 1e6 / temperature_k;
    let hotter = illuminant(1e6 / (mired - TANGENT_HALF_STEP_MIRED));
    let cooler = illuminant(1e6 / (mired + TANGENT_HALF_STEP_MIRED));
    let (tu, tv) = (hotter.u - cooler.u, hotter.v - cooler.v);
    let length = tu.hypot(tv);
    let (nu, nv) = (-tv / length, tu / length);
    if nv <= 0.0 {
        Uv { u: nu, v: nv }
    } else {
        Uv { u: -nu, v: -nv }
    }
}

/// The white point of a grade: [`illuminant`]`(temperature_k)` moved by `tint` along
/// [`magenta_normal`], `tint × `[`TINT_DUV_AT_FULL_SCALE`] away from the locus.
pub fn white_point(temperature_k: f64, tint: f64) -> Xy {
    let on_locus = illuminant(temperature_k);
    let normal = magenta_normal(temperature_k);
    let offset = tint * TINT_DUV_AT_FULL_SCALE;
    Uv {
        u: on_locus.u + offset * normal.u,
        v: on_locus.v + offset * normal.v,
    }
    .to_xy()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_xy(actual: Xy, expected: (f64, f64), tolerance: f64, what: &str) {
        assert!(
            (actual.x - expected.0).abs() <= tolerance
                && (actual.y - expected.1).abs() <= tolerance,
            "{what}: {actual:?} vs {expected:?} (tolerance {tolerance})"
        );
    }

    #[test]
    fn nominal_temperatures_name_the_cie_illuminants() {
        // CIE 15:2004 table T.3 (D50, D55, D65, D75).
        assert_xy(illuminant(5000.0).to_xy(), (0.34567, 0.35850), 2e-4, "D50");
        assert_xy(illuminant(5500.0).to_xy(), (0.33242, 0.34743), 2e-4, "D55");
        assert_xy(illuminant(6500.0).to_xy(), (0.31271, 0.32902), 2e-4, "D65");
        assert_xy(illuminant(7500.0).to_xy(), (0.29902, 0.31485), 2e-4, "D75");
    }

    /// Kang et al.'s cubic fit of the blackbody locus in (x, y), 1667–4000 K (B. Kang et al.,
    /// "Design of advanced color temperature control system for HDTV applications", Journal of
    /// the Korean Physical Society 41(6), 2002): an approximation made independently of
    /// Krystek's, good to about 10⁻³.
    fn kang_blackbody(t: f64) -> (f64, f64) {
        let x = -0.2661239e9 / t.powi(3) - 0.2343589e6 / t.powi(2) + 0.8776956e3 / t + 0.179910;
        let y = if t <= 2222.0 {
            -1.1063814 * x.powi(3) - 1.34811020 * x.powi(2) + 2.18555832 * x - 0.20219683
        } else {
            -0.9549476 * x.powi(3) - 1.37418593 * x.powi(2) + 2.09137015 * x - 0.16748867
        };
        (x, y)
    }

    #[test]
    fn low_temperatures_are_blackbodies() {
        let mut kelvin = 1667.0;
        while kelvin <= 4000.0 {
            let kang = kang_blackbody(kelvin);
            assert_xy(
                planckian_locus(kelvin).to_xy(),
                kang,
                1e-3,
                &format!("{kelvin} K"),
            );
            kelvin += 50.0;
        }
        // Below 4000 K (today's scale) the grade's light is the blackbody itself.
        assert_eq!(illuminant(3000.0), planckian_locus(3000.0 * NOMINAL_TO_CCT));
    }

    #[test]
    fn the_locus_is_continuous_and_monotonic_from_1000_to_40000_kelvin() {
        // Walk the whole range in 0.01-mired steps: the largest step of the locus itself is
        // 2 × 10⁻⁶ in (u, v) (near 1000 K); the jump a plain switch from blackbody to daylight
        // at 4000 K would make is 0.0028.
        let mut mired = 1e6 / MAX_TEMPERATURE_K;
        let mut previous = illuminant(MAX_TEMPERATURE_K);
        let mut largest_step: f64 = 0.0;
        while mired < 1e6 / MIN_TEMPERATURE_K {
            mired += 0.01;
            let here = illuminant(1e6 / mired);
            largest_step = largest_step.max(here.distance(previous));
            assert!(
                here.u > previous.u,
                "u must grow as the light gets warmer ({} mired)",
                mired
            );
            previous = here;
        }
        assert!(largest_step < 5e-6, "largest step {largest_step}");
        let jump = planckian_locus(4000.0).distance(daylight_locus(4000.0).to_uv());
        assert!(
            jump > 2e-3,
            "the blend must be bridging a real gap ({jump})"
        );
    }

    #[test]
    fn the_blend_meets_each_locus_at_its_end() {
        let at = |cct: f64| illuminant(cct / NOMINAL_TO_CCT);
        assert!(at(4000.0).distance(planckian_locus(4000.0)) < 1e-12);
        assert!(at(5000.0).distance(daylight_locus(5000.0).to_uv()) < 1e-12);
        let middle = at(4444.0);
        let (blackbody, daylight) = (planckian_locus(4444.0), daylight_locus(4444.0).to_uv());
        assert!(middle.distance(blackbody) > 1e-3 && middle.distance(daylight) > 1e-3);
    }

    #[test]
    fn tint_moves_perpendicular_to_the_locus_by_its_scale() {
        for kelvin in [1000.0, 2700.0, 4500.0, 6500.0, 12000.0, 40000.0] {
            let neutral = illuminant(kelvin);
            let magenta = white_point(kelvin, 1.0).to_uv();
            let green = white_point(kelvin, -0.5).to_uv();
            assert!((magenta.distance(neutral) - 0.05).abs() < 1e-9);
            assert!((green.distance(neutral) - 0.025).abs() < 1e-9);
            assert!(magenta.v < neutral.v && green.v > neutral.v);
            // Perpendicular: the tangent dotted with the offset is ~0.
            let tangent = (
                illuminant(kelvin * 1.001).u - illuminant(kelvin / 1.001).u,
                illuminant(kelvin * 1.001).v - illuminant(kelvin / 1.001).v,
            );
            let offset = (magenta.u - neutral.u, magenta.v - neutral.v);
            let cosine = (tangent.0 * offset.0 + tangent.1 * offset.1)
                / (tangent.0.hypot(tangent.1) * offset.0.hypot(offset.1));
            assert!(cosine.abs() < 1e-3, "{kelvin} K: cosine {cosine}");
        }
        assert_eq!(white_point(6500.0, 0.0), illuminant(6500.0).to_xy());
    }
}
