"""Reference outputs for the VAE (diffusers' AutoencoderKL, as SDXL uses it).

For each variant below: a tiny AutoencoderKL with every weight re-randomized, saved with
`save_pretrained` (config.json + diffusion_pytorch_model.safetensors) under `<variant>/vae/`, and
`<variant>/reference.safetensors` holding

- `image_u8`      a seeded random RGB batch, NHWC uint8 (what the Rust side converts itself);
- `pixels`        VaeImageProcessor(do_resize=False).preprocess of those images, NCHW in [-1, 1];
- `mean`, `logvar`, `std`  the encoder's DiagonalGaussianDistribution;
- `noise`, `sample`  `latent_dist.sample(generator)` with `torch.Generator().manual_seed(SAMPLE_SEED)`
                  and the normal draw it used (`randn_tensor(mean.shape, generator)`);
- `init_latents`  the img2img pipeline's scaling of that sample (prepare_latents);
- `latents`       seeded scaled latents, `decoded` = the text2img pipeline's unscale + vae.decode;
- `decoded_u8`    VaeImageProcessor.postprocess(decoded, "pil") as NHWC uint8.

Plus `gaussian.safetensors`: DiagonalGaussianDistribution on crafted parameters whose log-variances
reach past the clamp (-30, 20).
"""

import common
import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

SAMPLE_SEED = 1234
LATENT_SEED = 99

VARIANTS = {
    # Two levels, 32-group norms, one resnet per level: the SDXL layout in miniature.
    "small": dict(
        config=dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            norm_num_groups=32,
        ),
        size=(32, 48),
    ),
    # Three levels, two resnets per level, 8-group norms, latents_mean/std normalization.
    "deep": dict(
        config=dict(
            block_out_channels=(32, 64, 64),
            layers_per_block=2,
            norm_num_groups=8,
            latents_mean=(0.1, -0.2, 0.3, 0.05),
            latents_std=(0.9, 1.1, 0.8, 1.3),
        ),
        size=(64, 64),
    ),
    # One level, no quant convs, no mid-block attention, an SD3-style shift factor.
    "plain": dict(
        config=dict(
            block_out_channels=(16,),
            layers_per_block=1,
            norm_num_groups=8,
            use_quant_conv=False,
            use_post_quant_conv=False,
            mid_block_add_attention=False,
            shift_factor=0.0609,
        ),
        size=(24, 40),
    ),
}


def build(config: dict) -> AutoencoderKL:
    n = len(config["block_out_channels"])
    full = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        latent_channels=4,
        sample_size=64,
        scaling_factor=0.13025,
        force_upcast=True,
    )
    full.update(config)
    vae = AutoencoderKL(**full).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if p.ndim == 1 and ("norm" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.05 * torch.randn_like(p))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn_like(p) / fan_in**0.5)
    return vae


def pipeline_scale(vae: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
    """StableDiffusionXLImg2ImgPipeline.prepare_latents, then SD3's shift where configured."""
    cfg = vae.config
    if cfg.latents_mean is not None and cfg.latents_std is not None:
        mean = torch.tensor(cfg.latents_mean).view(1, 4, 1, 1)
        std = torch.tensor(cfg.latents_std).view(1, 4, 1, 1)
        return (z - mean) * cfg.scaling_factor / std
    if cfg.shift_factor is not None:
        return (z - cfg.shift_factor) * cfg.scaling_factor
    return cfg.scaling_factor * z


def pipeline_unscale(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """StableDiffusionXLPipeline.__call__'s decode step, then SD3's shift where configured."""
    cfg = vae.config
    if cfg.latents_mean is not None and cfg.latents_std is not None:
        mean = torch.tensor(cfg.latents_mean).view(1, 4, 1, 1)
        std = torch.tensor(cfg.latents_std).view(1, 4, 1, 1)
        return latents * std / cfg.scaling_factor + mean
    if cfg.shift_factor is not None:
        return latents / cfg.scaling_factor + cfg.shift_factor
    return latents / cfg.scaling_factor


def run_variant(args, name: str, spec: dict) -> None:
    folder = args.out / name
    vae = build(spec["config"])
    vae.save_pretrained(folder / "vae", safe_serialization=True)

    height, width = spec["size"]
    image_u8 = torch.randint(0, 256, (2, height, width, 3), dtype=torch.uint8)
    pil = [Image.fromarray(img.numpy(), mode="RGB") for img in image_u8]
    processor = VaeImageProcessor(vae_scale_factor=8, do_resize=False)
    pixels = processor.preprocess(pil)

    with torch.no_grad():
        dist = vae.encode(pixels).latent_dist
        generator = torch.Generator().manual_seed(SAMPLE_SEED)
        sample = dist.sample(generator)
        noise = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(SAMPLE_SEED))
        assert torch.equal(sample, dist.mean + dist.std * noise)
        init_latents = pipeline_scale(vae, sample)

        latent_generator = torch.Generator().manual_seed(LATENT_SEED)
        latents = torch.randn(dist.mean.shape, generator=latent_generator)
        decoded = vae.decode(pipeline_unscale(vae, latents)).sample

    decoded_pil = processor.postprocess(decoded, output_type="pil")
    decoded_u8 = torch.from_numpy(np.stack([np.array(img) for img in decoded_pil]))

    common.save_tensors(
        folder / "reference.safetensors",
        dict(
            image_u8=image_u8,
            pixels=pixels,
            mean=dist.mean,
            logvar=dist.logvar,
            std=dist.std,
            noise=noise,
            sample=sample,
            init_latents=init_latents,
            latents=latents,
            decoded=decoded,
            decoded_u8=decoded_u8,
        ),
    )


def gaussian(args) -> None:
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    parameters = torch.randn(2, 8, 3, 5) * 20.0
    dist = DiagonalGaussianDistribution(parameters)
    common.save_tensors(
        args.out / "gaussian.safetensors",
        dict(parameters=parameters, mean=dist.mean, logvar=dist.logvar, std=dist.std, mode=dist.mode()),
    )


def main() -> None:
    args = common.parse_args(__doc__)
    common.seed_everything(args.seed)
    for name, spec in VARIANTS.items():
        run_variant(args, name, spec)
    gaussian(args)


if __name__ == "__main__":
    main()
