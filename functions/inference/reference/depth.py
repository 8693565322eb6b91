"""Reference outputs for the depth estimator (transformers' DepthAnythingForDepthEstimation: a
DINOv2 backbone and a DPT neck and head, the architecture of Depth Anything V1/V2).

For each variant below: a small DepthAnythingForDepthEstimation with every weight re-randomized,
saved with `save_pretrained` (config.json + model.safetensors, the tensor names the published
checkpoints use) under `<variant>/`, and `<variant>/reference.safetensors` holding, for two
pixel batches (`square`: the backbone's own grid, no position interpolation; `wide`: a
non-square size, interpolated):

- `<case>.pixel_values`   a seeded normal batch, NCHW;
- `<case>.predicted_depth` the model's output, `[b, h, w]`.

And, for the `small` variant, the whole photo → control-image path as a transformers user runs
it: a `preprocessor_config.json` (DPTImageProcessor, target 56×56, aspect kept, multiples of 14,
bicubic, ImageNet normalisation) saved beside the model, and `photo.image_u8` (HWC uint8, 50×70),
`photo.pixel_values` (the processor's output), `photo.depth_u8` (post_process_depth_estimation at
the photo's size, min-max normalised to 0–255 and rounded).
"""

import common
import torch
from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

VARIANTS = {
    # Depth Anything V2 small's layout in miniature: 4 layers, features from each, relative depth.
    "small": dict(
        backbone=dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=4,
                      image_size=56, out_indices=[1, 2, 3, 4]),
        neck=dict(reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 32, 32],
                  fusion_hidden_size=16, head_hidden_size=8),
        cases={"square": (1, 56, 56), "wide": (2, 42, 70)},
    ),
    # Features from a subset of 6 layers, metric depth (sigmoid × max_depth), 3 heads.
    "metric": dict(
        backbone=dict(hidden_size=48, num_hidden_layers=6, num_attention_heads=3, mlp_ratio=2,
                      image_size=42, out_indices=[2, 3, 5, 6], layerscale_value=0.5),
        neck=dict(reassemble_hidden_size=48, neck_hidden_sizes=[8, 8, 16, 16],
                  fusion_hidden_size=8, head_hidden_size=4, depth_estimation_type="metric",
                  max_depth=20),
        cases={"square": (1, 42, 42), "wide": (1, 28, 56)},
    ),
}


def randomize(model: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            scale = 0.2 if parameter.dim() > 1 else 0.1
            values = torch.randn(parameter.shape, generator=generator) * scale
            if name.endswith("lambda1") or "norm" in name and name.endswith("weight"):
                values = 1.0 + values
            parameter.copy_(values)


def build(variant: dict) -> DepthAnythingForDepthEstimation:
    """A randomized DepthAnythingForDepthEstimation of `variant`'s shape."""
    backbone = Dinov2Config(
        patch_size=14,
        reshape_hidden_states=False,
        apply_layernorm=True,
        **variant["backbone"],
    )
    config = DepthAnythingConfig(backbone_config=backbone, patch_size=14, **variant["neck"])
    model = DepthAnythingForDepthEstimation(config).eval()
    randomize(model)
    return model


def main():
    args = common.parse_args(__doc__)
    common.seed_everything(args.seed)
    for name, variant in VARIANTS.items():
        model = build(variant)
        out = args.out / name
        model.save_pretrained(out, safe_serialization=True)
        tensors = {}
        generator = torch.Generator().manual_seed(11)
        for case, (batch, height, width) in variant["cases"].items():
            pixels = torch.randn((batch, 3, height, width), generator=generator)
            with torch.no_grad():
                depth = model(pixel_values=pixels).predicted_depth
            tensors[f"{case}.pixel_values"] = pixels
            tensors[f"{case}.predicted_depth"] = depth
        if name == "small":
            tensors.update(photo_case(model, out))
        common.save_tensors(out / "reference.safetensors", tensors)


def photo_case(model, out):
    """The photo → depth control image path through transformers' processor."""
    import numpy as np
    from PIL import Image
    from transformers import DPTImageProcessor

    processor = DPTImageProcessor(
        size={"height": 56, "width": 56},
        keep_aspect_ratio=True,
        ensure_multiple_of=14,
        resample=Image.BICUBIC,
        do_rescale=True,
        do_normalize=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        do_pad=False,
    )
    processor.save_pretrained(out)
    rng = np.random.default_rng(3)
    ys, xs = np.mgrid[0:50, 0:70]
    base = np.stack([xs * 3.5, ys * 5.0, (xs + ys) * 2.0], axis=-1)
    image = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    inputs = processor(images=Image.fromarray(image), return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    depth = processor.post_process_depth_estimation(outputs, target_sizes=[(50, 70)])[0]["predicted_depth"]
    unit = (depth - depth.min()) / (depth.max() - depth.min())
    return {
        "photo.image_u8": torch.from_numpy(image),
        "photo.pixel_values": inputs["pixel_values"],
        "photo.depth_u8": torch.round(unit * 255).to(torch.uint8),
    }


if __name__ == "__main__":
    main()
