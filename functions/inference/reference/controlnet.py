"""Reference ControlNet outputs on the tiny random SDXL of pipeline.py: two ControlNets made with
`ControlNetModel.from_unet` and re-randomized (so their zero-initialised convolutions are not
zero), saved as diffusers model folders, one ControlNet forward pass with its residuals, and the
images and final latents diffusers' StableDiffusionXLControlNetPipeline and
StableDiffusionXLControlNetImg2ImgPipeline produce with one and with two ControlNets.

Output:
  model/                          the SDXL pipeline (pipeline.build)
  controlnet-a/, controlnet-b/    ControlNets, `save_pretrained` (config.json + safetensors)
  controlnet-a-fp16/              controlnet-a saved with variant="fp16" in half precision
  controlnet-wide-text/           a ControlNet for 64-wide text states (the base has 96)
  controls/<name>.png             control images; init.png the img2img input
  module.safetensors              inputs and outputs of one controlnet-a forward pass
  cases/<case>/params.json        what was run
  cases/<case>/result.png, latents.safetensors
"""

import copy

import common
import pipeline

import numpy as np
import torch
from PIL import Image

SCHEDULERS = ("euler", "euler-a")
RESIDUAL_BOOST = 6.0


def control_image(kind: str, width: int, height: int) -> Image.Image:
    """Control-like pictures: thin rings (an edge map) and soft blobs (a depth map)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    if kind == "edges":
        r = np.hypot(x - width * 0.4, y - height * 0.55)
        v = np.where(np.abs(np.sin(r / 3.0)) < 0.25, 255.0, 0.0)
        rgb = np.stack([v, v, v], axis=-1)
    else:
        d = 128 + 90 * np.cos(x / 9.0) * np.sin(y / 11.0) + 30 * np.sin((x + y) / 5.0)
        rgb = np.stack([d, 0.8 * d, 255 - d], axis=-1)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def make_controlnets(out, unet):
    from diffusers import ControlNetModel

    nets = {}
    for name in ("controlnet-a", "controlnet-b"):
        net = ControlNetModel.from_unet(unet).eval()
        pipeline.randomize(net, 0.05)
        with torch.no_grad():
            # Residuals strong enough that a ControlNet left out shows far beyond the tolerances.
            for key, p in net.named_parameters():
                if key.startswith(("controlnet_down_blocks.", "controlnet_mid_block.")):
                    p.mul_(RESIDUAL_BOOST)
        net.save_pretrained(out / name, safe_serialization=True)
        nets[name] = net
    copy.deepcopy(nets["controlnet-a"]).to(torch.float16).save_pretrained(
        out / "controlnet-a-fp16", safe_serialization=True, variant="fp16"
    )
    config = dict(nets["controlnet-a"].config)
    config["cross_attention_dim"] = 64
    wide = ControlNetModel.from_config(config).eval()
    wide.save_pretrained(out / "controlnet-wide-text", safe_serialization=True)
    return nets


def module_check(out, net):
    """One forward pass with a CFG-sized batch, a non-trivial scale and a float timestep."""
    generator = torch.Generator("cpu").manual_seed(5)
    sample = torch.randn(2, 4, 8, 12, generator=generator)
    hidden = torch.randn(2, 7, 96, generator=generator)
    text_embeds = torch.randn(2, 32, generator=generator)
    time_ids = torch.tensor([[64.0, 96.0, 0.0, 0.0, 64.0, 96.0]] * 2)
    cond = torch.rand(2, 3, 64, 96, generator=generator)
    with torch.no_grad():
        down, mid = net(
            sample, 421.0, encoder_hidden_states=hidden, controlnet_cond=cond, conditioning_scale=0.7,
            added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}, return_dict=False,
        )
    tensors = {"sample": sample, "encoder_hidden_states": hidden, "text_embeds": text_embeds,
               "time_ids": time_ids, "controlnet_cond": cond, "mid": mid}
    tensors.update({f"down.{i}": d for i, d in enumerate(down)})
    common.save_tensors(out / "module.safetensors", tensors)


def run_case(out, name, img2img, components, nets, scheduler, params, init=None):
    import diffusers
    from diffusers import StableDiffusionXLControlNetImg2ImgPipeline, StableDiffusionXLControlNetPipeline

    cls_name, extra = pipeline.SCHEDULERS[scheduler]
    components = dict(components)
    components["scheduler"] = getattr(diffusers, cls_name).from_config(pipeline.SDXL_SCHEDULER, **extra)
    controls = params["controls"]
    models = [nets[c["net"]] for c in controls]
    images = [Image.open(out / "controls" / c["image"]).convert("RGB") for c in controls]
    single = len(controls) == 1
    components["controlnet"] = models[0] if single else models
    cls = StableDiffusionXLControlNetImg2ImgPipeline if img2img else StableDiffusionXLControlNetPipeline
    pipe = cls(**components, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    captured = {}

    def capture(_pipe, step, _timestep, kwargs):
        captured["latents"] = kwargs["latents"].clone()
        return kwargs

    def per_net(key):
        values = [c[key] for c in controls]
        return values[0] if single else values

    kwargs = dict(
        prompt=params["prompt"],
        negative_prompt=params["negative_prompt"],
        num_inference_steps=params["steps"],
        guidance_scale=params["guidance"],
        generator=torch.Generator("cpu").manual_seed(params["seed"]),
        output_type="np",
        callback_on_step_end=capture,
        controlnet_conditioning_scale=per_net("scale"),
        control_guidance_start=per_net("start"),
        control_guidance_end=per_net("end"),
    )
    control = images[0] if single else images
    if img2img:
        kwargs.update(image=init, control_image=control, strength=params["strength"])
    else:
        kwargs.update(image=control, width=params["width"], height=params["height"])
    result = pipe(**kwargs).images[0]
    case = out / "cases" / name
    case.mkdir(parents=True, exist_ok=True)
    Image.fromarray((result * 255).round().astype(np.uint8)).save(case / "result.png")
    common.save_tensors(case / "latents.safetensors", {"latents": captured["latents"]})
    common.write_json(case / "params.json", dict(params, scheduler=scheduler))


def main():
    args = common.parse_args(__doc__)
    common.seed_everything(args.seed)
    pipe = pipeline.build(args.out)
    nets = make_controlnets(args.out, pipe.unet)
    module_check(args.out, nets["controlnet-a"])

    (args.out / "controls").mkdir(exist_ok=True)
    for kind in ("edges", "depth"):
        for width, height in ((64, 64), (96, 64)):
            control_image(kind, width, height).save(args.out / "controls" / f"{kind}-{width}x{height}.png")
    init = pipeline.init_image(96, 64)
    init.save(args.out / "init.png")

    components = pipe.components
    base = {"prompt": "a studio portrait, warm light", "negative_prompt": "", "guidance": 5.0}

    def one(size):
        return [{"net": "controlnet-a", "image": f"edges-{size}.png", "scale": 0.8, "start": 0.0, "end": 1.0}]

    def two(size):
        return [
            {"net": "controlnet-a", "image": f"edges-{size}.png", "scale": 0.5, "start": 0.0, "end": 0.6},
            {"net": "controlnet-b", "image": f"depth-{size}.png", "scale": 1.0, "start": 0.3, "end": 1.0},
        ]

    for scheduler in SCHEDULERS:
        run_case(args.out, f"txt2img-one-{scheduler}", False, components, nets, scheduler,
                 dict(base, steps=6, seed=42, width=64, height=64, controls=one("64x64")))
        run_case(args.out, f"txt2img-two-{scheduler}", False, components, nets, scheduler,
                 dict(base, steps=6, seed=7, width=96, height=64, negative_prompt="blurry",
                      controls=two("96x64")))
        run_case(args.out, f"img2img-one-{scheduler}", True, components, nets, scheduler,
                 dict(base, steps=10, seed=3, strength=0.6, width=96, height=64, controls=one("96x64")),
                 init=init)
        run_case(args.out, f"img2img-two-{scheduler}", True, components, nets, scheduler,
                 dict(base, steps=10, seed=11, strength=0.6, width=96, height=64, controls=two("96x64")),
                 init=init)


if __name__ == "__main__":
    main()
