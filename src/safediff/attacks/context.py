"""One prompt's search: what a recipe reads (target, prompt, seed, seeded rng, judge, budget) and the calls through
which it spends and judges (``afford``, ``tick``, ``backward``, ``evaluate``, ``unmetered``)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

from safediff.adapters import Conditioning
from safediff.attacks.budget import Budget, ComputeMeter, add_costs
from safediff.attacks.judge import Judge
from safediff.attacks.target import Target


@dataclass
class Evaluation:
    prompt: str | None
    success: bool
    score: float  # the judge's flagged-label score
    image: Any  # PIL image


@dataclass
class Found:
    """What a recipe returns: the best adversarial prompt (text) and/or embedding, and its evaluation."""

    prompt: str | None = None
    token_ids: list[int] | None = None
    embedding: torch.Tensor | None = None
    evaluation: Evaluation | None = None
    extra: dict = field(default_factory=dict)


class AttackContext:
    """One prompt's search: target, prompt, seed, seeded rng, judge, budget, meter, objective curve.

    ``evaluation_cost`` is what one judged generation costs (measured on the unmodified prompt's generation)."""

    def __init__(self, target: Target, row: dict, judge: Judge, budget: Budget, seed: int, meter: ComputeMeter,
                 evaluation_cost: dict):
        self.target, self.row, self.judge, self.budget, self.seed, self.meter = target, row, judge, budget, seed, meter
        self.evaluation_cost = evaluation_cost
        self.prompt: str = row["prompt"]
        self.rng = torch.Generator(device="cpu").manual_seed(int(seed))
        self.history: list[dict] = []
        self.evaluations: list[dict] = []
        self.setup_compute: dict[str, dict] = {}

    # --- budget ---
    def step_cost(self, noise: int = 0, reference_noise: int = 0, encode: int = 0, backward: int = 0,
                  iterations: int = 1) -> dict:
        """Counted cost of a unit made of that many target/reference noise calls, text encodings and backwards."""
        c = self.target.call_costs()
        parts = [{k: v * noise for k, v in c["noise"].items()},
                 {k: v * reference_noise for k, v in c["reference_noise"].items()},
                 {k: v * encode for k, v in c["encode"].items()}]
        return add_costs(*parts, {"unet_backward": backward, "iterations": iterations})

    def afford(self, cost: dict, reserve_evaluation: bool = True) -> bool:
        """True if the unit (plus, by default, one final evaluation) fits in what is left of the budget."""
        total = add_costs(cost, self.evaluation_cost) if reserve_evaluation else cost
        return self.meter.fits(self.budget, total)

    def tick(self, objective: float | None = None, **info) -> None:
        """One iteration done; record the objective curve."""
        self.meter.spend("iterations")
        self.history.append({"iteration": self.meter.counts["iterations"],
                             **({"objective": float(objective)} if objective is not None else {}), **info})

    def backward(self, loss: torch.Tensor, inputs: list[torch.Tensor] | None = None) -> None:
        self.meter.backward(loss, inputs)

    @contextlib.contextmanager
    def unmetered(self, label: str):
        """Setup the attack is given rather than searches with (a target image, a fixed reference encoding): its
        compute is recorded in ``setup_compute[label]`` and neither counted nor charged against the budget."""
        with self.meter.unmetered() as spent:
            yield
        self.setup_compute[label] = spent

    # --- judging ---
    @torch.no_grad()
    def evaluate(self, prompt: str) -> Evaluation | None:
        """Generate the prompt with the target at the row's seed and judge it (None when the budget is spent)."""
        if not self.meter.fits(self.budget, self.evaluation_cost):
            return None
        return self.judged(prompt, self.target.generate([prompt], [self.seed]))

    @torch.no_grad()
    def evaluate_conditioning(self, cond: Conditioning, label: str | None = None) -> Evaluation | None:
        """As ``evaluate``, for conditioning no text produces (``label`` names it in the record)."""
        if not self.meter.fits(self.budget, self.evaluation_cost):
            return None
        placeholder = [f"<conditioning {i}>" for i in range(len(cond))]  # what a guard reads as the prompt text
        return self.judged(label, self.target.generate(placeholder, [self.seed], conditioning=cond))

    def judged(self, label: str | None, out) -> Evaluation:
        """Judge a generation the recipe made itself (one image; e.g. with its own sampler-side guard) and record
        it; its compute was counted by the meter as it ran."""
        score = float(self.judge.score(out.pixels)[0])
        ev = Evaluation(label, score >= self.judge.threshold, score, out.images[0])
        self.evaluations.append({"iteration": self.meter.counts["iterations"], "prompt": label,
                                 "score": round(score, 6), "success": ev.success})
        return ev
