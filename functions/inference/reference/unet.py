"""Reference outputs of diffusers' UNet2DConditionModel on small random SDXL-shaped UNets.

Writes, for each model, `<model>/unet/` (config.json + diffusion_pytorch_model.safetensors, as
save_pretrained lays them out) and `<model>/cases.safetensors` holding, per case, the inputs
(`<case>.sample`, `<case>.timestep`, `<case>.encoder_hidden_states`, `<case>.text_embeds`,
`<case>.time_ids`, `<case>.down_residual.N`, `<case>.mid_residual`) and diffusers' output
(`<case>.out`). Models:

- sdxl_tiny: SDXL's real layout (DownBlock2D + 2 CrossAttnDownBlock2D, linear projections,
  text_time conditioning), shrunk;
- plain: SD 1.x-like order (cross-attention first), no added conditioning, 2 levels;
- conv_proj: SDXL layout with 1x1-convolution projections and attention_head_dim as an int.
"""

import torch
from diffusers import UNet2DConditionModel

import common

BATCH = 2


def randomize(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Every parameter ~ N(0, 0.05²), norm weights around 1: nothing zero-initialised stays zero."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.05
            is_norm = ".norm" in name or name.startswith("norm") or "conv_norm_out" in name
            if is_norm and name.endswith("weight"):
                param.copy_(1.0 + noise)
            else:
                param.copy_(noise)


def skip_shapes(config, height: int, width: int):
    """Shapes of the down path's skip connections and of the middle block's output."""
    channels = list(config.block_out_channels)
    layers = config.layers_per_block
    shapes = [(BATCH, channels[0], height, width)]
    h, w = height, width
    for i, c in enumerate(channels):
        shapes += [(BATCH, c, h, w)] * layers
        if i + 1 < len(channels):
            h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
            shapes.append((BATCH, c, h, w))
    return shapes, (BATCH, channels[-1], h, w)


def run_cases(model, name: str, out, generator, pooled_dim):
    config = model.config
    context_dim = config.cross_attention_dim
    tensors = {}
    cases = {
        # Different timesteps per batch element, non-square latent.
        "rect": dict(height=8, width=12, timestep=torch.tensor([999.0, 261.5]), control=False),
        # Odd sizes: diffusers forwards the skip sizes to the upsamplers. A float timestep.
        "odd": dict(height=9, width=13, timestep=500.0, control=False),
        # ControlNet residuals, timestep as a 0-d int64 tensor.
        "control": dict(height=8, width=12, timestep=torch.tensor(37), control=True),
        # Both at once: odd sizes with residuals.
        "odd_control": dict(height=7, width=10, timestep=torch.tensor([10.0, 750.0]), control=True),
    }
    for case, spec in cases.items():
        h, w = spec["height"], spec["width"]
        sample = torch.randn(BATCH, config.in_channels, h, w, generator=generator)
        context = torch.randn(BATCH, 7, context_dim, generator=generator)
        kwargs = {}
        tensors[f"{case}.sample"] = sample
        tensors[f"{case}.encoder_hidden_states"] = context
        timestep = spec["timestep"]
        if isinstance(timestep, float):
            tensors[f"{case}.timestep_value"] = torch.tensor([timestep], dtype=torch.float64)
        else:
            tensors[f"{case}.timestep"] = timestep
        if config.addition_embed_type == "text_time":
            text_embeds = torch.randn(BATCH, pooled_dim, generator=generator)
            time_ids = torch.tensor(
                [[1024.0, 768.0, 0.0, 0.0, 1024.0, 768.0], [896.0, 1152.0, 12.0, 40.0, 832.0, 1216.0]]
            )
            kwargs["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": time_ids}
            tensors[f"{case}.text_embeds"] = text_embeds
            tensors[f"{case}.time_ids"] = time_ids
        if spec["control"]:
            down_shapes, mid_shape = skip_shapes(config, h, w)
            down = [torch.randn(s, generator=generator) * 0.5 for s in down_shapes]
            mid = torch.randn(mid_shape, generator=generator) * 0.5
            kwargs["down_block_additional_residuals"] = down
            kwargs["mid_block_additional_residual"] = mid
            for i, r in enumerate(down):
                tensors[f"{case}.down_residual.{i}"] = r
            tensors[f"{case}.mid_residual"] = mid
        with torch.no_grad():
            result = model(sample, timestep, context, return_dict=False, **kwargs)[0]
        tensors[f"{case}.out"] = result
    common.save_tensors(out / name / "cases.safetensors", tensors)


def build(name: str, out, generator, pooled_dim=None, **config):
    model = UNet2DConditionModel(**config).eval()
    randomize(model, generator)
    model.save_pretrained(out / name / "unet")
    run_cases(model, name, out, generator, pooled_dim)


def main():
    args = common.parse_args(__doc__)
    common.seed_everything(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    time_dim, pooled = 8, 32
    sdxl_levels = dict(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 128),
        layers_per_block=2,
        norm_num_groups=32,
        in_channels=4,
        out_channels=4,
        sample_size=16,
    )
    build(
        "sdxl_tiny",
        args.out,
        generator,
        pooled_dim=pooled,
        **sdxl_levels,
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 8),
        cross_attention_dim=64,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + pooled,
    )
    build(
        "plain",
        args.out,
        generator,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 48),
        layers_per_block=1,
        norm_num_groups=8,
        in_channels=4,
        out_channels=4,
        transformer_layers_per_block=1,
        attention_head_dim=(4, 6),
        cross_attention_dim=40,
        use_linear_projection=False,
        freq_shift=1,
        flip_sin_to_cos=False,
    )
    build(
        "conv_proj",
        args.out,
        generator,
        pooled_dim=pooled,
        **sdxl_levels,
        transformer_layers_per_block=2,
        attention_head_dim=4,
        cross_attention_dim=48,
        use_linear_projection=False,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + pooled,
    )


if __name__ == "__main__":
    main()
