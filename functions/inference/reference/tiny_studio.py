"""A tiny random-weight studio for the local stack, the demo and the end-to-end tests: the tiny
SDXL of pipeline.py with the ControlNets and LoRA the built-in presets name, laid out as a worker
reads them. Its pictures are noise: it exercises every code path of a real deployment without
real weights (none can be downloaded here).

Output:
  model/                                      the SDXL pipeline (diffusers folder layout)
  controlnets/controlnet-canny-sdxl-1.0/      ControlNet (diffusers model folder), from the UNet
  controlnets/controlnet-depth-sdxl-1.0/      another, for presets with a depth ControlNet
  controlnets/controlnet-openpose-sdxl-1.0/   another, for presets with a pose ControlNet
  depth/                                      a tiny Depth Anything (transformers folder; its
                                              processor works at 112 px) the worker draws depth
                                              maps with (DARKROOM_DEPTH_MODEL)
  pose/body_pose_model.safetensors            the OpenPose body model of pose.py (full size: the
                                              architecture is fixed; f16, 105 MB) the worker draws
                                              pose maps with (DARKROOM_POSE_MODEL)
  loras/storybook-style.safetensors           a rank-4 PEFT LoRA on every attention projection
"""

import common
import depth as depth_reference
import lora as lora_reference
import pipeline as reference
import pose as pose_reference

import torch


def main():
    args = common.parse_args(__doc__)
    common.seed_everything(args.seed)
    pipe = reference.build(args.out)

    from diffusers import ControlNetModel

    for name in ("controlnet-canny-sdxl-1.0", "controlnet-depth-sdxl-1.0", "controlnet-openpose-sdxl-1.0"):
        net = ControlNetModel.from_unet(pipe.unet).eval()
        reference.randomize(net, 0.05)
        net.save_pretrained(args.out / "controlnets" / name, safe_serialization=True)

    depth = depth_reference.build(depth_reference.VARIANTS["small"])
    depth.save_pretrained(args.out / "depth", safe_serialization=True)
    common.write_json(args.out / "depth" / "preprocessor_config.json", {
        "size": {"height": 112, "width": 112},
        "ensure_multiple_of": 14,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
    })

    from safetensors.torch import save_file

    _, pose_state = pose_reference.build()
    (args.out / "pose").mkdir(exist_ok=True)
    save_file({k: v.half() for k, v in pose_state.items()}, str(args.out / "pose" / "body_pose_model.safetensors"))

    attention = {name: lora_reference.RANK for name, m in pipe.unet.named_modules()
                 if isinstance(m, torch.nn.Linear) and ".attn" in name}
    style = lora_reference.make_lora(pipe, attention, {}, {}, 7)
    (args.out / "loras").mkdir(exist_ok=True)
    lora_reference.save_peft(pipe, {"unet": style["unet"], "text_encoder": {}, "text_encoder_2": {}},
                             args.out / "loras" / "storybook-style.safetensors", None, None)


if __name__ == "__main__":
    main()
