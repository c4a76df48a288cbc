"""An attack's budget and the meter that measures and enforces it.

Compute is *measured*, not declared: forward pre-hooks on every denoiser (UNet or transformer; the units keep the
name ``unet_*``) and text encoder of the target (and of its unconstrained reference model) count calls and samples;
backward passes and iterations are counted through the meter. Given a ``Budget``, the meter enforces it where the
compute is spent: a counted unit that would exceed its limit raises ``BudgetExceeded`` *before* it runs (so a recipe
that forgets to ask ``afford`` fails loudly instead of overspending). ``seconds`` is checked by ``fits`` before each
unit, so the last unit may end past it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass

import torch

from safediff.errors import SafediffError

COUNTED = ("iterations", "unet_forward", "unet_backward", "text_encoder")


class BudgetExceeded(RuntimeError):
    """A recipe spent a counted unit its budget does not cover (a bug in the recipe: it must ask ``afford``)."""


@dataclass(frozen=True)
class Budget:
    """Limits per prompt; None = unlimited. Counted units are respected exactly; ``seconds`` before each unit."""

    iterations: int | None = None
    # the denoiser's calls: the UNet's, or the transformer's on SD3/FLUX (the keys keep the papers' names)
    unet_forward: int | None = None  # denoiser forward *calls* (one call may hold several branches/samples)
    unet_backward: int | None = None  # backward passes through the denoiser
    text_encoder: int | None = None  # text-encoder forward calls
    seconds: float | None = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is not None and not v > 0:
                raise SafediffError(f"budget {f.name} must be > 0, got {v}; accepted keys: "
                                    f"{', '.join(x.name for x in dataclasses.fields(Budget))}")

    @classmethod
    def parse(cls, text: str | None, default: dict | None = None) -> "Budget":
        """``"iterations=40,unet_forward=500,seconds=60"`` on top of ``default``."""
        from safediff.options import parse_options, typed_values

        return cls(**{**(default or {}), **typed_values(cls, parse_options(text, "budget"), "budget")})

    def protocol(self) -> dict:
        return dataclasses.asdict(self)


def add_costs(*costs: dict) -> dict:
    out: dict = {}
    for c in costs:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return out


class ComputeMeter:
    """Counts UNet forward calls/samples, UNet backward passes, text-encoder calls, iterations and seconds; with a
    ``budget``, refuses (``BudgetExceeded``) any counted unit beyond it."""

    def __init__(self, budget: Budget | None = None):
        self.budget = budget
        self.counts = {"iterations": 0, "unet_forward": 0, "unet_forward_samples": 0, "unet_backward": 0,
                       "text_encoder": 0}
        self._start = time.monotonic()
        self._stopped: float | None = None
        self._enforcing = budget is not None

    @property
    def seconds(self) -> float:
        return (self._stopped or time.monotonic()) - self._start

    def stop(self) -> None:
        self._stopped = time.monotonic()

    def spend(self, key: str, amount: int = 1) -> None:
        """Count ``amount`` of a counted unit, refusing it when the budget does not cover it."""
        limit = getattr(self.budget, key, None) if self._enforcing else None
        if limit is not None and self.counts[key] + amount > limit:
            raise BudgetExceeded(f"the attack spent more {key} than its budget allows ({limit}); a recipe must ask "
                                 "ctx.afford(...) before each unit of work")
        self.counts[key] += amount

    @contextlib.contextmanager
    def watch(self, *models):
        """Count every forward call of the models' denoisers and text encoders while active (each module once)."""
        handles, seen = [], set()

        def unet_hook(module, args, kwargs):
            sample = args[0] if args else kwargs["sample"]
            self.spend("unet_forward")
            self.counts["unet_forward_samples"] += int(sample.shape[0])

        def text_hook(module, args):
            self.spend("text_encoder")

        for m in models:
            if id(m.denoiser) not in seen:
                seen.add(id(m.denoiser))
                handles.append(m.denoiser.register_forward_pre_hook(unet_hook, with_kwargs=True))
            for te in m.adapter.text_encoders:
                if id(te) not in seen:
                    seen.add(id(te))
                    handles.append(te.register_forward_pre_hook(text_hook))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def backward(self, loss: torch.Tensor, inputs: list[torch.Tensor] | None = None) -> None:
        """One counted backward pass (``loss.backward()``, or into ``inputs`` only)."""
        self.spend("unet_backward")
        loss.backward(inputs=inputs)

    @contextlib.contextmanager
    def unmetered(self):
        """Work inside is neither counted nor charged (nor timed); yields a dict that receives what it spent."""
        before, start, enforcing = dict(self.counts), time.monotonic(), self._enforcing
        self._enforcing = False
        spent: dict = {}
        try:
            yield spent
        finally:
            spent.update({k: self.counts[k] - before[k] for k in before})
            spent["seconds"] = round(time.monotonic() - start, 3)
            self.counts.update(before)
            self._start += time.monotonic() - start
            self._enforcing = enforcing

    def fits(self, budget: Budget, cost: dict) -> bool:
        """Would spending ``cost`` keep every counted unit within the budget (and is time left)?"""
        if budget.seconds is not None and self.seconds >= budget.seconds:
            return False
        for key in COUNTED:
            limit = getattr(budget, key)
            if limit is not None and self.counts[key] + cost.get(key, 0) > limit:
                return False
        return True

    def snapshot(self) -> dict:
        return {**self.counts, "seconds": round(self.seconds, 3)}

    def delta(self, before: dict) -> dict:
        """Counted units (iterations aside) spent since ``before`` (a copy of ``counts``)."""
        return {k: self.counts[k] - before[k] for k in COUNTED if k != "iterations"}
