"""Reference whole-pipeline outputs: a tiny random SDXL (real block layout, tiny widths) saved in
the diffusers folder layout, and the images and final latents diffusers'
StableDiffusionXLPipeline / StableDiffusionXLImg2ImgPipeline produce with it for each scheduler,
txt2img and img2img at two strengths, square and non-square.

Output:
  model/                      the pipeline, `save_pretrained` (safetensors)
  init.png                    the img2img input
  cases/<case>/params.json    what was run
  cases/<case>/result.png     the image diffusers made
  cases/<case>/latents.safetensors  final latents ("latents") before the VAE decode
"""

import common

import numpy as np
import torch
from PIL import Image

SCHEDULERS = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp-2m-karras": (
        "DPMSolverMultistepScheduler",
        {"use_karras_sigmas": True, "algorithm_type": "dpmsolver++", "solver_order": 2},
    ),
    "ddim": ("DDIMScheduler", {}),
}

# SDXL base 1.0's scheduler/scheduler_config.json (an EulerDiscreteScheduler).
SDXL_SCHEDULER = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


def randomize(module: torch.nn.Module, scale: float) -> None:
    """Re-draws every parameter: diffusers zero-initialises some output layers, which would let
    a wrong implementation of what follows them pass unnoticed."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight") or ".norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(scale * torch.randn_like(p))


def build(out):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    te1_config = CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=32,
    )
    te2_config = CLIPTextConfig(
        vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=0, projection_dim=32,
    )
    text_encoder = CLIPTextModel(te1_config).eval()
    text_encoder_2 = CLIPTextModelWithProjection(te2_config).eval()
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),
        cross_attention_dim=32 + 64,
        norm_num_groups=32,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
    ).eval()
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=0.13025,
        force_upcast=True,
    ).eval()
    for model, scale in ((text_encoder, 0.05), (text_encoder_2, 0.05), (unet, 0.05), (vae, 0.05)):
        randomize(model, scale)
    tokenizer_dir = common.clip_vocabulary_files(out / "vocabulary")
    tokenizer = CLIPTokenizer(
        str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"), model_max_length=77
    )
    tokenizer_2 = CLIPTokenizer(
        str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"), pad_token="!",
        model_max_length=77,
    )
    scheduler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(out / "model", safe_serialization=True)
    # Real SDXL folders carry the slow tokenizer's files, not tokenizer.json: lay them out so.
    for folder, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        target = out / "model" / folder
        (target / "tokenizer.json").unlink()
        for name in ("vocab.json", "merges.txt"):
            (target / name).write_bytes((tokenizer_dir / name).read_bytes())
        special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                   "pad_token": pad, "unk_token": "<|endoftext|>"}
        common.write_json(target / "special_tokens_map.json", special)
    return pipe


def init_image(width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack(
        [128 + 100 * np.sin(x / 7.0), 128 + 100 * np.cos(y / 5.0), (x * 3 + y * 2) % 256], axis=-1
    )
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def run_case(out, name, pipe_cls, components, scheduler, params, image=None):
    import diffusers

    cls_name, extra = SCHEDULERS[scheduler]
    components = dict(components)
    components["scheduler"] = getattr(diffusers, cls_name).from_config(SDXL_SCHEDULER, **extra)
    pipe = pipe_cls(**components)
    pipe.set_progress_bar_config(disable=True)
    captured = {}

    def capture(_pipe, step, _timestep, kwargs):
        captured["latents"] = kwargs["latents"].clone()
        return kwargs

    kwargs = dict(
        prompt=params["prompt"],
        negative_prompt=params["negative_prompt"],
        num_inference_steps=params["steps"],
        guidance_scale=params["guidance"],
        generator=torch.Generator("cpu").manual_seed(params["seed"]),
        output_type="np",
        callback_on_step_end=capture,
    )
    if image is None:
        kwargs.update(width=params["width"], height=params["height"])
    else:
        kwargs.update(image=image, strength=params["strength"])
    result = pipe(**kwargs).images[0]
    case = out / "cases" / name
    case.mkdir(parents=True, exist_ok=True)
    Image.fromarray((result * 255).round().astype(np.uint8)).save(case / "result.png")
    common.save_tensors(case / "latents.safetensors", {"latents": captured["latents"]})
    common.write_json(case / "params.json", dict(params, scheduler=scheduler))


def main():
    args = common.parse_args(__doc__)
    common.seed_everything(args.seed)
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    pipe = build(args.out)
    components = pipe.components
    base = {"prompt": "a studio portrait, warm light", "negative_prompt": "", "steps": 6,
            "guidance": 5.0, "seed": 42}
    init = init_image(96, 64)
    init.save(args.out / "init.png")
    for scheduler in SCHEDULERS:
        run_case(args.out, f"txt2img-{scheduler}", StableDiffusionXLPipeline, components, scheduler,
                 dict(base, width=64, height=64))
        run_case(args.out, f"txt2img-{scheduler}-wide", StableDiffusionXLPipeline, components, scheduler,
                 dict(base, width=96, height=64, negative_prompt="blurry", seed=7))
        for strength in (0.3, 0.7):
            run_case(args.out, f"img2img-{scheduler}-{strength}", StableDiffusionXLImg2ImgPipeline,
                     components, scheduler, dict(base, strength=strength, width=96, height=64), image=init)


if __name__ == "__main__":
    main()
