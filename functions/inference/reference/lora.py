"""Reference LoRA outputs: random rank-4 LoRAs for the tiny SDXL of pipeline.py, in the formats
users bring, and what diffusers renders with them fused (`load_lora_weights` + `set_adapters` +
`fuse_lora`).

LoRA "a" adapts the UNet (attention, feed-forward and projection linears, the time-embedding
projection of a resnet, 3×3 and 1×1 convolutions, one of them at rank 2) and both text encoders,
with `lora_alpha` ≠ rank (scale 2 on the UNet, 0.5 and 1.5 on the text encoders). It is written
three ways:
  - diffusers/PEFT (`StableDiffusionXLPipeline.save_lora_weights`, `lora_A`/`lora_B` keys, the
    alphas in the `lora_adapter_metadata` header);
  - kohya/sd-scripts (`lora_unet_…` in the original SGM UNet naming, `lora_te1_…`, `lora_te2_…`,
    `.lora_down.weight`/`.lora_up.weight`/`.alpha`), converted here; the script checks that
    diffusers fuses it to the same weights as the PEFT file;
  - the older diffusers naming (`….lora.down.weight`/`….lora.up.weight`, no alphas: the scale is
    folded into the up factors), which diffusers loads too; checked the same way.
LoRA "b" (PEFT, alpha = rank, no metadata) adapts other layers and overlaps "a" on some.

Bad files for the refusal tests: an SD 1.5-shaped kohya LoRA, "a" with an unknown module, "a"
with one factor of the wrong shape.

Output:
  model/                         the pipeline (pipeline.py's `build`)
  init.png                       the img2img input
  loras/a_peft.safetensors, a_kohya.safetensors, a_old.safetensors, b_peft.safetensors
  loras/sd15.safetensors, bad_unknown.safetensors, bad_shape.safetensors
  cases/<case>/params.json       prompt, steps, …, and `loras`: [[file, weight], …]
  cases/<case>/result.png        the image diffusers made
  cases/<case>/latents.safetensors  final latents ("latents")
  cases/<case>/fused.safetensors the fused values of every parameter a LoRA changed,
                                 named `<component>.<parameter>` (transformers/diffusers names;
                                 the first text encoder's without `text_model.`)
"""


import common
import pipeline as reference

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

RANK = 4

# UNet modules of LoRA "a" (diffusers names); the rest of the list is every attention projection.
A_UNET_EXTRA = {
    "down_blocks.1.resnets.0.conv1": 2,          # 3×3 conv at rank 2 (rank_pattern)
    "down_blocks.1.resnets.0.conv_shortcut": RANK,  # 1×1 conv
    "down_blocks.1.resnets.0.time_emb_proj": RANK,
    "up_blocks.0.upsamplers.0.conv": RANK,       # 3×3 conv, SGM output_blocks.2.2.conv
    "down_blocks.0.downsamplers.0.conv": RANK,   # SGM input_blocks.3.0.op
    "mid_block.resnets.1.conv2": RANK,           # SGM middle_block.2.out_layers.3
    "conv_in": RANK,
    "time_embedding.linear_1": RANK,
    "add_embedding.linear_2": RANK,
    "up_blocks.1.attentions.2.proj_out": RANK,
}
A_ALPHA = {"unet": 8.0, "text_encoder": 2.0, "text_encoder_2": 6.0}
TEXT_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                "mlp.fc1", "mlp.fc2")


def modules_of(model):
    return dict(model.named_modules())


def lora_pair(module, rank, generator):
    """Random factors for a Linear or Conv2d, PEFT layout: A (rank, in[, kh, kw]), B (out, rank[, 1, 1])."""
    weight = module.weight
    if weight.dim() == 4:
        a_shape = (rank, weight.shape[1], weight.shape[2], weight.shape[3])
        b_shape = (weight.shape[0], rank, 1, 1)
    else:
        a_shape = (rank, weight.shape[1])
        b_shape = (weight.shape[0], rank)
    a = 0.1 * torch.randn(a_shape, generator=generator)
    b = 0.1 * torch.randn(b_shape, generator=generator)
    return a, b


def make_lora(pipe, unet_targets, te1_targets, te2_targets, seed):
    """{component: {module: (A, B)}} for the given {module: rank} targets."""
    generator = torch.Generator().manual_seed(seed)
    lora = {}
    for component, model, targets in (("unet", pipe.unet, unet_targets),
                                      ("text_encoder", pipe.text_encoder, te1_targets),
                                      ("text_encoder_2", pipe.text_encoder_2, te2_targets)):
        modules = modules_of(model)
        lora[component] = {name: lora_pair(modules[name], rank, generator)
                           for name, rank in sorted(targets.items())}
    return lora


def lora_config(targets, alpha):
    """The LoraConfig dict diffusers writes as adapter metadata (rank_pattern for odd ranks)."""
    from peft import LoraConfig

    rank_pattern = {name: rank for name, rank in targets.items() if rank != RANK}
    config = LoraConfig(r=RANK, lora_alpha=alpha, target_modules=sorted(targets),
                        rank_pattern=rank_pattern).to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}


def save_peft(pipe, lora, path, alphas, targets):
    from diffusers import StableDiffusionXLPipeline

    layers = {component: {f"{name}.lora_A.weight": a for name, (a, b) in modules.items()}
              | {f"{name}.lora_B.weight": b for name, (a, b) in modules.items()}
              for component, modules in lora.items()}
    metadata = {}
    if alphas is not None:
        metadata = {f"{component}_lora_adapter_metadata": lora_config(targets[component], alphas[component])
                    for component in lora}
    StableDiffusionXLPipeline.save_lora_weights(
        path.parent, weight_name=path.name,
        unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
        text_encoder_2_lora_layers=layers["text_encoder_2"], **metadata,
    )


def sgm_unet_name(name, config):
    """The original (SGM, `openaimodel.py`) name of a diffusers UNet module."""
    per_level = config.layers_per_block + 1
    has_attention = ["CrossAttn" in kind for kind in config.up_block_types]
    fixed = {"conv_in": "input_blocks.0.0", "conv_out": "out.2",
             "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    if name in fixed:
        return fixed[name]
    resnet = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
              "conv_shortcut": "skip_connection"}
    parts = name.split(".")
    if parts[0] == "down_blocks":
        level = int(parts[1])
        if parts[2] == "downsamplers":
            return f"input_blocks.{1 + level * per_level + config.layers_per_block}.0.op"
        index = 1 + level * per_level + int(parts[3])
        if parts[2] == "resnets":
            return f"input_blocks.{index}.0.{resnet[parts[4]]}"
        return f"input_blocks.{index}.1." + ".".join(parts[4:])
    if parts[0] == "mid_block":
        if parts[1] == "attentions":
            return "middle_block.1." + ".".join(parts[3:])
        return f"middle_block.{0 if parts[2] == '0' else 2}.{resnet[parts[3]]}"
    if parts[0] == "up_blocks":
        level = int(parts[1])
        if parts[2] == "upsamplers":
            slot = 2 if has_attention[level] else 1
            return f"output_blocks.{level * per_level + per_level - 1}.{slot}.conv"
        index = level * per_level + int(parts[3])
        if parts[2] == "resnets":
            return f"output_blocks.{index}.0.{resnet[parts[4]]}"
        return f"output_blocks.{index}.1." + ".".join(parts[4:])
    raise ValueError(f"no SGM name for {name}")


def save_kohya(pipe, lora, path, alphas):
    tensors = {}
    for component, modules in lora.items():
        for name, (a, b) in modules.items():
            if component == "unet":
                key = "lora_unet_" + sgm_unet_name(name, pipe.unet.config).replace(".", "_")
            else:
                te = "lora_te1_" if component == "text_encoder" else "lora_te2_"
                key = te + ("text_model." + name).replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = a.contiguous()
            tensors[f"{key}.lora_up.weight"] = b.contiguous()
            tensors[f"{key}.alpha"] = torch.tensor(alphas[component])
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})


def save_old(lora, path, alphas):
    """The pre-PEFT diffusers naming: `unet.<module>.lora.down.weight`,
    `text_encoder.text_model.<module>.lora_linear_layer.down.weight`; no alphas (scale 1), so the
    scale alpha/rank is folded into the up factors."""
    tensors = {}
    for component, modules in lora.items():
        for name, (a, b) in modules.items():
            scale = alphas[component] / a.shape[0]
            if component == "unet":
                base = f"unet.{name}.lora"
            else:
                base = f"{component}.text_model.{name}.lora_linear_layer"
            tensors[f"{base}.down.weight"] = a.contiguous()
            tensors[f"{base}.up.weight"] = (b * scale).contiguous()
    save_file(tensors, str(path))


def fresh(model_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def state(pipe):
    return {f"{component}.{name}": p.detach().clone()
            for component in ("unet", "text_encoder", "text_encoder_2")
            for name, p in getattr(pipe, component).state_dict().items()}


def fuse(model_dir, loras, lora_dir):
    """A fresh pipeline with `loras` ([(file, weight)]) loaded, weighted and fused."""
    pipe = fresh(model_dir)
    names = []
    for index, (file, _) in enumerate(loras):
        name = f"lora{index}"
        pipe.load_lora_weights(str(lora_dir / file), adapter_name=name)
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[weight for _, weight in loras])
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # keeps the fused weights, drops the adapter layers
    return pipe


def changed(base, fused):
    out = {}
    for key, value in fused.items():
        if not torch.equal(value, base[key]):
            out[key] = value
    return out


def run(out, name, pipe, params, image=None):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    captured = {}

    def capture(_pipe, step, _timestep, kwargs):
        captured["latents"] = kwargs["latents"].clone()
        return kwargs

    kwargs = dict(prompt=params["prompt"], negative_prompt=params["negative_prompt"],
                  num_inference_steps=params["steps"], guidance_scale=params["guidance"],
                  generator=torch.Generator("cpu").manual_seed(params["seed"]), output_type="np",
                  callback_on_step_end=capture)
    if image is None:
        kwargs.update(width=params["width"], height=params["height"])
    else:
        pipe = StableDiffusionXLImg2ImgPipeline(**pipe.components)
        pipe.set_progress_bar_config(disable=True)
        kwargs.update(image=image, strength=params["strength"])
    result = pipe(**kwargs).images[0]
    case = out / "cases" / name
    case.mkdir(parents=True, exist_ok=True)
    Image.fromarray((result * 255).round().astype(np.uint8)).save(case / "result.png")
    common.save_tensors(case / "latents.safetensors", {"latents": captured["latents"]})
    common.write_json(case / "params.json", params)
    return captured["latents"]


def main():
    args = common.parse_args(__doc__)
    common.seed_everything(args.seed)
    pipe = reference.build(args.out)
    model_dir = args.out / "model"
    lora_dir = args.out / "loras"
    lora_dir.mkdir()

    unet_modules = [name for name, m in pipe.unet.named_modules()
                    if isinstance(m, torch.nn.Linear) and ".attn" in name]
    a_targets = {
        "unet": {name: RANK for name in unet_modules} | A_UNET_EXTRA,
        "text_encoder": {f"encoder.layers.{i}.{m}": RANK for i in range(3) for m in TEXT_MODULES},
        "text_encoder_2": {f"text_model.encoder.layers.{i}.{m}": RANK for i in range(3)
                           for m in TEXT_MODULES},
    }
    # CLIPTextModel has no `text_model.` level in transformers 5; the other class keeps it.
    a = make_lora(pipe, a_targets["unet"], a_targets["text_encoder"], a_targets["text_encoder_2"], 1)
    save_peft(pipe, a, lora_dir / "a_peft.safetensors", A_ALPHA, a_targets)
    a_unprefixed = {component: {name.removeprefix("text_model."): f for name, f in modules.items()}
                    for component, modules in a.items()}
    save_kohya(pipe, a_unprefixed, lora_dir / "a_kohya.safetensors", A_ALPHA)
    save_old(a_unprefixed, lora_dir / "a_old.safetensors", A_ALPHA)

    b_unet = {name: RANK for name in unet_modules if ".attn2.to_k" in name or ".attn2.to_v" in name}
    b_unet |= {name: RANK for name, m in pipe.unet.named_modules()
               if isinstance(m, torch.nn.Linear) and ".ff.net" in name}
    b_unet |= {"down_blocks.1.resnets.0.conv1": RANK, "up_blocks.2.resnets.1.conv2": RANK}
    b_te2 = {f"text_model.encoder.layers.{i}.{m}": RANK for i in (1, 2) for m in TEXT_MODULES}
    # diffusers cannot read a PEFT text-encoder LoRA whose only targets are MLPs (its key-format
    # sniffing looks for attention names), so "b" adapts one attention projection too.
    b_te1 = {"encoder.layers.2.mlp.fc2": RANK, "encoder.layers.2.self_attn.k_proj": RANK}
    b = make_lora(pipe, b_unet, b_te1, b_te2, 2)
    save_peft(pipe, b, lora_dir / "b_peft.safetensors", None, None)

    save_bad_loras(lora_dir)

    init = reference.init_image(96, 64)
    init.save(args.out / "init.png")
    base = {"prompt": "a storybook fox in a forest", "negative_prompt": "", "steps": 6,
            "guidance": 5.0, "seed": 11, "width": 64, "height": 64, "strength": None}
    cases = {
        "txt2img-a-peft": (base, [["a_peft.safetensors", 1.0]]),
        "txt2img-a-kohya": (base, [["a_kohya.safetensors", 1.0]]),
        "txt2img-a-old": (base, [["a_old.safetensors", 1.0]]),
        "txt2img-two": (dict(base, seed=5), [["a_peft.safetensors", 0.7], ["b_peft.safetensors", 0.4]]),
        "img2img-a-kohya": (dict(base, width=96, height=64, strength=0.6),
                            [["a_kohya.safetensors", 0.8]]),
    }
    base_state = state(fresh(model_dir))
    plain = run(args.out, "txt2img-none", fresh(model_dir), dict(base, loras=[]))
    fused_by_case = {}
    effects = {}
    for name, (params, loras) in cases.items():
        fused = fuse(model_dir, loras, lora_dir)
        delta = changed(base_state, state(fused))
        fused_by_case[name] = delta
        image = init if params["strength"] is not None else None
        latents = run(args.out, name, fused, dict(params, loras=loras), image)
        common.save_tensors(args.out / "cases" / name / "fused.safetensors", delta)
        if image is None and params["seed"] == base["seed"]:
            # The tiny VAE renders low-contrast images: judge the LoRA's effect on the latents,
            # which the tests bound 10× tighter than this.
            change = ((latents - plain).abs().max() / plain.abs().max()).item()
            effects[name] = change
            assert change > 0.01, f"{name}: the LoRA barely changes the latents ({change})"

    # diffusers reads the three spellings of "a" to the same fused weights.
    peft = fused_by_case["txt2img-a-peft"]
    expected = sum(len(m) for m in a.values())
    assert len(peft) == expected, (len(peft), expected)
    for other in ("txt2img-a-kohya", "txt2img-a-old"):
        assert peft.keys() == fused_by_case[other].keys(), other
        worst = max((peft[k] - fused_by_case[other][k]).abs().max().item() for k in peft)
        assert worst <= 1e-6, f"{other}: fused weights differ from the PEFT file's by {worst}"
    common.write_json(args.out / "summary.json", {
        "a_modules": {c: len(m) for c, m in a.items()},
        "b_modules": {c: len(m) for c, m in b.items()},
        "latents_relative_change": effects,
    })


def save_bad_loras(lora_dir):
    """LoRAs this model must refuse."""
    from safetensors.torch import load_file

    kohya = load_file(str(lora_dir / "a_kohya.safetensors"))
    # An unknown module next to valid ones.
    unknown = dict(kohya)
    unknown["lora_unet_input_blocks_4_1_transformer_blocks_7_attn1_to_q.lora_down.weight"] = torch.zeros(RANK, 64)
    unknown["lora_unet_input_blocks_4_1_transformer_blocks_7_attn1_to_q.lora_up.weight"] = torch.zeros(64, RANK)
    unknown["lora_te2_text_model_encoder_layers_9_mlp_fc1.lora_down.weight"] = torch.zeros(RANK, 64)
    unknown["lora_te2_text_model_encoder_layers_9_mlp_fc1.lora_up.weight"] = torch.zeros(128, RANK)
    save_file(unknown, str(lora_dir / "bad_unknown.safetensors"))
    # One factor of the wrong shape.
    shape = dict(kohya)
    key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight"
    shape[key] = torch.zeros(RANK, 77)
    save_file(shape, str(lora_dir / "bad_shape.safetensors"))
    # SD 1.5-shaped: one text encoder (`lora_te_`, 768 wide), 768-dim cross-attention, attention
    # on the first down level.
    sd15 = {}
    for i in range(2):
        for m in ("self_attn_q_proj", "mlp_fc1"):
            out_features = 3072 if m == "mlp_fc1" else 768
            sd15[f"lora_te_text_model_encoder_layers_{i}_{m}.lora_down.weight"] = torch.zeros(RANK, 768)
            sd15[f"lora_te_text_model_encoder_layers_{i}_{m}.lora_up.weight"] = torch.zeros(out_features, RANK)
            sd15[f"lora_te_text_model_encoder_layers_{i}_{m}.alpha"] = torch.tensor(1.0)
    for block, width in (("down_blocks_0_attentions_0", 320), ("down_blocks_1_attentions_0", 640),
                         ("mid_block_attentions_0", 1280)):
        for m, inputs in (("attn1_to_q", width), ("attn2_to_k", 768), ("attn2_to_v", 768)):
            key = f"lora_unet_{block}_transformer_blocks_0_{m}"
            sd15[f"{key}.lora_down.weight"] = torch.zeros(RANK, inputs)
            sd15[f"{key}.lora_up.weight"] = torch.zeros(width, RANK)
            sd15[f"{key}.alpha"] = torch.tensor(1.0)
    save_file(sd15, str(lora_dir / "sd15.safetensors"))


if __name__ == "__main__":
    main()
