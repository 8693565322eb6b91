"""The diffusers half of `darkroom-bench`: builds the benchmark's random-weight SDXL folders and
times diffusers' StableDiffusionXLPipeline on them, so Darkroom and diffusers run the same weights.

Modes:
  --make-model DIR --size tiny|full [--dtype f32|f16|bf16]
      Writes a diffusers SDXL folder to DIR/model. tiny: the configuration of
      reference/pipeline.py's build() (same function, same random draws). full: the real SDXL 1.0
      base architecture (stabilityai/stable-diffusion-xl-base-1.0's unet/vae/text_encoder*/
      config.json values) with small random normal weights, stored in fp16 for --dtype f16, bf16
      for --dtype bf16, else f32.
  --make-extras DIR --model DIR/model [--dtype f32|f16|bf16] [--rank R]
      What the `profile` workload adds to a model folder, written under DIR: controlnet/ (diffusers'
      ControlNetModel.from_unet on the model's UNet, then random weights like the rest, so the
      zero convolutions are not zero) and lora/a.safetensors, lora/b.safetensors (two random
      rank-R LoRAs in the diffusers/PEFT format, `lora_A`/`lora_B`, alpha = rank, on every
      attention projection of the UNet (to_q/to_k/to_v/to_out.0) and of both text encoders
      (q/k/v/out_proj)).
  --run --model DIR --device cpu|cuda[:N] --dtype f32|f16|bf16 --steps N --width W --height H
        --runs R [--threads T] [--seed S] [--guidance G]
      Loads DIR, warms up once, times R txt2img runs (Euler, CFG), prints one JSON object on
      stdout: load_s, seconds (per run), denoise_s (per run), steps, peak_rss_bytes,
      cuda_max_allocated_bytes, cuda_max_reserved_bytes, threads, versions.
      --workload profile --controlnet DIR --lora FILE [--lora-weight W] --init PNG --control PNG
        [--strength S] [--control-scale C] [--control-end E]: the profile preset's shape instead,
        StableDiffusionXLControlNetImg2ImgPipeline with the LoRA loaded, weighted, fused and its
        adapter layers dropped (`fuse_lora` + `unload_lora_weights`) before the clock starts.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import common  # noqa: F401  (sets the offline/verbosity environment before diffusers loads)
import torch

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}

# SDXL base 1.0's unet/config.json (the values that differ from UNet2DConditionModel's defaults).
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    norm_num_groups=32,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)

# SDXL base 1.0's vae/config.json.
SDXL_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,
)

# text_encoder/config.json (CLIP ViT-L/14) and text_encoder_2/config.json (OpenCLIP ViT-bigG/14).
SDXL_TE1 = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
    bos_token_id=0, eos_token_id=2, pad_token_id=1, projection_dim=768,
)
SDXL_TE2 = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
    num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
    bos_token_id=0, eos_token_id=2, pad_token_id=1, projection_dim=1280,
)


def fill_random(module: torch.nn.Module, dtype: torch.dtype, std: float = 0.02) -> None:
    """Replaces every parameter by small random normals in `dtype` (norm scales around 1),
    parameter by parameter, so the f32 originals are freed as it goes."""
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for sub in module.modules():
            for name, p in list(sub.named_parameters(recurse=False)):
                fresh = torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std)
                if isinstance(sub, norms) and name == "weight":
                    fresh = 1.0 + 5.0 * fresh
                p.data = fresh.to(dtype)
        module.to(dtype)


def layout_tokenizers(model: Path, vocabulary: Path) -> None:
    """The tokenizer folders real SDXL repositories carry (slow tokenizer files)."""
    for folder, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        target = model / folder
        target.mkdir(parents=True, exist_ok=True)
        for name in ("vocab.json", "merges.txt"):
            (target / name).write_bytes((vocabulary / name).read_bytes())
        common.write_json(target / "special_tokens_map.json", {
            "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
            "pad_token": pad, "unk_token": "<|endoftext|>"})
        common.write_json(target / "tokenizer_config.json", {
            "tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
            "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
            "pad_token": pad, "unk_token": "<|endoftext|>", "do_lower_case": True})


def make_full(out: Path, dtype: torch.dtype) -> None:
    """Builds the SDXL base architecture one component at a time (the f32 UNet alone is 10 GB)."""
    import diffusers
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from pipeline import SDXL_SCHEDULER
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    model = out / "model"
    builders = {
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**SDXL_TE1)),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TE2)),
        "vae": lambda: AutoencoderKL(**SDXL_VAE),
        "unet": lambda: UNet2DConditionModel(**SDXL_UNET),
    }
    for name, builder in builders.items():
        started = time.perf_counter()
        component = builder().eval()
        fill_random(component, dtype)
        component.save_pretrained(model / name, safe_serialization=True)
        params = sum(p.numel() for p in component.parameters())
        del component
        print(f"{name}: {params / 1e6:.0f} M parameters, {time.perf_counter() - started:.0f} s",
              file=sys.stderr)
    EulerDiscreteScheduler.from_config(SDXL_SCHEDULER).save_pretrained(model / "scheduler")
    layout_tokenizers(model, common.clip_vocabulary_files(out / "vocabulary"))
    common.write_json(model / "model_index.json", {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": diffusers.__version__,
        "force_zeros_for_empty_prompt": True,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })


def make_model(args) -> None:
    out = args.make_model
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    if args.size == "tiny":
        from pipeline import build

        build(out)
    else:
        make_full(out, DTYPES[args.dtype])


LORA_TARGETS = {
    "unet": (".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight"),
    "text_encoder": (".q_proj.weight", ".k_proj.weight", ".v_proj.weight", ".out_proj.weight"),
    "text_encoder_2": (".q_proj.weight", ".k_proj.weight", ".v_proj.weight", ".out_proj.weight"),
}


def make_lora(model: Path, path: Path, rank: int, seed: int, dtype: torch.dtype) -> None:
    """A random rank-`rank` PEFT-format LoRA on every `LORA_TARGETS` projection of `model`
    (shapes read from the safetensors headers; nothing is loaded)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for component, suffixes in LORA_TARGETS.items():
        for file in sorted((model / component).glob("*.safetensors")):
            with safe_open(str(file), "pt") as f:
                for key in sorted(f.keys()):
                    if not key.endswith(suffixes):
                        continue
                    out_dim, in_dim = f.get_slice(key).get_shape()
                    module = f"{component}.{key.removesuffix('.weight')}"
                    down = torch.randn(rank, in_dim, generator=generator) / in_dim**0.5
                    up = torch.randn(out_dim, rank, generator=generator) * 0.02
                    tensors[f"{module}.lora_A.weight"] = down.to(dtype)
                    tensors[f"{module}.lora_B.weight"] = up.to(dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    print(f"{path.name}: {len(tensors) // 2} adapted layers, rank {rank}", file=sys.stderr)


def make_extras(args) -> None:
    from diffusers import ControlNetModel, UNet2DConditionModel

    out, model, dtype = args.make_extras, args.model, DTYPES[args.dtype]
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    unet = UNet2DConditionModel.from_pretrained(str(model / "unet"), torch_dtype=dtype)
    net = ControlNetModel.from_unet(unet)
    del unet
    fill_random(net, dtype)
    net.save_pretrained(out / "controlnet", safe_serialization=True)
    del net
    make_lora(model, out / "lora" / "a.safetensors", args.rank, args.seed + 1, dtype)
    make_lora(model, out / "lora" / "b.safetensors", args.rank, args.seed + 2, dtype)


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def load_pipeline(args, device):
    """The pipeline of the workload, on `device`, LoRA fused for `profile`."""
    from diffusers import (ControlNetModel, StableDiffusionXLControlNetImg2ImgPipeline,
                           StableDiffusionXLPipeline)

    dtype = DTYPES[args.dtype]
    if args.workload == "txt2img":
        return StableDiffusionXLPipeline.from_pretrained(str(args.model), torch_dtype=dtype).to(device)
    net = ControlNetModel.from_pretrained(str(args.controlnet), torch_dtype=dtype)
    pipe = StableDiffusionXLControlNetImg2ImgPipeline.from_pretrained(
        str(args.model), controlnet=net, torch_dtype=dtype).to(device)
    pipe.load_lora_weights(str(args.lora), adapter_name="style")
    pipe.set_adapters(["style"], adapter_weights=[args.lora_weight])
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # keeps the fused weights, drops the adapter layers
    return pipe


def run(args) -> None:
    from PIL import Image

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    started = time.perf_counter()
    pipe = load_pipeline(args, device)
    sync()
    load_s = time.perf_counter() - started
    pipe.set_progress_bar_config(disable=True)

    # The denoising loop runs from the first ControlNet or UNet call to the VAE decode: stamp
    # both ends (synced).
    marks = {}

    def stamp(name, forward):
        def timed(*a, **k):
            if name not in marks:
                sync()
                marks[name] = time.perf_counter()
            return forward(*a, **k)
        return timed

    unet_calls = [0]
    unet_forward = pipe.unet.forward

    def counted(*a, **k):
        unet_calls[0] += 1
        return unet_forward(*a, **k)

    pipe.unet.forward = stamp("loop", counted)
    pipe.vae.decode = stamp("decode", pipe.vae.decode)
    if args.workload == "profile":
        pipe.controlnet.forward = stamp("loop", pipe.controlnet.forward)
        workload = dict(
            image=Image.open(args.init).convert("RGB"),
            control_image=Image.open(args.control).convert("RGB"),
            strength=args.strength,
            controlnet_conditioning_scale=args.control_scale,
            control_guidance_start=0.0,
            control_guidance_end=args.control_end,
        )
    else:
        workload = {}

    last = {}

    def once():
        marks.clear()
        sync()
        t0 = time.perf_counter()
        images = pipe(
            prompt=args.prompt,
            negative_prompt=None,  # SDXL zeroes it (force_zeros_for_empty_prompt), as Darkroom does
            width=args.width,
            height=args.height,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            generator=torch.Generator("cpu").manual_seed(args.seed),
            output_type="pil",
            **workload,
        ).images
        sync()
        last["image"] = images[0]
        return time.perf_counter() - t0, marks["decode"] - marks["loop"]

    with torch.inference_mode():
        once()  # warm-up
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        results = [once() for _ in range(args.runs)]

    if args.save_image:
        last["image"].save(args.save_image)
    print(json.dumps({
        "load_s": load_s,
        "seconds": [r[0] for r in results],
        "denoise_s": [r[1] for r in results],
        # Denoising steps actually run (img2img runs the last `strength` of the schedule).
        "steps": unet_calls[0] // (args.runs + 1),
        "peak_rss_bytes": peak_rss_bytes(),
        "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
        "cuda_max_reserved_bytes": torch.cuda.max_memory_reserved(device) if cuda else None,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
    }))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--make-model", type=Path, metavar="DIR")
    mode.add_argument("--make-extras", type=Path, metavar="DIR")
    mode.add_argument("--run", action="store_true")
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--model", type=Path, help="--run: a diffusers SDXL folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="f32")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--prompt", default="a studio portrait, warm light")
    parser.add_argument("--rank", type=int, default=32, help="--make-extras: LoRA rank")
    parser.add_argument("--workload", choices=("txt2img", "profile"), default="txt2img")
    parser.add_argument("--controlnet", type=Path)
    parser.add_argument("--lora", type=Path)
    parser.add_argument("--lora-weight", type=float, default=0.8)
    parser.add_argument("--init", type=Path)
    parser.add_argument("--control", type=Path)
    parser.add_argument("--strength", type=float, default=0.6)
    parser.add_argument("--control-scale", type=float, default=0.6)
    parser.add_argument("--control-end", type=float, default=0.8)
    parser.add_argument("--save-image", type=Path, help="--run: save the last image here")
    args = parser.parse_args()
    if args.make_model:
        make_model(args)
    elif args.make_extras:
        if args.model is None:
            parser.error("--make-extras needs --model")
        make_extras(args)
    else:
        if args.model is None:
            parser.error("--run needs --model")
        run(args)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
