"""A tiny random-weight studio for the local stack, the demo and the end-to-end tests: the tiny
SDXL of pipeline.py with the ControlNets and LoRA the built-in presets name, laid out as a worker
reads them. Its pictures are noise: it exercises every code path of a real deployment without
real weights (none can be downloaded here).

Output:
  model/                                      the SDXL pipeline (diffusers folder layout)
  controlnets/controlnet-canny-sdxl-1.0/      ControlNet (diffusers model folder), from the UNet
  loras/storybook-style.safetensors           a rank-4 PEFT LoRA on every attention projection
"""

import common
import lora as lora_reference
import pipeline as reference

import torch


def main():
    args = common.parse_args(__doc__)
    common.seed_everything(args.seed)
    pipe = reference.build(args.out)

    from diffusers import ControlNetModel

    net = ControlNetModel.from_unet(pipe.unet).eval()
    reference.randomize(net, 0.05)
    net.save_pretrained(args.out / "controlnets" / "controlnet-canny-sdxl-1.0", safe_serialization=True)

    attention = {name: lora_reference.RANK for name, m in pipe.unet.named_modules()
                 if isinstance(m, torch.nn.Linear) and ".attn" in name}
    style = lora_reference.make_lora(pipe, attention, {}, {}, 7)
    (args.out / "loras").mkdir(exist_ok=True)
    lora_reference.save_peft(pipe, {"unet": style["unet"], "text_encoder": {}, "text_encoder_2": {}},
                             args.out / "loras" / "storybook-style.safetensors", None, None)


if __name__ == "__main__":
    main()
