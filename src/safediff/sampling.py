"""The one text-to-image denoising loop (SD 1.x/2.x, SDXL, the sandbox).

At every step all conditioning branches (∅ or negative prompt, prompt, and any concept branches a guard asks for)
go through the UNet in **one** call; the guard's session combines the predictions, then the scheduler steps.
Image *i* uses its own ``torch.Generator`` seeded with seed *i* (initial noise and any scheduler noise), so it depends
only on (prompt *i*, seed *i*), never on the batch it was generated in. With no guard the output equals diffusers'
``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` for the same components, prompt and seed.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from safediff.errors import SafediffError
from safediff.guards.base import GenerationContext, Guard, NoGuard
from safediff.models import Conditioning, Model

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "ddpm": "DDPMScheduler",
}


@dataclass
class GenerationOutput:
    images: list[Image.Image]
    pixels: torch.Tensor  # [N, 3, H, W] float in [0, 1]
    latents: torch.Tensor  # [N, C, h, w] final latents
    unet_batch_per_step: list[int]  # conditioning branches per step (UNet evaluations per image per step)
    settings: dict  # steps, guidance, size, scheduler name + config


def make_scheduler(model: Model, name: str | None = None):
    """A fresh scheduler (they keep per-call state) from the model's config, or of the named kind."""
    import diffusers

    base = model.pipe.scheduler
    if name is None:
        return type(base).from_config(base.config)
    if name not in SCHEDULERS:
        raise SafediffError(f"unknown scheduler '{name}'; accepted: {', '.join(SCHEDULERS)}")
    return getattr(diffusers, SCHEDULERS[name]).from_config(base.config)


def check_settings(steps: int, guidance: float, height: int, width: int, n: int | None = None) -> None:
    """Reject impossible settings before anything is loaded or written."""
    if steps <= 0:
        raise SafediffError(f"steps must be a positive integer, got {steps}")
    if guidance < 0:
        raise SafediffError(f"guidance must be >= 0 (1 or less disables classifier-free guidance), got {guidance}")
    for what, v in (("height", height), ("width", width)):
        if v <= 0 or v % 8:
            raise SafediffError(f"{what} must be a positive multiple of 8, got {v}")
    if n is not None and n <= 0:
        raise SafediffError(f"n must be a positive integer, got {n}")


def _step_kwargs(scheduler, generators: list[torch.Generator], eta: float) -> dict:
    params = set(inspect.signature(scheduler.step).parameters)
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params:
        kwargs["generator"] = generators
    return kwargs


def initial_noise(model: Model, seeds: list[int], height: int, width: int) -> tuple[torch.Tensor, list]:
    """Per-sample generators and their initial latents (drawn on the CPU, as diffusers' randn_tensor does)."""
    c = model.unet.config.in_channels
    f = model.pipe.vae_scale_factor
    gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    noise = torch.cat([torch.randn((1, c, height // f, width // f), generator=g, dtype=model.dtype) for g in gens])
    return noise.to(model.device), gens


def decode(model: Model, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> pixels in [0, 1] ([B, 3, H, W], float32)."""
    vae = model.vae
    cfg = vae.config
    if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
        mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1).to(latents)
        latents = latents * std / cfg.scaling_factor + mean
    else:
        latents = latents / cfg.scaling_factor
    upcast = vae.dtype == torch.float16 and getattr(cfg, "force_upcast", False)
    if upcast:
        vae.to(torch.float32)
        latents = latents.float()
    image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    if upcast:
        vae.to(torch.float16)
    return (image.float() / 2 + 0.5).clamp(0, 1)


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    arr = (pixels.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


@torch.no_grad()
def _generate_batch(model, prompts, seeds, steps, guidance, height, width, negative, guard, scheduler_name, eta,
                    bar):
    adapter = model.adapter
    cond = adapter.encode(prompts)
    uncond = adapter.encode_negative(negative, len(prompts))
    scheduler = make_scheduler(model, scheduler_name)
    scheduler.set_timesteps(steps)  # timesteps stay on the host: indexing them never waits for the GPU
    latents, gens = initial_noise(model, seeds, height, width)
    latents = latents * scheduler.init_noise_sigma
    step_kwargs = _step_kwargs(scheduler, gens, eta)
    ctx = GenerationContext(model, list(prompts), cond, uncond, guidance, scheduler.timesteps, height, width)
    session = guard.start(ctx)
    per_step = []
    with session.unet_hooks():
        for i, t in enumerate(scheduler.timesteps):
            branches = session.branches(i)
            n = len(branches)
            per_step.append(n)
            x = scheduler.scale_model_input(torch.cat([latents] * n), t)
            c = Conditioning.cat(branches)
            eps = model.unet(x, t, encoder_hidden_states=c.embeds, return_dict=False,
                             **adapter.unet_kwargs(c, height, width))[0]
            noise = session.combine(i, t, list(eps.chunk(n)))
            latents = scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
            bar.update(1)
    return latents, decode(model, latents), per_step, scheduler


def generate(model: Model, prompts: list[str], seeds: list[int], *, steps: int | None = None,
             guidance: float | None = None, height: int | None = None, width: int | None = None,
             negative_prompt: str | list[str] | None = None, guard: Guard | None = None,
             scheduler: str | None = None, eta: float = 0.0, batch_size: int | None = None,
             progress: bool = True) -> GenerationOutput:
    """Generate one image per (prompt, seed). Defaults (steps, guidance, size) come from the model."""
    if len(prompts) != len(seeds):
        raise SafediffError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
    if not prompts:
        raise SafediffError("no prompts to generate")
    d = model.defaults
    steps = int(d["steps"] if steps is None else steps)
    guidance = float(d["guidance"] if guidance is None else guidance)
    height = int(d["height"] if height is None else height)
    width = int(d["width"] if width is None else width)
    check_settings(steps, guidance, height, width)
    guard = guard or NoGuard()
    if isinstance(negative_prompt, str):
        negative_prompt = [negative_prompt] * len(prompts)
    bs = batch_size or len(prompts)
    lat, pix, per_step, sched = [], [], [], None
    with tqdm(total=steps * ((len(prompts) + bs - 1) // bs), desc="denoising", disable=not progress,
              leave=False) as bar:
        for s in range(0, len(prompts), bs):
            neg = None if negative_prompt is None else negative_prompt[s:s + bs]
            l, p, per_step, sched = _generate_batch(model, prompts[s:s + bs], seeds[s:s + bs], steps, guidance,
                                                   height, width, neg, guard, scheduler, eta, bar)
            lat.append(l)
            pix.append(p)
    pixels = torch.cat(pix)
    settings = {
        "steps": steps, "guidance": guidance, "height": height, "width": width, "eta": eta,
        "negative_prompt": negative_prompt, "scheduler": type(sched).__name__,
        "scheduler_config": {k: v for k, v in dict(sched.config).items() if not k.startswith("_")},
        "guard": guard.config(),
    }
    return GenerationOutput(to_pil(pixels), pixels, torch.cat(lat), per_step, settings)
