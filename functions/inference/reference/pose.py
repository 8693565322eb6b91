"""Reference outputs for the pose estimator: the OpenPose body model (Cao et al., "Realtime
Multi-Person 2D Pose Estimation using Part Affinity Fields", CVPR 2017) as controlnet_aux's
OpenposeDetector runs it to draw the control images OpenPose ControlNets were trained on.

controlnet_aux is installed without its dependencies (local-dev/requirements-nodeps.txt), so only
its `open_pose` modules are imported, without the package's `__init__` (which imports every
annotator and their dependencies).

Writes under --out:

- `body_pose_model.safetensors`: a `bodypose_model` with random weights (He-normal, so the
  signal survives the network's 40 convolutions), under the tensor names of the published
  `body_pose_model.pth` (`conv1_1.weight`, `Mconv7_stage6_L2.bias`, …).
- `reference.safetensors`:
  - `network.input` a seeded normal batch `[1, 3, 64, 48]`; `network.paf` `[1, 38, 8, 6]` and
    `network.heatmap` `[1, 19, 8, 6]` the model's two outputs.
  - `maps.heatmap` `[H, W, 19]`, `maps.paf` `[H, W, 38]`: synthetic full-resolution maps of a
    scene (two people facing the camera, one person with too few parts, a lone false peak);
    `maps.candidate` `[n, 4]` (x, y, score, id) and `maps.subset` `[m, 20]` (18 candidate
    indices or -1, total score, part count), what `Body.__call__` makes of them (f64);
    `maps.canvas_u8` `[H, W, 3]` the people drawn by `draw_bodypose` on black.
  - `photo.image_u8` `[184, 136, 3]` an RGB photo (184 px high: the body model's working
    scale, `0.5 × 368 / 184 = 1`, so `Body` does not resize it), `photo.heatmap` `[184, 136, 19]`
    and `photo.paf` `[184, 136, 38]` the maps `Body.__call__` computes for it with the random
    model (its Lanczos upsampling of the network's stride-8 outputs).
"""

import importlib.util
import os
import sys
import types

import common
import numpy as np
import torch


def open_pose_modules():
    """controlnet_aux's open_pose `model`, `body` and `util` modules."""
    if "controlnet_aux" not in sys.modules:
        spec = importlib.util.find_spec("controlnet_aux")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("controlnet-aux is not installed: run local-dev/install")
        root = list(spec.submodule_search_locations)[0]
        for name, path in (("controlnet_aux", root), ("controlnet_aux.open_pose", os.path.join(root, "open_pose"))):
            package = types.ModuleType(name)
            package.__path__ = [path]
            sys.modules[name] = package
    # util first: util and body import each other, and util needs body's classes.
    from controlnet_aux.open_pose import util
    from controlnet_aux.open_pose import body, model

    return model, body, util


def build():
    """A `bodypose_model` with random He-normal weights; its state dict under the published
    checkpoint's names."""
    model_module, _, _ = open_pose_modules()
    model = model_module.bodypose_model().eval()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 4:
                fan_in = parameter.shape[1] * parameter.shape[2] * parameter.shape[3]
                std = (2.0 / fan_in) ** 0.5
                # The outputs (L1: part affinity fields, L2: part heatmaps) land in [-1, 1].
                if "Mconv7" in name or "conv5_5" in name:
                    std *= 0.3
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
            else:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    state = {".".join(k.split(".")[1:]): v.contiguous() for k, v in model.state_dict().items()}
    return model, state


# One person's 18 keypoints in OpenPose's order (nose, neck, right shoulder/elbow/wrist, left
# shoulder/elbow/wrist, right hip/knee/ankle, left hip/knee/ankle, right eye, left eye, right
# ear, left ear), at the origin; None where a part is not visible.
PERSON = [(0, -60), (0, -40), (-18, -38), (-26, -12), (-30, 12), (18, -38), (26, -12),
          (30, 12), (-10, 10), (-12, 40), (-12, 70), (10, 10), (12, 40), (12, 70),
          (-5, -64), (5, -64), (-10, -60), (10, -60)]
LIMBS = [[2, 3], [2, 6], [3, 4], [4, 5], [6, 7], [7, 8], [2, 9], [9, 10], [10, 11], [2, 12],
         [12, 13], [13, 14], [2, 1], [1, 15], [15, 17], [1, 16], [16, 18], [3, 17], [6, 18]]
PAF_CHANNELS = [[31, 32], [39, 40], [33, 34], [35, 36], [41, 42], [43, 44], [19, 20], [21, 22],
                [23, 24], [25, 26], [27, 28], [29, 30], [47, 48], [49, 50], [53, 54], [51, 52],
                [55, 56], [37, 38], [45, 46]]


def synthetic_maps(height, width):
    """Heatmaps and part affinity fields of a scene, as a trained body model would draw them."""
    rng = np.random.default_rng(9)
    heatmap = rng.uniform(0.0, 0.04, (height, width, 19)).astype(np.float32)
    paf = rng.normal(0.0, 0.02, (height, width, 38)).astype(np.float32)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    people = [
        [(x + 60, y + 70) for x, y in PERSON],
        # A second person, a little smaller and leaning, without a left ankle and right ear.
        [None if i in (13, 16) else (0.8 * x + 0.1 * y + 150, 0.8 * y + 75) for i, (x, y) in enumerate(PERSON)],
        # Only three parts of a third one: too few to be kept.
        [(x + 200, y + 70) if i in (0, 1, 2) else None for i, (x, y) in enumerate(PERSON)],
    ]
    for person in people:
        for part, point in enumerate(person):
            if point is None:
                continue
            x, y = point
            bump = 0.9 * np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * 5.0 ** 2))
            heatmap[:, :, part] = np.maximum(heatmap[:, :, part], bump)
        for (a, b), (cx, cy) in zip(LIMBS, PAF_CHANNELS):
            if person[a - 1] is None or person[b - 1] is None:
                continue
            (xa, ya), (xb, yb) = person[a - 1], person[b - 1]
            length = max(np.hypot(xb - xa, yb - ya), 1e-3)
            ux, uy = (xb - xa) / length, (yb - ya) / length
            along = (xs - xa) * ux + (ys - ya) * uy
            across = np.abs((xs - xa) * uy - (ys - ya) * ux)
            band = (along >= -2) & (along <= length + 2) & (across <= 4)
            paf[:, :, cx - 19][band] = ux
            paf[:, :, cy - 19][band] = uy
    # A lone false peak no limb supports.
    heatmap[:, :, 4] = np.maximum(heatmap[:, :, 4], 0.5 * np.exp(-((xs - 230) ** 2 + (ys - 150) ** 2) / 50.0))
    return heatmap, paf


class FixedMaps(torch.nn.Module):
    """Stands in for the network in `Body.__call__`: its outputs are replaced by full-resolution
    maps (see `people_from_maps`); a parameter tells Body the device."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, data):
        n, _, h, w = data.shape
        return torch.zeros((n, 38, h // 8, w // 8)), torch.zeros((n, 19, h // 8, w // 8))


def people_from_maps(heatmap, paf):
    """`Body.__call__`'s peak finding and limb assembly on the given full-resolution maps (its
    resizes are replaced: the image passes unscaled, the network's maps by these)."""
    _, body, util = open_pose_modules()
    height, width, _ = heatmap.shape
    detector = body.Body.__new__(body.Body)
    detector.model = FixedMaps()

    def resize_k(x, fx, fy):
        if x.shape[-1] == 3:
            return x
        source = heatmap if x.shape[-1] == 19 else paf
        padded = np.zeros((x.shape[0] * 8, x.shape[1] * 8, x.shape[2]), np.float32)
        padded[:height, :width] = source
        return padded

    originals = util.smart_resize_k, util.smart_resize
    util.smart_resize_k, util.smart_resize = resize_k, lambda x, s: x
    try:
        candidate, subset = detector(np.zeros((height, width, 3), np.uint8))
    finally:
        util.smart_resize_k, util.smart_resize = originals
    canvas = np.zeros((height, width, 3), np.uint8)
    for person in detector.format_body_result(candidate, subset):
        keypoints = [
            None if k is None else k._replace(x=k.x / float(width), y=k.y / float(height))
            for k in person.keypoints
        ]
        canvas = util.draw_bodypose(canvas, keypoints)
    return np.asarray(candidate, np.float64).reshape(-1, 4), np.asarray(subset, np.float64).reshape(-1, 20), canvas


def photo_maps(model, image_rgb):
    """The full-resolution maps `Body.__call__` computes for an RGB photo (it reads BGR, as
    OpenposeDetector passes it)."""
    _, body, util = open_pose_modules()
    detector = body.Body.__new__(body.Body)
    detector.model = model
    recorded = []
    original = util.smart_resize

    def recording(x, s):
        out = original(x, s)
        recorded.append(out)
        return out

    util.smart_resize = recording
    try:
        detector(image_rgb[:, :, ::-1].copy())
    finally:
        util.smart_resize = original
    # smart_resize calls itself per channel: keep the whole maps.
    heatmap, paf = [x for x in recorded if x.ndim == 3 and x.shape[2] in (19, 38)]
    return heatmap, paf


def main():
    args = common.parse_args(__doc__)
    common.seed_everything(args.seed)
    from safetensors.torch import save_file

    model, state = build()
    save_file(state, str(args.out / "body_pose_model.safetensors"))

    tensors = {}
    generator = torch.Generator().manual_seed(11)
    network_input = torch.randn((1, 3, 64, 48), generator=generator)
    with torch.no_grad():
        paf, heatmap = model(network_input)
    tensors.update({"network.input": network_input, "network.paf": paf, "network.heatmap": heatmap})

    maps_heatmap, maps_paf = synthetic_maps(160, 256)
    candidate, subset, canvas = people_from_maps(maps_heatmap, maps_paf)
    tensors.update({
        "maps.heatmap": torch.from_numpy(maps_heatmap),
        "maps.paf": torch.from_numpy(maps_paf),
        "maps.canvas_u8": torch.from_numpy(canvas),
    })

    rng = np.random.default_rng(4)
    ys, xs = np.mgrid[0:184, 0:136]
    base = np.stack([xs * 1.5, ys * 1.2, (xs + ys) * 0.7], axis=-1)
    image = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    photo_heatmap, photo_paf = photo_maps(model, image)
    tensors.update({
        "photo.image_u8": torch.from_numpy(image),
        "photo.heatmap": torch.from_numpy(np.ascontiguousarray(photo_heatmap, np.float32)),
        "photo.paf": torch.from_numpy(np.ascontiguousarray(photo_paf, np.float32)),
    })
    common.save_tensors(args.out / "reference.safetensors", tensors)
    save_file({
        "maps.candidate": torch.from_numpy(candidate),
        "maps.subset": torch.from_numpy(subset),
    }, str(args.out / "people.safetensors"))


if __name__ == "__main__":
    main()
