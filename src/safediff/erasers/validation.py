"""Validators: ``callable(model) -> rate`` of a concept in generated images (lower = better erased).

RECE keeps the epoch whose validation rate is lowest. On the sandbox the rate is exact: images are generated from
the prompts the eraser itself is told (the plain templates, ``safediff.erasers.prompts.contexts``; never synonyms or
held-out templates) and the sandbox detectors read the colour/shape of each image.
"""

from __future__ import annotations

from typing import Callable

from safediff.concepts import Concept
from safediff.erasers.prompts import SANDBOX_CATEGORIES, contexts

VALIDATION_SEED = 90_000  # seeds VALIDATION_SEED + k, apart from the benchmark sets' random seeds


def is_sandbox(model) -> bool:
    return model.spec.split("+")[0].strip() == "sandbox"


def sandbox_rate(model, attribute: str, category: str, prompts: list[str], seeds: list[int]) -> float:
    """Fraction of images (one per prompt/seed) whose detected colour (or shape) is ``attribute``."""
    from safediff.detectors.sandbox import attributes
    from safediff.sampling import generate

    images = generate(model, prompts, seeds, progress=False).pixels
    key = "colour" if category == "colour" else "shape"
    found = [a[key] == attribute for a in attributes(images)]
    return sum(found) / len(found)


def sandbox_validator(model, concepts: list[Concept], images_per_prompt: int = 2) -> Callable | None:
    """The default validator on the sandbox (mean rate over the concepts); None for any other model/concept."""
    if not is_sandbox(model) or not all(c.category in SANDBOX_CATEGORIES for c in concepts):
        return None
    plan = []
    for c in concepts:
        prompts = [p for p in contexts(c.keywords[0], c.category, expand=True) for _ in range(images_per_prompt)]
        plan.append((c.keywords[0], c.category, prompts, [VALIDATION_SEED + k for k in range(len(prompts))]))

    def validate(m) -> float:
        return sum(sandbox_rate(m, a, cat, p, s) for a, cat, p, s in plan) / len(plan)

    return validate
