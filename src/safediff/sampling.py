"""The one denoising step and the one denoising loop (SD 1.x/2.x, SDXL, SD3, FLUX.1, the sandbox).

- ``denoiser_output(model, x, t, cond, params)``: the denoiser's raw output (ε, or v for v-prediction models, the
  velocity for flow-matching models) -- the only place a UNet or transformer forward is called (the adapter says how:
  ``adapter.denoiser_call``); ``params`` substitutes parameters for this call (``torch.func``), which is how trainers
  get the frozen model's prediction without a second copy of it.
- ``guided_eps(session, i, t, x)``: one step's noise prediction: every conditioning branch the session names (∅ or
  the negative prompt, the prompt, any concept branches of a guard) in **one** denoiser call, combined by the session
  (plain classifier-free guidance when there is no guard).
- ``denoise(session, scheduler, latents, ...)``: the loop: scale, ``guided_eps``, scheduler step; a per-step
  ``callback`` reads the trajectory (trainers cache it), ``n_steps`` stops early (partial sampling).
- ``generate(model, prompts, seeds, ...)``: images. Image *i* uses its own ``torch.Generator`` seeded with seed *i*
  (initial noise and any scheduler noise), so it depends only on (prompt *i*, seed *i*), never on the batch it was
  generated in. Conditioning may be given directly (``conditioning=``, as diffusers' ``prompt_embeds``) for
  embeddings no text produces. With no guard the output equals diffusers' ``StableDiffusionPipeline`` /
  ``StableDiffusionXLPipeline`` / ``StableDiffusion3Pipeline`` / ``FluxPipeline`` (``true_cfg_scale`` = our guidance)
  for the same components, prompt and seed.

Everything that differs between architectures (latent shape, initial noise scale, timesteps, model input scaling,
VAE scaling, the embedded guidance of distilled models) is read from ``model.adapter``.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from safediff.adapters import Conditioning
from safediff.adapters.unet import SCHEDULERS
from safediff.errors import SafediffError
from safediff.guards.base import GenerationContext, Guard, NoGuard, Session, start_session

MAX_STEPS = 1000  # denoising steps (the training schedules have 1000)
MAX_GUIDANCE = 1000.0
MAX_SIZE = 4096  # pixels per side
MAX_IMAGES = 100_000  # images one command may generate

NEEDS = {"lms": ("scipy",)}  # schedulers whose diffusers class needs an optional package


@dataclass(frozen=True)
class SamplerSettings:
    """How a model samples: steps, guidance (the classifier-free guidance scale; FLUX: its true CFG), size, scheduler
    (None = the model's), η, and the embedded guidance of guidance-distilled models (FLUX.1 dev; None elsewhere).
    ``of`` fills in the model's defaults and checks the values."""

    steps: int
    guidance: float
    height: int
    width: int
    scheduler: str | None = None
    eta: float = 0.0
    embedded_guidance: float | None = None

    @classmethod
    def of(cls, model, steps: int | None = None, guidance: float | None = None, height: int | None = None,
           width: int | None = None, scheduler: str | None = None, eta: float = 0.0,
           embedded_guidance: float | None = None) -> "SamplerSettings":
        d = model.defaults
        pick = lambda given, key: d[key] if given is None else given  # noqa: E731
        if embedded_guidance is not None and "embedded_guidance" not in d:
            raise SafediffError("this model has no embedded guidance (only guidance-distilled models such as FLUX.1 "
                                "dev read one); use guidance")
        embedded = pick(embedded_guidance, "embedded_guidance") if "embedded_guidance" in d else None
        settings = cls(int(pick(steps, "steps")), float(pick(guidance, "guidance")), int(pick(height, "height")),
                       int(pick(width, "width")), scheduler, float(eta), None if embedded is None else float(embedded))
        check_settings(settings.steps, settings.guidance, settings.height, settings.width,
                       multiple=model.adapter.size_multiple)
        if embedded is not None and not (math.isfinite(embedded) and 0 <= embedded <= MAX_GUIDANCE):
            raise SafediffError(f"embedded guidance must be a number in [0, {MAX_GUIDANCE:g}], got {embedded}")
        check_scheduler(make_scheduler(model, scheduler), settings.steps)
        if not (math.isfinite(settings.eta) and 0.0 <= settings.eta <= 1.0):
            raise SafediffError(f"eta must be in [0, 1], got {settings.eta}")
        return settings

    def record(self, model) -> dict:
        """The settings as results record them: the scheduler's class and full config instead of its short name."""
        scheduler = make_scheduler(model, self.scheduler)
        out = {"steps": self.steps, "guidance": self.guidance, "height": self.height, "width": self.width,
               "eta": self.eta, "scheduler": type(scheduler).__name__,
               "scheduler_config": {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}}
        if self.embedded_guidance is not None:
            out["embedded_guidance"] = self.embedded_guidance
        return out


@dataclass
class GenerationOutput:
    images: list[Image.Image]
    pixels: torch.Tensor  # [N, 3, H, W] float in [0, 1]
    latents: torch.Tensor  # [N, C, h, w] final latents
    unet_batch_per_step: list[int]  # conditioning branches per step (denoiser evaluations per image per step)
    settings: dict  # steps, guidance, size, scheduler name + config


def make_scheduler(model, name: str | None = None):
    """A fresh scheduler (they keep per-call state) from the model's config, or of the named kind (the names the
    model's adapter accepts: DDPM-family schedulers for UNet models, flow-matching Euler for SD3/FLUX)."""
    import diffusers

    base = model.pipe.scheduler
    if name is None:
        return type(base).from_config(base.config)
    accepted = model.adapter.schedulers
    if name not in accepted:
        known = name in SCHEDULERS
        raise SafediffError(f"{'this model does not accept the' if known else 'unknown'} scheduler '{name}'; "
                            f"accepted: {', '.join(accepted)}")
    missing = [pkg for pkg in NEEDS.get(name, ()) if importlib.util.find_spec(pkg) is None]
    if missing:
        raise SafediffError(f"the {name} scheduler needs {', '.join(missing)} (pip install {' '.join(missing)}); or "
                            f"choose another: {', '.join(k for k in SCHEDULERS if k not in NEEDS)}")
    return getattr(diffusers, accepted[name]).from_config(base.config)


class Trajectories:
    """The model's own deterministic sampling trajectories, as trainers and probes take them: ``steps`` steps (the
    model's default when None) at the model's native size, on one scheduler set up once (``adapter``'s
    ``trajectory_scheduler``: DDIM with η = 0 on a UNet, the model's flow-matching Euler on SD3/FLUX; ``denoise``
    never steps it, so it serves every run)."""

    def __init__(self, model, steps: int | None = None):
        d = model.defaults
        self.model = model
        self.steps = int(steps or d["steps"])
        self.height, self.width = int(d["height"]), int(d["width"])
        self.scheduler = make_scheduler(model, model.adapter.trajectory_scheduler)
        model.adapter.set_timesteps(self.scheduler, self.steps, self.height, self.width, device=model.device)

    def noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """[n, C, h, w] Gaussian latents from ``generator`` (drawn on the CPU, in the model's dtype)."""
        shape = latent_shape(self.model, self.height, self.width)
        return torch.randn((n, *shape), generator=generator, dtype=self.model.dtype).to(self.model.device)

    def run(self, cond: Conditioning, uncond: Conditioning, guidance: float, noise: torch.Tensor,
            n_steps: int | None = None, callback=None, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The latents after the first ``n_steps`` steps (all by default) from ``noise``, with plain classifier-free
        guidance on ``cond`` (``cfg_session``); ``callback`` and ``params`` as ``denoise`` takes them."""
        session = cfg_session(self.model, cond, uncond, guidance, self.scheduler, self.height, self.width)
        return denoise(session, self.scheduler, self.model.adapter.initial_latents(self.scheduler, noise),
                       n_steps=n_steps, kwargs=step_kwargs(self.scheduler, None, 0.0), params=params,
                       callback=callback)

    def timestep_bin(self, i: int) -> tuple[int, int]:
        """[lo, hi): the training timesteps that sampling step ``i`` stands for, from its own timestep up to the
        previous step's. With 50 DDIM steps over 1000 training steps this is the ESD reference code's 20-wide bin
        around the step; on the flow-matching models it is the step's bin of the (shifted) schedule in [0, 1000]."""
        ts = self.scheduler.timesteps
        lo = int(ts[i])
        hi = int(ts[i - 1]) if i > 0 else int(self.scheduler.config.num_train_timesteps)
        return lo, max(hi, lo + 1)

    def draw(self, generator: torch.Generator, cond: Conditioning, uncond: Conditioning, guidance: float,
             params: dict[str, torch.Tensor] | None = None) -> tuple[int, int, torch.Tensor]:
        """(sampling step i, training timestep t, x_t) by partial sampling, ESD's draw: i uniform in [0, steps), t
        uniform in i's bin (``timestep_bin``), x_t the latents after i steps from Gaussian noise with guidance
        ``guidance`` on ``cond``; every random number from ``generator``, in that order; one x_t per row of ``cond``
        (``uncond`` has as many rows), all at step i. ``params`` replaces denoiser parameters while sampling."""
        step = int(torch.randint(self.steps, (1,), generator=generator))
        lo, hi = self.timestep_bin(step)
        t = int(torch.randint(lo, hi, (1,), generator=generator))
        x = self.run(cond, uncond, guidance, self.noise(len(cond), generator), n_steps=step, params=params)
        return step, t, x


def check_settings(steps: int, guidance: float, height: int, width: int, n: int | None = None,
                   multiple: int = 8) -> None:
    """Reject impossible settings (and sizes that would exhaust the machine) before anything is loaded or written."""
    if not 0 < steps <= MAX_STEPS:
        raise SafediffError(f"steps must be an integer in 1..{MAX_STEPS}, got {steps}")
    if not (math.isfinite(guidance) and 0 <= guidance <= MAX_GUIDANCE):
        raise SafediffError(f"guidance must be a number in [0, {MAX_GUIDANCE:g}] (1 or less disables classifier-free "
                            f"guidance), got {guidance}")
    for what, v in (("height", height), ("width", width)):
        if v <= 0 or v % multiple or v > MAX_SIZE:
            raise SafediffError(f"{what} must be a positive multiple of {multiple} up to {MAX_SIZE}, got {v}")
    if n is not None and not 0 < n <= MAX_IMAGES:
        raise SafediffError(f"n must be an integer in 1..{MAX_IMAGES}, got {n}")


def check_scheduler(scheduler, steps: int) -> None:
    """The scheduler can run ``steps`` steps: within its training steps and enough for a multistep warm-up."""
    name = type(scheduler).__name__
    if steps > scheduler.config.num_train_timesteps:
        raise SafediffError(f"steps must be at most the scheduler's {scheduler.config.num_train_timesteps} training "
                            f"steps, got {steps}")
    if name == "PNDMScheduler" and not scheduler.config.get("skip_prk_steps", False) and steps < 4:
        raise SafediffError(f"the PNDM scheduler needs at least 4 steps (its Runge-Kutta warm-up), got {steps}")


def latent_shape(model, height: int, width: int) -> tuple[int, int, int]:
    """(channels, h, w) of the latents of an image of ``height`` x ``width`` pixels."""
    return model.adapter.latent_shape(height, width)


def step_kwargs(scheduler, generators: list[torch.Generator] | None, eta: float) -> dict:
    params = set(inspect.signature(scheduler.step).parameters)
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params and generators is not None:
        kwargs["generator"] = generators
    return kwargs


def initial_noise(model, seeds: list[int], height: int, width: int) -> tuple[torch.Tensor, list]:
    """Per-sample generators and their initial latents (drawn on the CPU, as diffusers' randn_tensor does)."""
    shape = latent_shape(model, height, width)
    gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    noise = torch.cat([torch.randn((1, *shape), generator=g, dtype=model.dtype) for g in gens])
    return noise.to(model.device), gens


# ------------------------------------------------------------------------------------------- the one step --

def denoiser_output(model, x: torch.Tensor, t, cond: Conditioning, params: dict[str, torch.Tensor] | None = None,
                    embedded_guidance: float | None = None) -> torch.Tensor:
    """The denoiser's output for latents ``x`` [B, C, h, w] at timestep ``t`` (a scalar or one per sample) under
    ``cond`` (batch B). ``params`` (denoiser parameter name -> tensor) replaces those parameters for this call only.
    ``embedded_guidance``: a guidance-distilled model's guidance input (None: the model's default)."""
    if embedded_guidance is None:
        embedded_guidance = model.defaults.get("embedded_guidance")
    call = model.adapter.denoiser_call(x, torch.as_tensor(t).to(x.device), cond, embedded_guidance)
    if params:
        return call.output(torch.func.functional_call(call.module, params, call.args, call.kwargs, strict=False)[0])
    return call.output(call.module(*call.args, **call.kwargs)[0])


def guided_eps(session: Session, i: int, t: torch.Tensor, x: torch.Tensor,
               params: dict[str, torch.Tensor] | None = None, counts: list[int] | None = None) -> torch.Tensor:
    """The noise prediction of denoising step ``i`` at timestep ``t`` for (scaled) latents ``x`` [B, ...]: all the
    session's branches in one denoiser call, combined by the session. ``counts`` collects the number of branches."""
    branches = session.branches(i)
    n = len(branches)
    if counts is not None:
        counts.append(n)
    t = torch.as_tensor(t)
    ts = t if t.numel() == 1 else t.to(x.device).repeat(n)
    eps = denoiser_output(session.ctx.model, torch.cat([x] * n), ts, Conditioning.cat(branches), params,
                          session.ctx.embedded_guidance)
    return session.combine(i, t, list(eps.chunk(n)))


@torch.no_grad()
def denoise(session: Session, scheduler, latents: torch.Tensor, *, n_steps: int | None = None,
            kwargs: dict | None = None, params: dict[str, torch.Tensor] | None = None, callback=None,
            counts: list[int] | None = None, bar=None) -> torch.Tensor:
    """Run the scheduler's first ``n_steps`` steps (all by default) from ``latents`` (already the first latents:
    ``adapter.initial_latents``); ``callback(i, t, latents)`` sees the latents before each step. ``kwargs`` go to
    ``scheduler.step`` (η, generators); ``counts`` collects the branches of each step. The scheduler given is not
    stepped (some keep a step index), so one set-up scheduler serves many runs (trainers' trajectories)."""
    scheduler = copy.deepcopy(scheduler)
    timesteps = scheduler.timesteps if n_steps is None else scheduler.timesteps[:n_steps]
    adapter = session.ctx.model.adapter
    with session.unet_hooks():
        for i, t in enumerate(timesteps):
            if callback is not None:
                callback(i, t, latents)
            eps = guided_eps(session, i, t, adapter.model_input(scheduler, latents, t), params, counts)
            latents = scheduler.step(eps, t, latents, **(kwargs or {}), return_dict=False)[0]
            if bar is not None:
                bar.update(1)
    return latents


def cfg_session(model, cond: Conditioning, uncond: Conditioning, guidance: float, scheduler,
                height: int, width: int) -> Session:
    """Plain classifier-free guidance (no guard) over given conditioning: what trainers sample with (a guidance of 1
    or less samples the conditional branch alone)."""
    ctx = GenerationContext(model, [""] * len(cond), cond, uncond, guidance, scheduler.timesteps, height, width)
    return NoGuard().start(ctx)


# ------------------------------------------------------------------------------------------------ images --

def decode(model, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> pixels in [0, 1] ([B, 3, H, W], float32)."""
    vae = model.vae
    cfg = vae.config
    latents = model.adapter.to_vae(latents)
    upcast = vae.dtype == torch.float16 and getattr(cfg, "force_upcast", False)
    if upcast:
        vae.to(torch.float32)
        latents = latents.float()
    image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    if upcast:
        vae.to(torch.float16)
    return (image.float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def encode(model, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] ([B, 3, H, W]) -> latents as the denoiser reads them (the VAE posterior's mode, scaled; the
    inverse of ``decode``)."""
    vae = model.vae
    cfg = vae.config
    latents = vae.encode((pixels * 2 - 1).to(device=vae.device, dtype=vae.dtype)).latent_dist.mode()
    if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
        mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1).to(latents)
        return ((latents - mean) * cfg.scaling_factor / std).to(model.dtype)
    return (latents * cfg.scaling_factor).to(model.dtype)


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    arr = (pixels.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


@torch.no_grad()
def _generate_batch(model, prompts, seeds, s: SamplerSettings, negative, guard, conditioning, bar):
    adapter = model.adapter
    cond = adapter.encode(prompts) if conditioning is None else conditioning
    uncond = adapter.encode_negative(negative, len(prompts))
    scheduler = make_scheduler(model, s.scheduler)
    adapter.set_timesteps(scheduler, s.steps, s.height, s.width)  # on the host: indexing never waits for the GPU
    latents, gens = initial_noise(model, seeds, s.height, s.width)
    ctx = GenerationContext(model, list(prompts), cond, uncond, s.guidance, scheduler.timesteps, s.height, s.width,
                            s.embedded_guidance)
    per_step: list[int] = []
    latents = denoise(start_session(guard, ctx), scheduler, adapter.initial_latents(scheduler, latents),
                      kwargs=step_kwargs(scheduler, gens, s.eta), counts=per_step, bar=bar)
    return latents, decode(model, latents), per_step


def generate(model, prompts: list[str], seeds: list[int], *, steps: int | None = None,
             guidance: float | None = None, height: int | None = None, width: int | None = None,
             negative_prompt: str | list[str] | None = None, guard: Guard | None = None,
             scheduler: str | None = None, eta: float = 0.0, batch_size: int | None = None,
             conditioning: Conditioning | None = None, progress: bool = True,
             embedded_guidance: float | None = None) -> GenerationOutput:
    """Generate one image per (prompt, seed). Defaults (steps, guidance, size, and the negative prompt an applied edit
    declares, ``Model.negative_prompt``) come from the model. With
    ``conditioning`` [N, ...] given, it replaces the prompts' encoding (``prompts`` then only label the images and
    are what a guard reads as text)."""
    if len(prompts) != len(seeds):
        raise SafediffError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
    if not prompts:
        raise SafediffError("no prompts to generate")
    if conditioning is not None and len(conditioning) != len(prompts):
        raise SafediffError(f"got conditioning for {len(conditioning)} images but {len(prompts)} prompts")
    s = SamplerSettings.of(model, steps, guidance, height, width, scheduler, eta, embedded_guidance)
    guard = guard or NoGuard()
    if negative_prompt is None:
        negative_prompt = model.negative_prompt
    if isinstance(negative_prompt, str):
        negative_prompt = [negative_prompt] * len(prompts)
    bs = batch_size or len(prompts)
    lat, pix, per_step = [], [], []
    with tqdm(total=s.steps * ((len(prompts) + bs - 1) // bs), desc="denoising", disable=not progress,
              leave=False) as bar:
        for start in range(0, len(prompts), bs):
            part = slice(start, start + bs)
            neg = None if negative_prompt is None else negative_prompt[part]
            cond = None if conditioning is None else conditioning[part]
            latents, pixels, per_step = _generate_batch(model, prompts[part], seeds[part], s, neg, guard, cond, bar)
            lat.append(latents)
            pix.append(pixels)
    pixels = torch.cat(pix)
    if not torch.isfinite(pixels).all():
        raise SafediffError("the sampler produced non-finite values (NaN/inf): the guidance, a guard's strength or the "
                            "scheduler's step count is too extreme for this model, or its weights are damaged")
    settings = {**s.record(model), "negative_prompt": negative_prompt, "guard": guard.config()}
    return GenerationOutput(to_pil(pixels), pixels, torch.cat(lat), per_step, settings)
