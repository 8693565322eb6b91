"""Photo fixtures for tests/face.rs, from scikit-image's bundled sample data.

Usage: face_fixtures.py DIR. Needs the `scikit-image` wheel installed (only its data
file is read: skimage is located, not imported) and Pillow.

`astronaut.png` is Eileen Collins' NASA portrait (public domain), 512×512, shipped
inside the scikit-image wheel as skimage/data/astronaut.png. Written to DIR:

- astronaut.png: the file as shipped;
- astronaut_orient6.jpg: stored turned 90° counter-clockwise with EXIF orientation 6,
  so it displays upright only once the orientation is applied;
- astronaut_x4.jpg: enlarged 4× (2048×2048), big enough for reduced-scale JPEG
  decoding to matter.
"""

import importlib.util
import pathlib
import shutil
import sys

from PIL import Image

out = pathlib.Path(sys.argv[1])
spec = importlib.util.find_spec("skimage")
if spec is None or not spec.submodule_search_locations:
    sys.exit("scikit-image is not installed in this Python (see local-dev/requirements.txt)")
source = pathlib.Path(list(spec.submodule_search_locations)[0]) / "data" / "astronaut.png"
shutil.copyfile(source, out / "astronaut.png")

upright = Image.open(source).convert("RGB")
exif = Image.Exif()
exif[0x0112] = 6
# Orientation 6 means "turn 90° clockwise to display": store it turned the other way.
upright.transpose(Image.Transpose.ROTATE_90).save(
    out / "astronaut_orient6.jpg", quality=95, exif=exif.tobytes()
)
upright.resize((2048, 2048), Image.Resampling.LANCZOS).save(out / "astronaut_x4.jpg", quality=92)
