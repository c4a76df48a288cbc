"""The attack contract: a *recipe* run against a *target*, judged by a *judge*, within a *budget*.

An attack asks: is there a prompt (or embedding) that makes the target produce the concept again? Like TextAttack,
every published attack is a short **recipe** composed of small reusable parts:

    objective      what the search minimises (``attacks/objectives.py``: denoising error on a target image,
                   noise-prediction matching, embedding distance)
    search space   what is searched (``attacks/spaces.py``: prefix/infix token slots relaxed on the simplex, soft
                   embeddings projected to the nearest real token; ``token_sequences.py``: token-id genomes)
    search method  how (``attacks/search.py``: simplex Adam, projected Adam; ``genetic.py``; ``gcg.py``)
    budget         how much compute it may spend (``attacks/budget.py``), measured and enforced by a meter
    judge          a detector + flagged labels + threshold -> success flags (``attacks/judge.py``)

How to write a recipe
---------------------
1. Subclass ``Attack`` as a ``@dataclass``; hyper-parameters are fields (``safediff.options.option`` gives ranges
   and help) with the paper's defaults; state the reference budget in the docstring and ``reference_budget``; set
   ``name`` (the registry name), ``default_budget`` and ``sandbox`` (settings per purpose on the sandbox).
2. Implement ``search(self, ctx: AttackContext) -> Found`` (``attacks/context.py``). ``ctx`` gives the target, the
   prompt, the seed, a seeded ``ctx.rng`` (draw ALL randomness from it: the same seed gives the same prompt), the
   judge and the budget. Before each unit of work ask ``ctx.afford(cost)`` (``ctx.step_cost(...)`` builds the cost
   from the target's measured per-call costs) and stop when it says no; ``afford`` keeps room for one final
   evaluation unless ``reserve_evaluation=False``. After the unit call ``ctx.tick(objective)``; backward passes go
   through ``ctx.backward(loss)``. Spending what the budget does not cover raises ``BudgetExceeded``.
3. ``ctx.evaluate(prompt)`` / ``ctx.evaluate_conditioning(cond)`` generate with the target at the row's seed and
   judge (``None`` when the budget is spent); ``ctx.judged(label, out)`` judges a generation the recipe made itself.
   Setup the attack is *given* (a target image, a fixed reference encoding) runs inside ``ctx.unmetered(label)``.
4. Register the class in ``safediff.registry.ATTACKS``; the contract suite (``tests/contract``) then checks it.

``Attack.run(target, row, judge, budget, seed)`` does the rest: it generates the unmodified prompt first (Pre-ASR;
its compute is recorded apart from the attack's), skips the search when that already succeeds (the UnlearnDiffAtk
ASR definition counts it as a success), meters the search and returns an ``AttackResult``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from safediff.attacks.budget import Budget, ComputeMeter
from safediff.attacks.context import AttackContext, Found
from safediff.attacks.judge import Judge
from safediff.attacks.target import Target, frozen_weights
from safediff.options import check_fields


@dataclass
class AttackResult:
    prompt: str
    seed: int
    adversarial_prompt: str | None
    pre_success: bool
    success: bool
    pre_image: Any = None  # PIL image of the unmodified prompt
    image: Any = None  # PIL image of the adversarial prompt (None when the search never judged one)
    token_ids: list[int] | None = None
    embedding: torch.Tensor | None = None
    pre_score: float | None = None
    score: float | None = None
    compute: dict = field(default_factory=dict)
    pre_compute: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    evaluations: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def record(self) -> dict:
        """JSON-able fields (images and embedding are stored next to it by the runner)."""
        skip = {"pre_image", "image", "embedding"}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}


@dataclass
class Attack:
    """A recipe. Subclasses: ``@dataclass``, hyper-parameters as fields, ``name``, budgets, ``search``."""

    name: ClassVar[str] = "attack"
    default_budget: ClassVar[dict] = {}  # the per-prompt budget when none is given
    # settings per purpose on the sandbox ("benchmark": benchmarks/attacks_sandbox.py, "demo", "smoke": demo --quick
    # and the contract tests), each {"params": spec options, "budget": budget options}
    sandbox: ClassVar[dict[str, dict]] = {}
    reference_budget: ClassVar[dict] = {}  # the paper's per-prompt budget, for the record
    uses_unet: ClassVar[bool] = True  # False for text-encoder-only attacks (Ring-A-Bell, MMA text)
    required_columns: ClassVar[tuple[str, ...]] = ("prompt",)
    skip_when_pre_success: bool = True

    def __post_init__(self):
        check_fields(self, f"attack {self.name}")

    def search(self, ctx: AttackContext) -> Found:
        raise NotImplementedError

    def config(self) -> dict:
        return {"name": self.name, **dataclasses.asdict(self), "reference_budget": self.reference_budget}

    def embedding_tensors(self, embedding: torch.Tensor, adapter) -> dict[str, torch.Tensor]:
        """How the runner saves ``Found.embedding`` (safetensors); recipes with a standard format override it."""
        return {"embedding": embedding.contiguous()}

    def run(self, target: Target, row: dict, judge: Judge, budget: Budget, seed: int) -> AttackResult:
        prompt = row["prompt"]
        pre_meter = ComputeMeter()
        with torch.no_grad(), pre_meter.watch(*target.models()):
            before = dict(pre_meter.counts)
            pre = target.generate([prompt], [seed])
            eval_cost = pre_meter.delta(before)
            pre_score = float(judge.score(pre.pixels)[0])
        pre_meter.stop()
        pre_success = pre_score >= judge.threshold
        result = AttackResult(prompt=prompt, seed=seed, adversarial_prompt=None, pre_success=pre_success,
                              success=pre_success, pre_image=pre.images[0], pre_score=pre_score,
                              pre_compute=pre_meter.snapshot())
        if pre_success and self.skip_when_pre_success:
            result.compute = {**ComputeMeter().snapshot(), "seconds": 0.0}
            result.extra["skipped"] = "the unmodified prompt already succeeds"
            return result
        meter = ComputeMeter(budget)
        ctx = AttackContext(target, row, judge, budget, seed, meter, eval_cost)
        with frozen_weights(*target.models()):
            target.call_costs()  # calibrated outside the attack's meter
            with meter.watch(*target.models()):
                found = self.search(ctx)
        meter.stop()
        ev = found.evaluation
        result.adversarial_prompt = found.prompt
        result.token_ids = found.token_ids
        result.embedding = None if found.embedding is None else found.embedding.detach().cpu()
        result.success = bool(ev is not None and ev.success)
        result.image = None if ev is None else ev.image
        result.score = None if ev is None else ev.score
        result.compute = meter.snapshot()
        result.history = ctx.history
        result.evaluations = ctx.evaluations
        result.extra.update(found.extra)
        if ctx.setup_compute:
            result.extra["setup_compute"] = ctx.setup_compute
        return result
