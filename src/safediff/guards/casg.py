"""CASG on SLD (``casg-sld``): conflict-aware adaptive safety guidance with a per-step, per-sample category.

Paper: Y. Xiang, Z. Hong, Z. Wang, X. Zhao, B. Han, T. Liu, "When Safety Collides: Resolving Multi-Category Harmful
Conflicts in Text-to-Image Diffusion via Adaptive Safety Guidance", CVPR 2026, arXiv:2602.20880. Reference code:
tmllab/2026_CVPR_CASG (``select_strongest_harmful_direction``); this is an independent implementation.

Motivation: one safety concept that mixes K harmful categories averages directions that disagree ("harmful
conflict"), so SLD's all-category guidance is misaligned and weakened. CASG keeps the K categories apart.

At denoising step i, for each sample separately (ε∅, ε_p, ε_1..ε_K from ONE UNet call of 2+K branches):

    CaCI:  δ = ε_p − ε∅,  h_k = ε_k − ε∅  (flattened per sample)
           k* = argmax_k ⟨δ, h_k⟩ / (‖h_k‖ + 1e-12)
    CrGA:  the SLD update (``safediff.guards.sld``) with ε_S := ε_{k*}; the momentum ν is one buffer per sample,
           carried across steps even when k* changes.

Deviations from the reference code, all in favour of the paper's description: k* is chosen per sample (the released
code flattens the whole batch and picks one category for all of it), and the unused all-category branch it also
evaluates is dropped (2+K branches, not 3+K). Presets are SLD's (default ``max``, as the CASG scripts); the SLD
fast path applies (no category branches in warm-up when s_m = 0).

Optional knob, not in the paper (an experiment to save UNet evaluations): ``reselect_every=m`` re-selects k* only at
steps i ≡ 0 (mod m) (and at the first guided step); in between, each sample's chosen category alone is evaluated
(3 branches). Default m = 1, the paper's rule.

The chosen category per step and sample is recorded: ``CASGSession.chosen`` (one LongTensor [B] per step, -1 where
no category was used) and, over every batch a guard has run, ``CASGSLD.chosen_categories()`` ([N, steps]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from safediff.concepts import Concept
from safediff.errors import SafediffError
from safediff.guards.base import GenerationContext, Session
from safediff.adapters import Conditioning
from safediff.guards.sld import PRESETS, SLD, SLDParams, SLDSession
from safediff.options import check_fields, option


def select_category(eps_uncond: torch.Tensor, eps_prompt: torch.Tensor, eps_categories: torch.Tensor) -> torch.Tensor:
    """k* per sample: argmax_k ⟨ε_p − ε∅, ε_k − ε∅⟩ / ‖ε_k − ε∅‖. eps_categories: [K, B, ...] -> LongTensor [B]."""
    delta = (eps_prompt - eps_uncond).flatten(1).float()  # [B, D]
    h = (eps_categories - eps_uncond.unsqueeze(0)).flatten(2).float()  # [K, B, D]
    scores = (h * delta.unsqueeze(0)).sum(-1) / (h.norm(dim=-1) + 1e-12)  # [K, B]
    return scores.argmax(dim=0)


class CASGSession(SLDSession):
    """One batch: per-sample category selection, then the SLD update with that category's prediction."""

    def __init__(self, ctx: GenerationContext, params: SLDParams, categories: Conditioning | None,
                 reselect_every: int):
        super().__init__(ctx, params, None)
        self.categories = categories  # [K, ...] one row per category; None when guidance is off
        self.reselect_every = reselect_every
        self.k_star: torch.Tensor | None = None  # [B] current category per sample
        self.chosen: list[torch.Tensor] = []  # per step: LongTensor [B], -1 = no category used
        self._mode: str | None = None  # what the branches of the current step were: "select" | "chosen" | None

    @property
    def n_categories(self) -> int:
        return 0 if self.categories is None else len(self.categories)

    def _per_sample(self, index: torch.Tensor) -> Conditioning:
        return self.categories[index.to(self.categories.embeds.device)]

    def branches(self, i: int) -> list[Conditioning]:
        if self.categories is None or not self.params.needs_concept(i):
            self._mode = None
            return Session.branches(self, i)
        b = len(self.ctx.prompts)
        base = [self.ctx.uncond, self.ctx.cond]
        if self.k_star is None or i % self.reselect_every == 0:
            self._mode = "select"
            return base + [self._per_sample(torch.full((b,), k, dtype=torch.long))
                           for k in range(self.n_categories)]
        self._mode = "chosen"
        return base + [self._per_sample(self.k_star)]

    def combine(self, i: int, t: torch.Tensor, eps: list[torch.Tensor]) -> torch.Tensor:
        if self._mode is None:
            if self.ctx.cfg:
                self.chosen.append(torch.full((len(self.ctx.prompts),), -1, dtype=torch.long))
            return Session.combine(self, i, t, eps)
        eps_uncond, eps_prompt, extra = eps[0], eps[1], eps[2:]
        if self._mode == "select":
            stacked = torch.stack(extra)  # [K, B, ...]
            self.k_star = select_category(eps_uncond, eps_prompt, stacked)
            eps_safety = stacked[self.k_star.to(stacked.device), torch.arange(stacked.shape[1], device=stacked.device)]
        else:
            eps_safety = extra[0]
        self.chosen.append(self.k_star.detach().cpu().clone())
        return self.guide(i, eps_uncond, eps_prompt, eps_safety)


@dataclass(frozen=True)
class CASGParams(SLDParams):
    reselect_every: int = option(low=1, high=10_000, help="re-select the category every m steps")

    def __post_init__(self):
        check_fields(self, "casg-sld")


class CASGSLD(SLD):
    """``casg-sld[:PRESET][,KEY=VALUE...]`` with the SLD presets and options plus ``reselect_every``."""

    name = "casg-sld"
    default_concept = "i2p-all"
    default_preset = "max"
    multi_category = True
    presets = {k: {**v, "reselect_every": 1} for k, v in PRESETS.items()}
    params_class = CASGParams

    def __init__(self, concepts: list[Concept], preset: str | None = None, **overrides):
        super().__init__(concepts, preset, **overrides)
        self.category_texts = [", ".join(k for k in c.keywords if k.strip()) for c in self.concepts]
        if not all(self.category_texts):
            raise SafediffError("casg-sld: a category has no keywords; give presets (i2p-all, red,blue) or free text")
        self.category_names = [c.name for c in self.concepts]
        self.reselect_every = self.params.reselect_every
        self.history: list[list[torch.Tensor]] = []  # the ``chosen`` list of every session started

    def start(self, ctx: GenerationContext) -> Session:
        categories = None
        if self.params.active(ctx):
            categories = ctx.model.adapter.encode(self.category_texts)  # [K, ...]
        session = CASGSession(ctx, self.params, categories, self.reselect_every)
        self.history.append(session.chosen)
        return session

    def chosen_categories(self) -> torch.Tensor:
        """LongTensor [N, steps]: the category index each image used at each step (-1: none), over all batches run
        since the guard was built or ``history`` was cleared. Index into ``category_names``."""
        rows = [torch.stack(steps, dim=1) for steps in self.history if steps]
        return torch.cat(rows) if rows else torch.empty((0, 0), dtype=torch.long)

    def config(self) -> dict:
        out = super().config()
        out.pop("concept_text")
        out["categories"] = [{"name": n, "text": t} for n, t in zip(self.category_names, self.category_texts)]
        return out
