"""ESD's training points for the erasers built on it (AdvUnlearn, STEREO): x_t from partial sampling.

From Gaussian noise, i steps (i uniform in [0, S)) of the model's trajectory scheduler (``sampling.
trajectory_scheduler``: DDIM for UNet models, the flow-matching Euler for SD3/FLUX) under classifier-free guidance on
a prompt put x_t at the scheduler's timestep τ_i; the prediction is then taken at a training timestep t uniform in
that step's bin [τ_i, τ_{i−1}) (``esd.timestep_bin``; the reference codes' ``og_num``/``og_num_lim``). Every random
number comes from the caller's generator, in the order step, t, noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from safediff.adapters import Conditioning
from safediff.erasers.esd import timestep_bin
from safediff.sampling import cfg_session, denoise, latent_shape, step_kwargs, trajectory_scheduler


@dataclass
class PartialSampler:
    """The trajectory scheduler with ``steps`` steps at the model's native size."""

    model: object
    steps: int

    def __post_init__(self):
        d = self.model.defaults
        self.height, self.width = int(d["height"]), int(d["width"])
        self.shape = latent_shape(self.model, self.height, self.width)
        self.scheduler = trajectory_scheduler(self.model, self.steps, self.height, self.width)

    def point(self, generator: torch.Generator) -> tuple[int, int]:
        """(scheduler steps to run, training timestep of the prediction)."""
        step = int(torch.randint(self.steps, (1,), generator=generator))
        lo, hi = timestep_bin(self.scheduler, step)
        return step, int(torch.randint(lo, hi, (1,), generator=generator))

    @torch.no_grad()
    def sample(self, cond: Conditioning, uncond: Conditioning, guidance: float, step: int,
               generator: torch.Generator, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """x_t [B, C, h, w] after ``step`` steps from fresh noise under CFG ``guidance`` on ``cond`` [B, ...]
        (``uncond`` [B, ...]); ``params`` substitutes denoiser parameters (the frozen model while one is trained)."""
        noise = torch.randn((len(cond), *self.shape), generator=generator, dtype=self.model.dtype)
        session = cfg_session(self.model, cond, uncond, guidance, self.scheduler, self.height, self.width)
        latents = self.model.adapter.initial_latents(self.scheduler, noise.to(self.model.device))
        return denoise(session, self.scheduler, latents, n_steps=step, kwargs=step_kwargs(self.scheduler, None, 0.0),
                       params=params)
