"""Fixture for the weight loader: one tiny random SDXL pipeline in every on-disk form the
engine reads.

Writes under --out:
  diffusers/   the pipeline as `save_pretrained(safe_serialization=True)` writes it, with the
               `fp16` variant files next to the full-precision ones (as the SDXL base repository
               ships them), tokenizers generated from the CLIP vocabulary, the Euler scheduler.
  sharded/     the same pipeline with the UNet and the second text encoder split into shards
               (`*.safetensors.index.json` with a `weight_map`), the rest full precision.
  sdxl_tiny.safetensors
               the same weights as one checkpoint in the original Stability (sgm) naming, written
               by this script's own diffusers → sgm mapping (`to_original_keys`), plus entries
               real checkpoints carry that no module uses (`denoiser.sigmas`, `logit_scale`, EMA
               bookkeeping, CLIP `position_ids`).

The single file is then validated with diffusers itself:
`StableDiffusionXLPipeline.from_single_file(file, config=diffusers/)` must rebuild every parameter
of every component exactly, which shows the naming matches what diffusers' converter (and so the
real SDXL checkpoints it is written for) uses.

The tiny UNet keeps SDXL's real layout: three levels (DownBlock2D then two CrossAttnDownBlock2D),
two resnets per level, transformer depths (1, 1, 2) (the first is unused: that level has no
attention), widths (32, 32, 64), text_time conditioning, linear projections. The VAE has three levels so the decoder's
reversed level order is exercised; the second text encoder's projection is not square so the
transposed storage of OpenCLIP's `text_projection` is exercised.
"""

import copy
import os
import shutil

import common
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

VOCAB = 49408  # the real CLIP vocabulary, so the tokenizers' ids fit


def build_pipeline(out):
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 32, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 2, 4),
        cross_attention_dim=32 + 64,
        norm_num_groups=32,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 32, 64),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=0.13025,
    )
    text_config = dict(
        vocab_size=VOCAB,
        max_position_embeddings=77,
        bos_token_id=VOCAB - 2,
        eos_token_id=VOCAB - 1,
        pad_token_id=1,
        layer_norm_eps=1e-5,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
            hidden_act="quick_gelu", projection_dim=32, **text_config,
        )
    )
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(
            hidden_size=64, intermediate_size=80, num_attention_heads=4, num_hidden_layers=3,
            hidden_act="gelu", projection_dim=32, **text_config,
        )
    )
    vocab = common.clip_vocabulary_files(out / "vocab")
    tokenizer = CLIPTokenizer.from_pretrained(str(vocab))
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(vocab), pad_token="!")
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, timestep_spacing="leading", prediction_type="epsilon",
    )
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
    )


# ---------------------------------------------------------------------------------------------
# diffusers / transformers names → original SDXL (sgm) names, derived from the configs.
# ---------------------------------------------------------------------------------------------

UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def unet_prefixes(config):
    """Module prefix pairs (diffusers, sgm) for a UNet2DConditionModel config."""
    levels = len(config["down_block_types"])
    per_level = config["layers_per_block"]
    if isinstance(per_level, int):
        per_level = [per_level] * levels
    pairs = [("conv_in.", "input_blocks.0.0."), ("time_embedding.linear_1.", "time_embed.0."),
             ("time_embedding.linear_2.", "time_embed.2."), ("add_embedding.linear_1.", "label_emb.0.0."),
             ("add_embedding.linear_2.", "label_emb.0.2."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2.")]
    resnets = []  # (diffusers prefix, sgm prefix) of resnets, whose inner names change too
    index = 1
    for level, kind in enumerate(config["down_block_types"]):
        for j in range(per_level[level]):
            resnets.append((f"down_blocks.{level}.resnets.{j}.", f"input_blocks.{index}.0."))
            if "CrossAttn" in kind:
                pairs.append((f"down_blocks.{level}.attentions.{j}.", f"input_blocks.{index}.1."))
            index += 1
        if level < levels - 1:
            pairs.append((f"down_blocks.{level}.downsamplers.0.conv.", f"input_blocks.{index}.0.op."))
            index += 1
    resnets += [("mid_block.resnets.0.", "middle_block.0."), ("mid_block.resnets.1.", "middle_block.2.")]
    pairs.append(("mid_block.attentions.0.", "middle_block.1."))
    index = 0
    for level, kind in enumerate(config["up_block_types"]):
        attention = "CrossAttn" in kind
        for j in range(per_level[levels - 1 - level] + 1):
            resnets.append((f"up_blocks.{level}.resnets.{j}.", f"output_blocks.{index}.0."))
            if attention:
                pairs.append((f"up_blocks.{level}.attentions.{j}.", f"output_blocks.{index}.1."))
            if level < levels - 1 and j == per_level[levels - 1 - level]:
                slot = 2 if attention else 1
                pairs.append((f"up_blocks.{level}.upsamplers.0.conv.", f"output_blocks.{index}.{slot}.conv."))
            index += 1
    for diffusers_prefix, sgm_prefix in resnets:
        for new, old in UNET_RESNET.items():
            pairs.append((f"{diffusers_prefix}{new}.", f"{sgm_prefix}{old}."))
    return pairs


def vae_prefixes(config):
    levels = len(config["down_block_types"])
    pairs = [("quant_conv.", "quant_conv."), ("post_quant_conv.", "post_quant_conv.")]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.conv_in.", f"{part}.conv_in."), (f"{part}.conv_out.", f"{part}.conv_out."),
                  (f"{part}.conv_norm_out.", f"{part}.norm_out."),
                  (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1."),
                  (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.")]
        for new, old in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            pairs.append((f"{part}.mid_block.attentions.0.{new}.", f"{part}.mid.attn_1.{old}."))
    for level in range(levels):
        pairs.append((f"encoder.down_blocks.{level}.resnets.", f"encoder.down.{level}.block."))
        pairs.append((f"encoder.down_blocks.{level}.downsamplers.0.", f"encoder.down.{level}.downsample."))
        original = levels - 1 - level
        pairs.append((f"decoder.up_blocks.{level}.resnets.", f"decoder.up.{original}.block."))
        pairs.append((f"decoder.up_blocks.{level}.upsamplers.0.", f"decoder.up.{original}.upsample."))
    return pairs


def rename(key, pairs):
    best = max((p for p in pairs if key.startswith(p[0])), key=lambda p: len(p[0]), default=None)
    if best is None:
        raise KeyError(f"no sgm name for {key}")
    return best[1] + key[len(best[0]):]


def to_original_keys(pipe):
    out = {}
    unet_pairs = unet_prefixes(pipe.unet.config)
    for key, value in pipe.unet.state_dict().items():
        out["model.diffusion_model." + rename(key, unet_pairs)] = value
    vae_pairs = vae_prefixes(pipe.vae.config)
    for key, value in pipe.vae.state_dict().items():
        new = rename(key, vae_pairs).replace(".conv_shortcut.", ".nin_shortcut.")
        if ".mid.attn_1." in new and new.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # the original attention uses 1×1 convolutions
        out["first_stage_model." + new] = value
    # CLIP ViT-L: Hugging Face naming under `text_model.` (CLIPTextModel is flat in transformers 5).
    for key, value in pipe.text_encoder.state_dict().items():
        key = key if key.startswith("text_model.") else "text_model." + key
        out["conditioner.embedders.0.transformer." + key] = value
    # OpenCLIP ViT-bigG: OpenCLIP naming, q/k/v fused, projection stored as (in, out).
    g = "conditioner.embedders.1.model."
    state = pipe.text_encoder_2.state_dict()
    layers = pipe.text_encoder_2.config.num_hidden_layers
    out[g + "token_embedding.weight"] = state["text_model.embeddings.token_embedding.weight"]
    out[g + "positional_embedding"] = state["text_model.embeddings.position_embedding.weight"]
    out[g + "ln_final.weight"] = state["text_model.final_layer_norm.weight"]
    out[g + "ln_final.bias"] = state["text_model.final_layer_norm.bias"]
    out[g + "text_projection"] = state["text_projection.weight"].T.contiguous()
    for n in range(layers):
        hf = f"text_model.encoder.layers.{n}."
        oc = f"{g}transformer.resblocks.{n}."
        for kind in ("weight", "bias"):
            out[f"{oc}attn.in_proj_{kind}"] = torch.cat(
                [state[f"{hf}self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")], dim=0
            )
            out[f"{oc}attn.out_proj.{kind}"] = state[f"{hf}self_attn.out_proj.{kind}"]
            out[f"{oc}ln_1.{kind}"] = state[f"{hf}layer_norm1.{kind}"]
            out[f"{oc}ln_2.{kind}"] = state[f"{hf}layer_norm2.{kind}"]
            out[f"{oc}mlp.c_fc.{kind}"] = state[f"{hf}mlp.fc1.{kind}"]
            out[f"{oc}mlp.c_proj.{kind}"] = state[f"{hf}mlp.fc2.{kind}"]
    return out


# Entries real checkpoints carry that no inference module uses (the loader ignores them).
EXTRAS = {
    "denoiser.sigmas": torch.linspace(0.03, 14.6, 1000),
    "conditioner.embedders.1.model.logit_scale": torch.tensor(4.6052),
    "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": torch.arange(77).unsqueeze(0),
    "model_ema.decay": torch.tensor(0.9999),
    "model_ema.num_updates": torch.tensor(0, dtype=torch.int32),
}


def compare(name, expected, actual):
    expected = dict(expected.state_dict())
    actual = dict(actual.state_dict())
    if expected.keys() != actual.keys():
        raise SystemExit(f"{name}: parameter names differ: {sorted(expected.keys() ^ actual.keys())[:10]}")
    for key, value in expected.items():
        if value.dtype != torch.float32 or not torch.equal(value, actual[key]):
            raise SystemExit(f"{name}: {key} differs after from_single_file")
    return len(expected)


def main():
    args = common.parse_args(__doc__)
    common.seed_everything(args.seed)
    pipe = build_pipeline(args.out)
    # Random weights everywhere (norm weights and biases too, not their 1/0 initialisation), so a
    # swapped name cannot go unnoticed.
    with torch.no_grad():
        for model in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            for param in model.parameters():
                param.copy_(torch.randn_like(param) * 0.1)
    folder = args.out / "diffusers"
    # The fp16 variant first: transformers records the dtype in config.json, and the last save wins.
    copy.deepcopy(pipe).to(torch.float16).save_pretrained(folder, safe_serialization=True, variant="fp16")
    pipe.save_pretrained(folder, safe_serialization=True)

    # Unchanged files are hard links: the fixture stays small.
    sharded = args.out / "sharded"
    shutil.copytree(folder, sharded, copy_function=os.link)
    for component, shard_size in (("unet", "1MB"), ("text_encoder_2", "200KB")):
        shutil.rmtree(sharded / component)
        getattr(pipe, component).save_pretrained(
            sharded / component, safe_serialization=True, max_shard_size=shard_size
        )

    checkpoint = to_original_keys(pipe)
    checkpoint.update(EXTRAS)
    single = args.out / "sdxl_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in checkpoint.items()}, str(single))

    loaded = StableDiffusionXLPipeline.from_single_file(str(single), config=str(folder), local_files_only=True)
    reference = StableDiffusionXLPipeline.from_pretrained(str(folder), local_files_only=True)
    counts = {name: compare(name, getattr(reference, name), getattr(loaded, name))
              for name in ("unet", "vae", "text_encoder", "text_encoder_2")}
    common.write_json(args.out / "counts.json", counts)


if __name__ == "__main__":
    main()
