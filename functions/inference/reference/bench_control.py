"""The anchors of the control-map benchmark (`examples/control_maps.rs`): the annotators that drew
the training images of pose and depth ControlNets, on the same random weights as Darkroom.

    python bench_control.py --make DIR --size WxH
        DIR/pose/body_pose_model.safetensors  the OpenPose body model (its real architecture,
                                              random He-normal weights as in pose.py), f32
        DIR/depth/                            a Depth Anything V2 Small-shaped model (DINOv2 ViT-S/14
                                              backbone, DPT head; random weights) with the published
                                              checkpoint's preprocessor_config.json (518 px, ×14)
        DIR/photo.png                         scikit-image's astronaut photo resized to W×H
    python bench_control.py --run DIR --runs N --threads T
        prints one JSON line: seconds per map for `pose` (controlnet_aux's OpenposeDetector body
        path: resize to the detection size, Body, draw_bodypose, resize back to the photo's size)
        and `depth` (transformers' DPTImageProcessor, DepthAnythingForDepthEstimation,
        post_process_depth_estimation at the photo's size, min-max to 0–255), each after one
        warm-up, and the versions used; writes the maps to DIR/pose_annotator.png and
        DIR/depth_annotator.png.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def make(out, width, height):
    import pose
    from PIL import Image
    from safetensors.torch import save_file
    from skimage import data
    from transformers import (DepthAnythingConfig, DepthAnythingForDepthEstimation,
                              Dinov2Config, DPTImageProcessor)

    os.makedirs(os.path.join(out, "pose"), exist_ok=True)
    _, state = pose.build()
    save_file(state, os.path.join(out, "pose", "body_pose_model.safetensors"))

    # Depth Anything V2 Small: ViT-S/14 (384 wide, 12 layers, 6 heads), features of layers
    # 3, 6, 9, 12, DPT neck 48/96/192/384, fusion 64, relative depth.
    backbone = Dinov2Config(patch_size=14, hidden_size=384, num_hidden_layers=12,
                            num_attention_heads=6, mlp_ratio=4, image_size=518,
                            out_indices=[3, 6, 9, 12], reshape_hidden_states=False,
                            apply_layernorm=True)
    config = DepthAnythingConfig(backbone_config=backbone, patch_size=14,
                                 reassemble_hidden_size=384,
                                 neck_hidden_sizes=[48, 96, 192, 384], fusion_hidden_size=64,
                                 head_hidden_size=32)
    torch.manual_seed(7)
    model = DepthAnythingForDepthEstimation(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02)
    model.save_pretrained(os.path.join(out, "depth"), safe_serialization=True)
    DPTImageProcessor(size={"height": 518, "width": 518}, keep_aspect_ratio=True,
                      ensure_multiple_of=14, resample=Image.BICUBIC, do_rescale=True,
                      do_normalize=True, image_mean=[0.485, 0.456, 0.406],
                      image_std=[0.229, 0.224, 0.225],
                      do_pad=False).save_pretrained(os.path.join(out, "depth"))

    photo = Image.fromarray(data.astronaut()).resize((width, height), Image.BICUBIC)
    photo.save(os.path.join(out, "photo.png"))


def timed(f, runs):
    f()  # warm-up
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        f()
        seconds.append(time.perf_counter() - started)
    return seconds


def run(out, runs):
    import cv2
    import pose
    import transformers
    from PIL import Image
    from safetensors.torch import load_file
    from transformers import DepthAnythingForDepthEstimation, DPTImageProcessor

    _, body_module, util = pose.open_pose_modules()
    from controlnet_aux.util import HWC3, resize_image

    photo = np.array(Image.open(os.path.join(out, "photo.png")).convert("RGB"))
    height, width = photo.shape[:2]

    body = body_module.Body.__new__(body_module.Body)
    body.model = pose.open_pose_modules()[0].bodypose_model().eval()
    weights = load_file(os.path.join(out, "pose", "body_pose_model.safetensors"))
    body.model.load_state_dict(util.transfer(body.model, weights))

    def pose_map():
        image = resize_image(HWC3(photo), 512)
        h, w = image.shape[:2]
        candidate, subset = body(image[:, :, ::-1].copy())  # Body reads BGR
        # detect_poses + draw_poses, body only: keypoints normalised, drawn at the detection size.
        canvas = np.zeros((h, w, 3), dtype=np.uint8)
        for person in body.format_body_result(candidate, subset):
            keypoints = [
                None if k is None else k._replace(x=k.x / float(w), y=k.y / float(h))
                for k in person.keypoints
            ]
            canvas = util.draw_bodypose(canvas, keypoints)
        return cv2.resize(canvas, (width, height), interpolation=cv2.INTER_LINEAR)

    processor = DPTImageProcessor.from_pretrained(os.path.join(out, "depth"))
    model = DepthAnythingForDepthEstimation.from_pretrained(os.path.join(out, "depth")).eval()

    def depth_map():
        with torch.no_grad():
            inputs = processor(images=Image.fromarray(photo), return_tensors="pt")
            outputs = model(**inputs)
            depth = processor.post_process_depth_estimation(
                outputs, target_sizes=[(height, width)])[0]["predicted_depth"]
            unit = (depth - depth.min()) / (depth.max() - depth.min())
            return torch.round(unit * 255).to(torch.uint8)

    # The maps themselves, for the benchmark to compare with its own (the same work on both sides).
    Image.fromarray(pose_map()).save(os.path.join(out, "pose_annotator.png"))
    Image.fromarray(depth_map().numpy()).save(os.path.join(out, "depth_annotator.png"))
    with torch.no_grad():
        report = {
            "pose": timed(pose_map, runs),
            "depth": timed(depth_map, runs),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "opencv": cv2.__version__,
        }
    print(json.dumps(report))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--make")
    parser.add_argument("--run")
    parser.add_argument("--size", default="896x1152")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        import cv2
        cv2.setNumThreads(args.threads)
    if args.make:
        width, height = (int(v) for v in args.size.split("x"))
        make(args.make, width, height)
    if args.run:
        run(args.run, args.runs)


if __name__ == "__main__":
    main()
