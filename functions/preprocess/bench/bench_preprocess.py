"""The libvips and Pillow sides of `preprocess-bench` (src/bin/preprocess-bench.rs).

Two modes, both driven by the Rust binary:

- ``--encode PPM JPG --quality Q``: encode the bench's generated scene (a binary PPM)
  as a baseline JPEG with libjpeg-turbo through Pillow, 4:2:0 chroma subsampling,
  standard Huffman tables, the way a phone or camera stores a photo.
- ``--run JPG --width W --height H --runs N --warmup K``: time, from the JPEG's bytes
  in memory to an RGB image at W×H and its edge map, one thread:

  - ``libvips``: ``pyvips.Image.thumbnail_buffer(bytes, W, height=H, crop="centre")``
    (shrink-on-load: libjpeg's DCT scaling; then Lanczos3 reduce and centre crop),
    materialised, then ``colourspace("b-w").canny(sigma, precision="integer")``
    (Gaussian blur, gradient, non-maximum suppression; libvips has no hysteresis)
    thresholded to 0/255 at ``--vips-threshold``, materialised;
  - ``libvips+cv2``: the same thumbnail, then ``cv2.cvtColor(RGB2GRAY)`` and
    ``cv2.Canny(grey, low, high)``: the map Darkroom computes, on libvips's pixels;
  - ``Pillow``: ``Image.open`` + ``draft("RGB", size)`` (libjpeg's DCT scaling to the
    smallest scale still covering the crop) + ``resize((W, H), LANCZOS, box=centre
    cover crop)``, then ``cv2.cvtColor(RGB2GRAY)`` + ``cv2.Canny(grey, low, high)``.

  Prints one JSON object on stdout: per side the times in ms, the decoded size where
  the library says it, and the fraction of edge pixels; plus versions and thread
  settings.

Threads: the caller sets ``VIPS_CONCURRENCY=1`` and pins the process to one CPU
(``taskset``); this script also calls ``cv2.setNumThreads(1)`` and disables libvips's
operation cache, so every timed run decodes afresh.
"""

import argparse
import io
import json
import math
import os
import sys
import time


def encode(ppm, jpg, quality):
    from PIL import Image

    with Image.open(ppm) as image:
        image.load()
        image.save(jpg, "JPEG", quality=quality, subsampling="4:2:0", optimize=False)


def cover_crop(width, height, out_w, out_h):
    """(left, top, right, bottom) of the centred region of out_w:out_h aspect."""
    scale = max(out_w / width, out_h / height)
    crop_w, crop_h = out_w / scale, out_h / scale
    left, top = (width - crop_w) / 2, (height - crop_h) / 2
    return (left, top, left + crop_w, top + crop_h)


def run(args):
    if os.environ.get("VIPS_CONCURRENCY") != "1":
        sys.exit("set VIPS_CONCURRENCY=1 before starting this script")
    import cv2
    import numpy as np
    import PIL
    import pyvips
    from PIL import Image

    cv2.setNumThreads(1)
    pyvips.cache_set_max(0)
    pyvips.cache_set_max_mem(0)
    pyvips.cache_set_max_files(0)

    with open(args.run, "rb") as f:
        data = f.read()
    out_w, out_h = args.width, args.height
    low, high = args.low, args.high

    def vips_thumbnail():
        thumb = pyvips.Image.thumbnail_buffer(data, out_w, height=out_h, crop="centre")
        return thumb.copy_memory()

    def side_vips():
        thumb = vips_thumbnail()
        edges = thumb.colourspace("b-w").canny(sigma=args.vips_sigma, precision="integer")
        edges = (edges > args.vips_threshold).copy_memory()
        rgb = np.ndarray(
            buffer=thumb.write_to_memory(), dtype=np.uint8, shape=(thumb.height, thumb.width, 3)
        )
        mask = np.ndarray(
            buffer=edges.write_to_memory(), dtype=np.uint8, shape=(edges.height, edges.width)
        )
        return rgb, mask, None

    def side_vips_cv2():
        thumb = vips_thumbnail()
        rgb = np.ndarray(
            buffer=thumb.write_to_memory(), dtype=np.uint8, shape=(thumb.height, thumb.width, 3)
        )
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        return rgb, cv2.Canny(grey, low, high), None

    def side_pillow():
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        scale = max(out_w / width, out_h / height)
        need = (math.ceil(width * scale), math.ceil(height * scale))
        image.draft("RGB", need)
        decoded = image.size
        box = cover_crop(decoded[0], decoded[1], out_w, out_h)
        resized = image.resize((out_w, out_h), Image.Resampling.LANCZOS, box=box)
        rgb = np.asarray(resized)
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        return rgb, cv2.Canny(grey, low, high), decoded

    sides = [("libvips", side_vips), ("libvips+cv2", side_vips_cv2), ("Pillow", side_pillow)]
    report = {
        "versions": {
            "python": sys.version.split()[0],
            "pyvips": pyvips.__version__,
            "libvips": "{}.{}.{}".format(pyvips.version(0), pyvips.version(1), pyvips.version(2)),
            "pillow": PIL.__version__,
            "opencv": cv2.__version__,
            "numpy": np.__version__,
        },
        "threads": {
            "affinity": sorted(os.sched_getaffinity(0)),
            "vips_concurrency": pyvips.concurrency_get(),
            "cv2_threads": cv2.getNumThreads(),
        },
        "sides": {},
    }
    for name, side in sides:
        for _ in range(args.warmup):
            side()
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            rgb, mask, decoded = side()
            times.append((time.perf_counter() - start) * 1000.0)
        if rgb.shape != (out_h, out_w, 3) or mask.shape != (out_h, out_w):
            sys.exit(f"{name}: got {rgb.shape} and {mask.shape}, wanted {out_w}×{out_h}")
        report["sides"][name] = {
            "ms": times,
            "decoded": decoded,
            "edge_fraction": float(np.count_nonzero(mask)) / mask.size,
        }
    json.dump(report, sys.stdout)
    print()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encode", nargs=2, metavar=("PPM", "JPG"))
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--run", metavar="JPG")
    parser.add_argument("--width", type=int, default=1152)
    parser.add_argument("--height", type=int, default=896)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--low", type=float, default=100.0)
    parser.add_argument("--high", type=float, default=200.0)
    parser.add_argument("--vips-sigma", type=float, default=1.4)
    parser.add_argument("--vips-threshold", type=float, default=2.0)
    args = parser.parse_args()
    if args.encode:
        encode(args.encode[0], args.encode[1], args.quality)
    elif args.run:
        run(args)
    else:
        parser.error("--encode or --run")


if __name__ == "__main__":
    main()
