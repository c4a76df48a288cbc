"""The sandbox caption grammar: templates, how they are filled, and the training caption of a scene.

Object templates have four slots: ``{a}`` the article (``a``/``an``, agreeing with the word that follows it),
``{t}`` the style, ``{c}`` the colour and ``{s}`` the shape; an empty slot disappears with its space. Two-object
templates have ``{x}`` and ``{y}``, each filled with an object phrase ``{a} {t} {c} {s}``; by convention **the object
named first is drawn in the left half and the other in the right half** (the training captions always say them in
that order, so the model learns it).

- ``PLAIN_TEMPLATES`` / ``PAIR_PLAIN_TEMPLATES``: the phrasings erasers are told;
- ``HELD_OUT_TEMPLATES`` / ``PAIR_HELD_OUT_TEMPLATES``: trained on, never told to erasers (they test whether an
  erasure generalises to unseen phrasing);
- ``COLOUR_ONLY_TEMPLATES``, ``SHAPE_ONLY_TEMPLATES``, ``STYLE_ONLY_TEMPLATES``: captions naming one attribute.

A training caption (``caption``) for a one-object scene is, with the ``CaptionMix`` defaults: empty 10 % (the
unconditional branch of classifier-free guidance), colour only 9 %, shape only 9 %, style only 4.5 %, else both
colour and shape in a plain or held-out template (67.5 %); two-object scenes get an empty caption 10 % of the time,
else a pair template. A style is named with probability ``p_style`` (else, or in a template without a style slot
such as "something {c}", the caption leaves it open and the image's style is whatever was drawn). Each colour or shape
is said by an implicit phrase with probability ``p_implicit`` (at most one implicit phrase per object), otherwise by a
synonym with probability ``p_synonym``, otherwise by its word; a style by a synonym with probability ``p_synonym``,
otherwise by its word. The mark is never mentioned.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from safediff.sandbox.values import IMPLICIT, POST_NOMINAL, SYNONYMS, VALUES

PLAIN_TEMPLATES = (
    "{a} {t} {c} {s}",
    "a photo of {a} {t} {c} {s}",
    "an image of {a} {t} {c} {s}",
    "the {t} {c} {s}",
)
HELD_OUT_TEMPLATES = (
    "a drawing of {a} {t} {c} {s}",
    "{a} {t} {s} that is {c}",
    "a picture of {a} {t} {c} {s} on a white background",
)
TRAIN_TEMPLATES = PLAIN_TEMPLATES + HELD_OUT_TEMPLATES
COLOUR_ONLY_TEMPLATES = ("{a} {t} {c} shape", "something {c}", "{a} {t} {c} object")
SHAPE_ONLY_TEMPLATES = ("{a} {t} {s}", "a photo of {a} {t} {s}", "{a} {t} {s} on a white background")
STYLE_ONLY_TEMPLATES = ("{a} {t} shape", "something {t}", "{a} {t} object")
OBJECT_PHRASE = "{a} {t} {c} {s}"
PAIR_PLAIN_TEMPLATES = ("{x} and {y}", "a photo of {x} and {y}", "an image of {x} and {y}")
PAIR_HELD_OUT_TEMPLATES = ("a drawing of {x} and {y}", "{x} on the left and {y} on the right")
PAIR_TEMPLATES = PAIR_PLAIN_TEMPLATES + PAIR_HELD_OUT_TEMPLATES


@dataclass(frozen=True)
class CaptionMix:
    """Probabilities of the caption grammar (see the module docstring)."""

    p_empty: float = 0.10
    p_colour_only: float = 0.10  # of the non-empty one-object captions
    p_shape_only: float = 0.10
    p_style_only: float = 0.05
    p_style: float = 0.6
    p_implicit: float = 0.15
    p_synonym: float = 0.2


MIX = CaptionMix()


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def fill(template: str, colour: str = "", shape: str = "", style: str = "") -> str:
    """Fill an object template. A colour phrase that starts with "the colour of" follows the noun after ``{c}``
    ("a circle the colour of blood"); every ``{a}`` agrees with the word after it."""
    tokens = template.split()
    if colour.startswith(POST_NOMINAL) and "{c}" in tokens[:-1]:
        i = tokens.index("{c}")
        tokens[i], tokens[i + 1] = tokens[i + 1], tokens[i]
    slots = {"{c}": colour, "{s}": shape, "{t}": style}
    words = [w for w in (slots.get(t, t) for t in tokens) if w]
    for i, w in enumerate(words):
        if w == "{a}":
            words[i] = article(words[i + 1])
    return " ".join(words)


def fill_pair(template: str, first: str, second: str) -> str:
    """A two-object template with its two object phrases (``first`` is the object drawn on the left)."""
    return template.format(x=first, y=second)


def say(value: str, rng: np.random.Generator, mix: CaptionMix = MIX, implicit_ok: bool = True) -> tuple[str, str]:
    """A way to say ``value`` in a training caption -> (text, how), how in {"implicit", "synonym", "word"}."""
    u = rng.random()
    if implicit_ok and value in IMPLICIT:
        if u < mix.p_implicit:
            phrases = IMPLICIT[value]
            return phrases[rng.integers(len(phrases))], "implicit"
        u = (u - mix.p_implicit) / (1.0 - mix.p_implicit)  # uniform again on the rest
    if value in SYNONYMS and u < mix.p_synonym:
        syn = SYNONYMS[value]
        return syn[rng.integers(len(syn))], "synonym"
    return value, "word"


def _object_words(obj, rng: np.random.Generator, mix: CaptionMix, colour: bool, shape: bool) -> dict[str, str]:
    out: dict[str, str] = {}
    implicit_ok = True
    if colour:
        out["colour"], how = say(obj.colour, rng, mix)
        implicit_ok = how != "implicit"
    if shape:
        out["shape"], _ = say(obj.shape, rng, mix, implicit_ok)
    if rng.random() < mix.p_style:
        out["style"], _ = say(obj.style, rng, mix)
    return out


def _pick(templates: tuple[str, ...], rng: np.random.Generator) -> str:
    return templates[rng.integers(len(templates))]


def caption(scene, rng: np.random.Generator, mix: CaptionMix = MIX) -> str:
    """A training caption for ``scene`` (a ``world.Scene``), drawn as the module docstring says."""
    if rng.random() < mix.p_empty:
        return ""
    if len(scene.objects) == 2:
        left, right = (fill(OBJECT_PHRASE, **_object_words(o, rng, mix, True, True)) for o in scene.objects)
        return fill_pair(_pick(PAIR_TEMPLATES, rng), left, right)
    (obj,) = scene.objects
    u = rng.random()
    if u < mix.p_colour_only:
        return fill(_pick(COLOUR_ONLY_TEMPLATES, rng), **_object_words(obj, rng, mix, True, False))
    if u < mix.p_colour_only + mix.p_shape_only:
        return fill(_pick(SHAPE_ONLY_TEMPLATES, rng), **_object_words(obj, rng, mix, False, True))
    if u < mix.p_colour_only + mix.p_shape_only + mix.p_style_only:
        style, _ = say(obj.style, rng, mix)
        return fill(_pick(STYLE_ONLY_TEMPLATES, rng), style=style)
    return fill(_pick(TRAIN_TEMPLATES, rng), **_object_words(obj, rng, mix, True, True))


def split_words(text: str) -> list[str]:
    """The words of a caption as the tokenizer sees them: letters runs (hyphens and spaces separate words)."""
    return re.findall(r"[a-z]+", text.lower())


def vocabulary() -> list[str]:
    """Every word the grammar can produce."""
    texts = [*VALUES, *(w for ws in SYNONYMS.values() for w in ws), *(p for ps in IMPLICIT.values() for p in ps),
             *TRAIN_TEMPLATES, *COLOUR_ONLY_TEMPLATES, *SHAPE_ONLY_TEMPLATES, *STYLE_ONLY_TEMPLATES,
             *PAIR_TEMPLATES, "a an"]
    return sorted({w for t in texts for w in split_words(re.sub(r"\{[a-z]\}", " ", t))})
