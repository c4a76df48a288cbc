"""The sandbox validator: ``callable(model) -> rate`` of the concepts in generated images (lower = better erased).

RECE keeps the epoch whose validation rate is lowest. On the sandbox the rate is exact: images are generated from the
prompts the eraser itself is told (each keyword in the concept's contexts, ``safediff.erasers.prompts.contexts``;
never synonyms or held-out templates) and the sandbox detectors read the colour/shape of each image. Validators are
passed explicitly (``RECE(validator=sandbox_validator(concepts))``; ``safediff erase --validator sandbox``).
"""

from __future__ import annotations

from typing import Callable

from safediff.concepts import Concept
from safediff.errors import SafediffError

VALIDATION_SEED = 90_000  # seeds VALIDATION_SEED + k, apart from the benchmark sets' random seeds
CATEGORIES = ("colour", "shape", "style")


def sandbox_rate(model, attribute: str, category: str, prompts: list[str], seeds: list[int]) -> float:
    """Fraction of images (one per prompt/seed) whose detected ``category`` (colour, shape or style) is
    ``attribute``."""
    from safediff.detectors.sandbox import attributes
    from safediff.sampling import generate

    images = generate(model, prompts, seeds, progress=False).pixels
    found = [a[category] == attribute for a in attributes(images)]
    return sum(found) / len(found)


def sandbox_validator(concepts: list[Concept], images_per_prompt: int = 2) -> Callable:
    """The exact validator for sandbox concepts (mean rate over the concepts)."""
    from safediff.erasers.prompts import contexts

    if not concepts or not all(c.category in CATEGORIES for c in concepts):
        raise SafediffError("the sandbox validator reads sandbox colours and shapes; got concepts "
                            f"{[c.name for c in concepts]} ({', '.join(sorted({c.category for c in concepts}))})")
    plan = []
    for c in concepts:
        prompts = [p for p in contexts(c, c.keywords[0], expand=True) for _ in range(images_per_prompt)]
        plan.append((c.keywords[0], c.category, prompts, [VALIDATION_SEED + k for k in range(len(prompts))]))

    def validate(m) -> float:
        return sum(sandbox_rate(m, a, cat, p, s) for a, cat, p, s in plan) / len(plan)

    return validate


SANDBOX_ARCH = "sd1"  # the sandbox model is an SD-1-format UNet
SANDBOX_ARCHES = {"sandbox": SANDBOX_ARCH, "sandbox-flux": "flux"}  # model spec -> ``Adapter.arch``


def sandbox_erasers(arch: str = SANDBOX_ARCH) -> list[str]:
    """Registered erasers (aliases left out) that run on a sandbox's architecture (``sd1`` for ``sandbox``, ``flux``
    for ``sandbox-flux``); the others (``archs`` without it: EraseAnything, which needs MM-DiT joint attention, on the
    UNet; MACE, Forget-Me-Not, SafeGen, DES on FLUX) are left out of the demo and the sandbox benchmarks."""
    from safediff.registry import ERASERS

    return [n for n in ERASERS.primary_names() if not ERASERS.get(n).archs or arch in ERASERS.get(n).archs]


def guard_spec(cls, arch: str = SANDBOX_ARCH) -> str:
    """A registered guard's spec on a sandbox: its ``sandbox_preset``, plus its ``transformer_options`` on an MM-DiT
    (``sandbox-flux``), under which a guard whose defaults read UNet features runs there."""
    spec = cls.name + (f":{cls.sandbox_preset}" if cls.sandbox_preset else "")
    if arch in ("sd3", "flux") and cls.transformer_options:
        spec += ("," if ":" in spec else ":") + cls.transformer_options
    return spec


def eraser_settings(cls, purpose: str | None, concepts: list[Concept]) -> dict:
    """An eraser class's settings on the sandbox for ``purpose`` (its ``sandbox`` table: benchmark, demo, smoke;
    None: its defaults), plus the sandbox validator when the eraser takes one (RECE) and the exact mask provider
    when it takes one (MACE's ``masks``: ``safediff.sandbox.masks``)."""
    import dataclasses

    from safediff.sandbox.masks import sandbox_mask_provider

    settings = dict(cls.sandbox.get(purpose, {})) if purpose else {}
    fields = {f.name for f in dataclasses.fields(cls)}
    if "validator" in fields:
        settings["validator"] = sandbox_validator(concepts)
    if "masks" in fields:
        settings["masks"] = sandbox_mask_provider(concepts)
    return settings
