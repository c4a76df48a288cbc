"""The guard contract: what the sampler asks a guard at each denoising step.

A guard turns one generation call into a *session*. At step i the session names the conditioning branches to run
(``branches``: the unconditional/negative branch, the prompt, and any extra concept branches), the sampler evaluates
all of them in **one** denoiser call, and the session combines the predictions (``combine``). With no guard the
session is classifier-free guidance (Ho & Salimans 2022): ε̃ = ε∅ + s_g (ε_p − ε∅). The predictions are whatever
the denoiser outputs (ε, v, or a flow model's velocity): every combination here is linear in them or element-wise.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from safediff.adapters import Conditioning
from safediff.errors import SafediffError


@dataclass
class GenerationContext:
    """What a guard may read about the batch being generated."""

    model: object  # safediff.models.Model
    prompts: list[str]
    cond: Conditioning  # prompt conditioning, [B, ...]
    uncond: Conditioning  # unconditional or negative-prompt conditioning, [B, ...]
    guidance: float
    timesteps: torch.Tensor
    height: int
    width: int
    embedded_guidance: float | None = None  # guidance-distilled models' guidance input (None: the model's default)

    @property
    def cfg(self) -> bool:
        return self.guidance > 1.0


class Session:
    """Classifier-free guidance; guards subclass and override ``branches``/``combine``/``unet_hooks``."""

    def __init__(self, ctx: GenerationContext):
        self.ctx = ctx

    def branches(self, i: int) -> list[Conditioning]:
        """Conditioning per branch, each [B, ...]; all are run in one UNet call. First two: ∅ and prompt."""
        return [self.ctx.uncond, self.ctx.cond] if self.ctx.cfg else [self.ctx.cond]

    def combine(self, i: int, t: torch.Tensor, eps: list[torch.Tensor]) -> torch.Tensor:
        if not self.ctx.cfg:
            return eps[0]
        eps_uncond, eps_prompt = eps[0], eps[1]
        return eps_uncond + self.ctx.guidance * (eps_prompt - eps_uncond)

    def unet_hooks(self) -> contextlib.AbstractContextManager:
        """Context entered around the denoising loop (e.g. attention-processor hooks); must restore on exit."""
        return contextlib.nullcontext()

    def concept_branches(self, n: int) -> tuple[int, ...]:
        """Which of a step's ``n`` branches carry the guard's concept rather than the prompt or ∅ (read through the
        unedited weights with ``concept_weights=base``, ``guards.unedited``)."""
        return ()


class Guard:
    """Base guard: no guidance beyond CFG. ``name`` is the registry name; ``config()`` is recorded in results.

    Class metadata read by the demo, the benchmarks and the contract suite (``tests/contract``): ``sandbox_preset``
    (the preset the sandbox runs use), ``multi_category`` (the guard picks one of several harmful categories, so it is
    measured on a set with several), ``zero_strength`` (options under which the guard must be plain CFG; None when
    the method has no such setting, with the reason in ``zero_strength_reason``), ``concept_branches`` (its sessions
    name the branches that carry its concept, ``Session.concept_branches``), ``concept_read_at_start`` (it reads its
    concept only in ``start``, through the weights loaded then, e.g. AdaVD's value targets), ``continuous`` (options
    under which the update is a continuous function of the noise predictions, so rounding that differs between UNet
    batch sizes
    stays rounding-sized: the contract's batch-independence check runs there), ``needs_cfg`` (the guard steers the
    classifier-free-guidance branches, so it acts only when CFG is on), ``transformer_options`` (options under which
    a guard whose defaults read UNet features runs on SD3/FLUX, which it refuses otherwise), ``edit_from`` (the
    registered eraser whose edits the guard applies, given in its ``edit`` option, e.g. SPM's membrane; None for most
    guards)."""

    name = "none"
    default_concept: str | None = None
    concept_branches = False  # whether its sessions name concept branches (``concept_weights=base`` applies)
    concept_read_at_start = False  # whether it reads its concept only in ``start`` (``concept_weights=base`` applies)
    sandbox_preset: str | None = None
    multi_category = False
    zero_strength: str | None = ""
    zero_strength_reason = ""
    continuous = ""
    needs_cfg = False
    transformer_options = ""
    edit_from: str | None = None

    def start(self, ctx: GenerationContext) -> Session:
        return Session(ctx)

    def config(self) -> dict:
        return {"name": self.name}


class NoGuard(Guard):
    """Plain classifier-free guidance."""


def start_session(guard: Guard, ctx: GenerationContext) -> Session:
    """``guard.start(ctx)``, refusing a guard that needs the negative branch on a model that samples without one by
    default (FLUX.1: guidance distilled into the weights) when CFG is off: it would silently do nothing."""
    if guard.needs_cfg and not ctx.cfg and not ctx.model.adapter.cfg_by_default:
        raise SafediffError(f"{guard.name} steers the negative (classifier-free guidance) branch, which this "
                            f"{ctx.model.adapter.arch} model runs only with true CFG: give guidance > 1 (e.g. 4, as "
                            "FluxPipeline's true_cfg_scale)")
    return guard.start(ctx)
