"""OpenCV reference for tests/canny.rs: grey and Canny maps for every input PNG.

Usage: reference_canny.py DIR. For each DIR/NAME.png (RGB) writes NAME.gray.png
(cv2.cvtColor RGB2GRAY), NAME.l1.png (cv2.Canny(gray, 100, 200)) and NAME.l2.png
(the same with L2gradient=True), and prints the OpenCV version.
"""

import pathlib
import sys

import cv2

root = pathlib.Path(sys.argv[1])
for path in sorted(root.glob("*.png")):
    if path.stem.count("."):
        continue
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    cv2.imwrite(str(root / f"{path.stem}.gray.png"), gray)
    cv2.imwrite(str(root / f"{path.stem}.l1.png"), cv2.Canny(gray, 100, 200))
    cv2.imwrite(str(root / f"{path.stem}.l2.png"), cv2.Canny(gray, 100, 200, L2gradient=True))
print(cv2.__version__)
