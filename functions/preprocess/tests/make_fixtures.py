"""Fixtures for tests/hostile.rs that the `image` crate cannot write (EXIF, CMYK,
palette PNG, animated WebP), made with Pillow. Usage: make_fixtures.py DIR.

The upright picture is 300×200 in four flat quadrants: top-left red, top-right
green, bottom-left blue, bottom-right white.
"""

import pathlib
import sys

from PIL import Image, ImageDraw, features

root = pathlib.Path(sys.argv[1])
W, H = 300, 200
upright = Image.new("RGB", (W, H))
draw = ImageDraw.Draw(upright)
draw.rectangle([0, 0, W // 2 - 1, H // 2 - 1], fill=(255, 0, 0))
draw.rectangle([W // 2, 0, W - 1, H // 2 - 1], fill=(0, 255, 0))
draw.rectangle([0, H // 2, W // 2 - 1, H - 1], fill=(0, 0, 255))
draw.rectangle([W // 2, H // 2, W - 1, H - 1], fill=(255, 255, 255))

T = Image.Transpose
# What to store so that a viewer applying orientation n shows `upright`: the
# inverse of the transform EXIF orientation n asks for.
inverse = {
    1: None,
    2: T.FLIP_LEFT_RIGHT,
    3: T.ROTATE_180,
    4: T.FLIP_TOP_BOTTOM,
    5: T.TRANSPOSE,
    6: T.ROTATE_90,
    7: T.TRANSVERSE,
    8: T.ROTATE_270,
}
for n, op in inverse.items():
    stored = upright if op is None else upright.transpose(op)
    exif = Image.Exif()
    exif[0x0112] = n
    gps = exif.get_ifd(0x8825)
    gps[1] = "N"
    gps[2] = (52.0, 22.0, 12.5)
    gps[3] = "E"
    gps[4] = (4.0, 53.0, 30.0)
    stored.save(root / f"orient_{n}.jpg", quality=95, exif=exif.tobytes())

upright.convert("CMYK").save(root / "cmyk.jpg", quality=95)
upright.convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(root / "palette.png")

if features.check("webp"):
    frames = [Image.new("RGB", (64, 48), c) for c in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(
        root / "animated.webp", save_all=True, append_images=frames[1:], duration=100, lossless=True
    )
