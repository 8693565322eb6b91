"""Reference for darkroom-tone's white balance: expected 8-bit outputs from first principles.

Computes, in float64 with numpy and the exact sRGB curves (no tables, no f32), what
`ToneGrade` should make of a few probe colours (a neutral grey card first) for a list of
settings, and prints JSON on stdout:

    {"cases": [{"temperature_k", "tint", "strength", "white_xy": [x, y],
                "probes": [[r, g, b], ...], "expected": [[r, g, b], ...]}, ...]}

`expected` holds unrounded 8-bit values (0–255 floats); Rust rounds, so it must land within
half a level. The formulas are the ones documented in src/white_point.rs and
src/adaptation.rs (CIE daylight locus, Krystek's blackbody, smoothstep blend, tint along the
(u, v) normal, Bradford); this script is a second, independent implementation of them.

Usage: python reference/tone.py
"""

import json

import numpy as np

C2_RATIO = 1.4388 / 1.4380
BRADFORD = np.array(
    [[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]]
)
SRGB_TO_XYZ = np.array(
    [[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]
)

CASES = [
    # profile-warm and profile-cool as shipped
    (5200.0, 0.02, 0.8),
    (7500.0, -0.02, 0.8),
    # the warm and cool looks, full strength
    (5000.0, 0.0, 1.0),
    (8000.0, 0.0, 1.0),
    (6500.0, 0.0, 1.0),
    (6500.0, 0.5, 1.0),
    (6500.0, -0.5, 1.0),
    (2700.0, 0.0, 1.0),
    (4400.0, 0.0, 1.0),  # inside the blackbody/daylight blend
    (1000.0, 0.0, 1.0),  # far out of gamut: clamps
    (40000.0, 0.0, 1.0),
    (5200.0, 0.0, 0.5),
]

PROBES = [
    [128, 128, 128],
    [50, 50, 50],
    [200, 200, 200],
    [255, 255, 255],
    [0, 0, 0],
    [200, 60, 40],
    [30, 120, 220],
    [250, 240, 10],
    [10, 200, 90],
    [128, 0, 255],
]


def krystek_uv(t):
    u = (0.860117757 + 1.54118254e-4 * t + 1.28641212e-7 * t * t) / (
        1 + 8.42420235e-4 * t + 7.08145163e-7 * t * t
    )
    v = (0.317398726 + 4.22806245e-5 * t + 4.20481691e-8 * t * t) / (
        1 - 2.89741816e-5 * t + 1.61456053e-7 * t * t
    )
    return np.array([u, v])


def daylight_xy(t):
    if t <= 7000:
        x = -4.6070e9 / t**3 + 2.9678e6 / t**2 + 0.09911e3 / t + 0.244063
    else:
        x = -2.0064e9 / t**3 + 1.9018e6 / t**2 + 0.24748e3 / t + 0.237040
    return np.array([x, -3.0 * x * x + 2.87 * x - 0.275])


def xy_to_uv(xy):
    x, y = xy
    d = -2 * x + 12 * y + 3
    return np.array([4 * x / d, 6 * y / d])


def uv_to_xy(uv):
    u, v = uv
    d = 2 * u - 8 * v + 4
    return np.array([3 * u / d, 2 * v / d])


def locus_uv(nominal_k):
    t = nominal_k * C2_RATIO
    if t <= 4000:
        return krystek_uv(t)
    day = xy_to_uv(daylight_xy(t))
    if t >= 5000:
        return day
    s = (1 / 4000 - 1 / t) / (1 / 4000 - 1 / 5000)
    w = s * s * (3 - 2 * s)
    return (1 - w) * krystek_uv(t) + w * day


def white_xy(nominal_k, tint):
    mired = 1e6 / nominal_k
    tangent = locus_uv(1e6 / (mired - 0.5)) - locus_uv(1e6 / (mired + 0.5))
    normal = np.array([-tangent[1], tangent[0]]) / np.linalg.norm(tangent)
    if normal[1] > 0:
        normal = -normal
    return uv_to_xy(locus_uv(nominal_k) + 0.05 * tint * normal)


def xyz(xy):
    x, y = xy
    return np.array([x / y, 1.0, (1 - x - y) / y])


def white_balance(nominal_k, tint):
    source = BRADFORD @ xyz(white_xy(6500.0, 0.0))
    destination = BRADFORD @ xyz(white_xy(nominal_k, tint))
    adapt = np.linalg.inv(BRADFORD) @ np.diag(destination / source) @ BRADFORD
    return np.linalg.inv(SRGB_TO_XYZ) @ adapt @ SRGB_TO_XYZ


def decode(c):
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def encode(lin):
    lin = np.clip(lin, 0.0, 1.0)
    return np.where(lin <= 0.0031308, lin * 12.92, 1.055 * lin ** (1 / 2.4) - 0.055)


def main():
    cases = []
    for kelvin, tint, strength in CASES:
        matrix = white_balance(kelvin, tint)
        linear = decode(np.array(PROBES, dtype=np.float64) / 255.0)
        toned = np.clip(linear @ matrix.T, 0.0, 1.0)
        mixed = linear + strength * (toned - linear)
        cases.append(
            {
                "temperature_k": kelvin,
                "tint": tint,
                "strength": strength,
                "white_xy": white_xy(kelvin, tint).tolist(),
                "probes": PROBES,
                "expected": (encode(mixed) * 255.0).tolist(),
            }
        )
    print(json.dumps({"cases": cases}))


if __name__ == "__main__":
    main()
