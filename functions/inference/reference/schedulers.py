"""Reference runs of diffusers' schedulers for tests/scheduler.rs.

For each case (a scheduler kind, a scheduler_config.json and a step count) this loads the
diffusers class from a model-folder layout the way the engine does (`from_pretrained(dir,
subfolder="scheduler", **kind overrides)`), records timesteps, sigmas and init_noise_sigma, and
runs a fake denoising loop as SDXL's pipelines drive a scheduler:

* txt2img: a seeded CPU generator draws the initial latents, which are scaled by
  init_noise_sigma; every step calls scale_model_input, a deterministic fake model
  (`0.1 * input + cos(t / 300) * pattern`, in float32 torch) and step(generator=generator).
* img2img at strengths 0.3 and 0.6: StableDiffusionXLImg2ImgPipeline.get_timesteps (the real
  method, on a stand-in pipeline object), noise from a seeded generator, add_noise at the first
  kept timestep, then the same loop over the kept timesteps.

Outputs: cases.json (parameters, timesteps, sigmas, init_noise_sigma, img2img begin indices),
<case>/scheduler/scheduler_config.json, and <case>.safetensors with every intermediate sample.
"""

import copy
import json
import types

import common

args = common.parse_args(__doc__.splitlines()[0])
common.seed_everything(args.seed)

import torch  # noqa: E402
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
)
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

# stabilityai/stable-diffusion-xl-base-1.0, scheduler/scheduler_config.json
SDXL = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
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

KINDS = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp-2m-karras": (
        DPMSolverMultistepScheduler,
        {"use_karras_sigmas": True, "algorithm_type": "dpmsolver++", "solver_order": 2},
    ),
    "ddim": (DDIMScheduler, {}),
}

VPRED_ZSNR = {"prediction_type": "v_prediction", "timestep_spacing": "trailing", "rescale_betas_zero_snr": True}

# (name, kind, changes to the SDXL config, steps)
CASES = [
    ("euler-sdxl-30", "euler", {}, 30),
    ("euler-sdxl-7", "euler", {}, 7),
    ("euler-trailing-20", "euler", {"timestep_spacing": "trailing"}, 20),
    ("euler-trailing-61", "euler", {"timestep_spacing": "trailing"}, 61),
    ("euler-linspace-sigma-min-30", "euler", {"timestep_spacing": "linspace", "final_sigmas_type": "sigma_min"}, 30),
    ("euler-karras-20", "euler", {"use_karras_sigmas": True}, 20),
    ("euler-karras-bounds-7", "euler", {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}, 7),
    ("euler-log-linear-20", "euler", {"interpolation_type": "log_linear"}, 20),
    ("euler-vpred-zsnr-20", "euler", VPRED_ZSNR, 20),
    ("euler-vpred-continuous-7", "euler", {"prediction_type": "v_prediction", "timestep_type": "continuous"}, 7),
    ("euler-linear-betas-20", "euler", {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, 20),
    ("euler-use-defaults-20", "euler", {"_use_default_values": ["timestep_spacing", "steps_offset"]}, 20),
    ("euler-a-sdxl-30", "euler-a", {}, 30),
    ("euler-a-trailing-7", "euler-a", {"timestep_spacing": "trailing"}, 7),
    ("euler-a-vpred-20", "euler-a", {"prediction_type": "v_prediction"}, 20),
    ("dpmpp-sdxl-30", "dpmpp-2m-karras", {}, 30),
    ("dpmpp-sdxl-20", "dpmpp-2m-karras", {}, 20),
    ("dpmpp-sdxl-7", "dpmpp-2m-karras", {}, 7),
    ("dpmpp-vpred-20", "dpmpp-2m-karras", {"prediction_type": "v_prediction"}, 20),
    ("dpmpp-sigma-min-20", "dpmpp-2m-karras", {"final_sigmas_type": "sigma_min"}, 20),
    ("dpmpp-sigma-min-7", "dpmpp-2m-karras", {"final_sigmas_type": "sigma_min"}, 7),
    ("dpmpp-heun-10", "dpmpp-2m-karras", {"solver_type": "heun"}, 10),
    ("dpmpp-euler-at-final-20", "dpmpp-2m-karras", {"euler_at_final": True, "final_sigmas_type": "sigma_min"}, 20),
    ("ddim-sdxl-30", "ddim", {}, 30),
    ("ddim-sdxl-7", "ddim", {}, 7),
    ("ddim-defaults-20", "ddim", {"_use_default_values": ["clip_sample", "set_alpha_to_one", "timestep_spacing", "steps_offset"]}, 20),
    ("ddim-linspace-20", "ddim", {"timestep_spacing": "linspace"}, 20),
    ("ddim-vpred-zsnr-20", "ddim", VPRED_ZSNR, 20),
]

STRENGTHS = [0.3, 0.6]
SHAPE = (2, 4, 6, 5)

pattern = torch.randn(SHAPE)
image_latents = torch.randn(SHAPE) * 0.8


def fake_model(model_input, t):
    t32 = torch.tensor(float(t), dtype=torch.float32)
    return 0.1 * model_input + torch.cos(t32 / 300.0) * pattern


def load(name, kind):
    cls, overrides = KINDS[kind]
    return cls.from_pretrained(str(args.out / name), subfolder="scheduler", **overrides)


def run(scheduler, timesteps, latents, generator, prefix, tensors):
    tensors[f"{prefix}.0"] = latents
    for i, t in enumerate(timesteps):
        model_input = scheduler.scale_model_input(latents, t)
        model_output = fake_model(model_input, t)
        latents = scheduler.step(model_output, t, latents, generator=generator, return_dict=False)[0]
        tensors[f"{prefix}.{i + 1}"] = latents


cases = []
for index, (name, kind, changes, steps) in enumerate(CASES):
    config = copy.deepcopy(SDXL)
    config.update(changes)
    folder = args.out / name / "scheduler"
    folder.mkdir(parents=True)
    common.write_json(folder / "scheduler_config.json", config)

    scheduler = load(name, kind)
    scheduler.set_timesteps(steps)
    sigmas = getattr(scheduler, "sigmas", None)
    init_noise_sigma = scheduler.init_noise_sigma
    record = {
        "name": name,
        "kind": kind,
        "steps": steps,
        "seed": 1000 + index,
        "timesteps": [float(t) for t in scheduler.timesteps],
        "sigmas": None if sigmas is None else [float(s) for s in sigmas],
        "init_noise_sigma": float(init_noise_sigma),
        "img2img": [],
    }
    tensors = {}

    generator = torch.Generator("cpu").manual_seed(record["seed"])
    latents = randn_tensor(SHAPE, generator=generator, dtype=torch.float32)
    tensors["txt2img.noise"] = latents
    latents = latents * init_noise_sigma
    run(scheduler, scheduler.timesteps, latents, generator, "txt2img", tensors)

    for s_index, strength in enumerate(STRENGTHS):
        scheduler = load(name, kind)
        scheduler.set_timesteps(steps)
        pipe = types.SimpleNamespace(scheduler=scheduler)
        timesteps, remaining = StableDiffusionXLImg2ImgPipeline.get_timesteps(pipe, steps, strength, "cpu")
        begin = len(scheduler.timesteps) - len(timesteps)
        if hasattr(scheduler, "begin_index"):
            assert scheduler.begin_index == begin, (name, scheduler.begin_index, begin)
        seed = 2000 + 10 * index + s_index
        generator = torch.Generator("cpu").manual_seed(seed)
        noise = randn_tensor(SHAPE, generator=generator, dtype=torch.float32)
        latent_timestep = timesteps[:1].repeat(SHAPE[0])
        latents = scheduler.add_noise(image_latents, noise, latent_timestep)
        prefix = f"img2img{s_index}"
        tensors[f"{prefix}.noise"] = noise
        run(scheduler, timesteps, latents, generator, prefix, tensors)
        record["img2img"].append(
            {"strength": strength, "seed": seed, "begin_index": begin, "remaining_steps": remaining}
        )

    common.save_tensors(args.out / f"{name}.safetensors", tensors)
    cases.append(record)

common.save_tensors(args.out / "inputs.safetensors", {"pattern": pattern, "image_latents": image_latents})
common.write_json(args.out / "cases.json", cases)
