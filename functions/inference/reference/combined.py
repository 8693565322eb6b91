"""Reference outputs with LoRA and ControlNet together: the shape of Darkroom's presets (img2img +
one ControlNet + one LoRA for the profile look) and everything at once (two LoRAs at different
weights, two ControlNets with different scales and guidance windows).

The base, ControlNets and LoRAs are built as pipeline.py, controlnet.py and lora.py build them;
diffusers fuses the LoRAs (`load_lora_weights` + `set_adapters` + `fuse_lora`) into a fresh
pipeline whose components then drive `StableDiffusionXLControlNet(Img2Img)Pipeline`.

Output:
  model/, controlnet-a/, controlnet-b/, controls/, init.png   as in controlnet.py
  loras/a_kohya.safetensors, loras/b_peft.safetensors          as in lora.py
  cases/<case>/params.json (with `loras`), result.png, latents.safetensors
"""

import common
import controlnet
import lora
import pipeline
import torch


def main():
    args = common.parse_args(__doc__)
    common.seed_everything(args.seed)
    pipe = pipeline.build(args.out)
    nets = controlnet.make_controlnets(args.out, pipe.unet)
    (args.out / "controls").mkdir(exist_ok=True)
    for kind in ("edges", "depth"):
        controlnet.control_image(kind, 96, 64).save(args.out / "controls" / f"{kind}-96x64.png")
    init = pipeline.init_image(96, 64)
    init.save(args.out / "init.png")

    lora_dir = args.out / "loras"
    lora_dir.mkdir()
    unet_attention = [name for name, m in pipe.unet.named_modules()
                      if isinstance(m, torch.nn.Linear) and ".attn" in name]
    text = {f"encoder.layers.{i}.{m}": lora.RANK for i in range(3) for m in lora.TEXT_MODULES}
    a = lora.make_lora(pipe, {name: lora.RANK for name in unet_attention}, text,
                       {f"text_model.{k}": v for k, v in text.items()}, 1)
    a = {component: {name.removeprefix("text_model."): f for name, f in modules.items()}
         for component, modules in a.items()}
    lora.save_kohya(pipe, a, lora_dir / "a_kohya.safetensors", lora.A_ALPHA)
    b_unet = {name: lora.RANK for name, m in pipe.unet.named_modules()
              if isinstance(m, torch.nn.Linear) and ".ff.net" in name}
    b_te1 = {"encoder.layers.2.mlp.fc2": lora.RANK, "encoder.layers.2.self_attn.k_proj": lora.RANK}
    b_te2 = {f"text_model.encoder.layers.{i}.{m}": lora.RANK for i in (1, 2) for m in lora.TEXT_MODULES}
    b = lora.make_lora(pipe, b_unet, b_te1, b_te2, 2)
    lora.save_peft(pipe, b, lora_dir / "b_peft.safetensors", None, None)

    base = {"prompt": "a studio portrait, warm light", "negative_prompt": "", "guidance": 5.0,
            "width": 96, "height": 64}
    edges = {"net": "controlnet-a", "image": "edges-96x64.png", "scale": 0.8, "start": 0.0, "end": 1.0}
    depth = {"net": "controlnet-b", "image": "depth-96x64.png", "scale": 0.5, "start": 0.2, "end": 0.8}
    cases = {
        # The profile preset's shape: img2img 0.6 + one ControlNet + one LoRA.
        "profile-img2img": (True, "euler", [["a_kohya.safetensors", 1.0]],
                            dict(base, steps=10, seed=3, strength=0.6, controls=[edges])),
        "all-txt2img": (False, "euler-a", [["a_kohya.safetensors", 0.7], ["b_peft.safetensors", 0.4]],
                        dict(base, steps=6, seed=9, controls=[edges, depth])),
        "all-img2img": (True, "euler", [["a_kohya.safetensors", 0.7], ["b_peft.safetensors", 0.4]],
                        dict(base, steps=10, seed=4, strength=0.6, controls=[edges, depth])),
    }
    for name, (img2img, scheduler, loras, params) in cases.items():
        fused = lora.fuse(args.out / "model", loras, lora_dir)
        controlnet.run_case(args.out, name, img2img, fused.components, nets, scheduler,
                            dict(params, loras=loras), init=init if img2img else None)


if __name__ == "__main__":
    main()
