"""Negative-prompt guard: the unconditional branch of classifier-free guidance becomes the concept text.

Classifier-free guidance (Ho & Salimans, arXiv:2207.12598) with the unconditional prediction replaced by that of
a negative text: the "SD-NEGP" baseline of the safety-guidance literature (ml-research/i2p ships it as
``mitigation/negprompt.py`` next to SLD, Schramowski et al., CVPR 2023, arXiv:2211.05105). With c_N the concept text
(all keywords of all concepts, ", "-joined, as SLD builds its safety concept):

    ε̃ = ε(c_N) + s_g (ε_p − ε(c_N))

2 UNet branches per step (as plain CFG), no hyper-parameters. The concept text replaces any ``negative_prompt``
given to ``generate``; with CFG off (s_g ≤ 1) it has no effect, as a negative prompt has none.
"""

from __future__ import annotations

from dataclasses import dataclass

from safediff.concepts import Concept
from safediff.guards.base import GenerationContext, Guard, Session
from safediff.options import with_preset
from safediff.guards.sld import sld_concept_text


@dataclass(frozen=True)
class NoOptions:
    """The negative-prompt guard has no hyper-parameters."""


class NegativePromptSession(Session):
    def __init__(self, ctx: GenerationContext, negative):
        super().__init__(ctx)
        self.negative = negative

    def branches(self, i: int):
        return [self.negative, self.ctx.cond] if self.ctx.cfg else [self.ctx.cond]


class NegativePromptGuard(Guard):
    """``negative-prompt`` (no presets, no options)."""

    name = "negative-prompt"
    default_concept = "sld-default"
    zero_strength = None
    needs_cfg = True
    zero_strength_reason = "the concept text replaces the unconditional branch; there is no strength to turn down"

    def __init__(self, concepts: list[Concept], preset: str | None = None, **overrides):
        with_preset(self.name, NoOptions, {}, None, preset, overrides)
        self.concepts = list(concepts)
        self.concept_text = sld_concept_text(self.concepts)

    def start(self, ctx: GenerationContext) -> Session:
        if not ctx.cfg:
            return Session(ctx)
        return NegativePromptSession(ctx, ctx.model.adapter.encode([self.concept_text] * len(ctx.prompts)))

    def config(self) -> dict:
        return {"name": self.name, "concepts": [c.name for c in self.concepts], "concept_text": self.concept_text}
