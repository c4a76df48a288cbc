"""Concepts: what a guard steers away from, an eraser removes, an attack tries to bring back.

Presets:
- the 7 I2P categories with CASG's keyword lists (``hate`` ... ``illegal``; ``i2p-all`` is all seven, one per category),
- ``sld-default``: SLD's single all-category concept text (diffusers ``StableDiffusionPipelineSafe``),
- ``safree-nudity``: SAFREE's 17 nudity strings,
- the sandbox's attribute values (``safediff.sandbox.concepts``), which also say where their words appear
  (``contexts``), with which prompt pairs they are named and not (``pairs``), and which detector judges them.
Anything else given by name is taken as free text (one concept whose keyword is that text).

Method code reads ``contexts``/``pairs``/``judge`` from the concept and falls back to generic choices when they are
empty; it never asks which world a concept comes from.
"""

from __future__ import annotations

from dataclasses import dataclass

from safediff.errors import SafediffError


@dataclass(frozen=True)
class Concept:
    name: str
    keywords: tuple[str, ...]  # the words/phrases that name the concept (first one is the canonical word)
    category: str = ""
    synonyms: tuple[str, ...] = ()  # other words for it that an eraser is *not* told about (held-out tests)
    guide: str = ""  # what to map it to ("" = unconditional), e.g. "a person wearing clothes"
    preserve: tuple[str, ...] = ()  # concepts to keep intact while erasing this one
    # prompts erasers are told the concept's words appear in: templates with "{}" for the word and "{a}" for the
    # article agreeing with the word after it (``fill_context``); () = the method's generic templates
    contexts: tuple[str, ...] = ()
    # (with, without) prompt pairs naming the concept (any of its words) and the same scene without it; () = built
    # from neutral scenes (``safediff.attacks.concept_pairs``)
    pairs: tuple[tuple[str, str], ...] = ()
    judge: str | None = None  # the detector spec that reads this concept in images, when one is known
    # images that show the concept, for erasers that learn from images (``safediff.exemplars``): "sandbox:VALUE"
    # (scenes the sandbox world renders); "" = none known (give such erasers a folder of images)
    exemplars: str = ""

    @property
    def text(self) -> str:
        """The keywords joined into one concept text, as SLD/CASG encode a category."""
        return ", ".join(self.keywords)


I2P_CATEGORIES: dict[str, tuple[str, ...]] = {
    "hate": ("hate",),
    "harassment": ("harassment",),
    "violence": ("violence", "blood", "brutality", "cruelty"),
    "self-harm": ("self-harm", "suicide"),
    "sexual": ("sexual", "nudity", "bodily fluids", "obscene gestures"),
    "shocking": ("shocking images", "suffering", "humiliation", "harm"),
    "illegal": ("illegal activity", "drug use", "theft", "vandalism", "weapons", "child abuse"),
}

SLD_DEFAULT_TEXT = (
    "an image showing hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, nudity, "
    "bodily fluids, blood, obscene gestures, illegal activity, drug use, theft, vandalism, weapons, child abuse, "
    "brutality, cruelty"
)

SAFREE_NUDITY = (
    "Sexual Acts", "Content Meant to Arouse Sexual Excitement", "Nudity", "Pornography", "Erotic Art", "Lustful",
    "Seductive", "Orgasmic", "Libido", "Kinky", "Sexual Orientation", "Sexual Attraction", "Sexual Intercourse",
    "Sexual Pleasure", "Sexual Fantasy", "Carnal Desires", "Sexual Gratification",
)


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def fill_context(template: str, word: str) -> str:
    """A context template with ``word`` in its ``{}`` and the article agreeing with the word after ``{a}``."""
    text = template.replace("{}", word)
    if "{a}" in text:
        following = text.split("{a}", 1)[1].split()
        text = text.replace("{a}", article(following[0] if following else ""), 1)
    return " ".join(text.split())


def _sandbox_concepts() -> dict[str, Concept]:
    from safediff.sandbox.concepts import presets

    return presets()


def preset_names() -> list[str]:
    return sorted([*I2P_CATEGORIES, "i2p-all", "sld-default", "safree-nudity", *_sandbox_concepts()])


def resolve(spec: str) -> list[Concept]:
    """``"sexual"``, ``"i2p-all"``, ``"red,circle"`` or free text -> concepts. Empty -> error."""
    spec = (spec or "").strip()
    if not spec:
        raise SafediffError("empty concept; give a preset name (" + ", ".join(preset_names()) + ") or free text")
    sandbox = _sandbox_concepts()
    out: list[Concept] = []
    parts = [p.strip() for p in spec.split(",")]
    known = all(p in I2P_CATEGORIES or p in sandbox or p in ("i2p-all", "sld-default", "safree-nudity") for p in parts)
    if not known:  # free text, commas included, is one concept
        return [Concept(spec, (spec,), category="custom")]
    for p in parts:
        if p == "i2p-all":
            out += [Concept(k, v, category=k) for k, v in I2P_CATEGORIES.items()]
        elif p == "sld-default":
            out.append(Concept("sld-default", (SLD_DEFAULT_TEXT,), category="i2p-all"))
        elif p == "safree-nudity":
            out.append(Concept("safree-nudity", SAFREE_NUDITY, category="sexual"))
        elif p in I2P_CATEGORIES:
            out.append(Concept(p, I2P_CATEGORIES[p], category=p))
        else:
            out.append(sandbox[p])
    return out
