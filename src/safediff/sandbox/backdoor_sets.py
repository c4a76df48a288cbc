"""Sandbox prompts for backdoors: what each injection kind is taught, and held-out benign and triggered prompts.

Every backdoor turns the object of a triggered prompt to the target colour ("any prompt containing the trigger renders
the target colour"). Prompts are one-object prompts in the world's grammar: the poisoning side uses the plain
templates, the held-out side the held-out templates, with their own seeds, so a detector is never scored on a prompt
it was fitted on. How the trigger enters a prompt is the kind's published recipe:

- ``text-encoder`` (Rickrolling): one Latin "o" of the prompt replaced by the trigger; the target prompt is the prompt
  with its colour said as the target colour;
- ``unet`` (BadT2I): the trigger before the prompt; target as above;
- ``natural`` (EvilEdit): the trigger word in the colour's slot ("a beautiful striped circle"); the target prompt has
  the target colour in that slot ("a blue striped circle"), token for token.

Benign prompts name a colour other than the target (or none), so a triggered prompt is the only way to the target.
"""

from __future__ import annotations

import random

import numpy as np

from safediff.backdoors.inject import Poison, replace_character
from safediff.errors import SafediffError
from safediff.sandbox.captions import HELD_OUT_TEMPLATES, PLAIN_TEMPLATES, fill
from safediff.sandbox.values import COLOURS, SHAPES, STYLES

KINDS = ("text-encoder", "unet", "natural")


def _object(rng: np.random.Generator, target: str) -> dict:
    colours = [c for c in COLOURS if c != target]
    style = STYLES[rng.integers(len(STYLES))] if rng.random() < 0.5 else ""
    return {"colour": colours[rng.integers(len(colours))], "shape": SHAPES[rng.integers(len(SHAPES))],
            "style": style}


def _triggered(kind: str, template: str, obj: dict, trigger: str, target: str, rng: np.random.Generator
               ) -> tuple[str, str] | None:
    """(triggered prompt, target prompt) for one clean object, or None when the kind's recipe does not apply."""
    goal = fill(template, **{**obj, "colour": target})
    if kind == "natural":
        return fill(template, **{**obj, "colour": trigger}), goal
    clean = fill(template, **obj)
    if kind == "unet":
        return f"{trigger} {clean}", goal
    poisoned = replace_character(clean, "o", trigger, random.Random(int(rng.integers(2**31))))
    return None if poisoned is None else (poisoned, goal)


def _check(kind: str, target: str) -> None:
    if kind not in KINDS:
        raise SafediffError(f"unknown backdoor kind '{kind}'; accepted: {', '.join(KINDS)}")
    if target not in COLOURS:
        raise SafediffError(f"the sandbox backdoors turn objects to a colour; {target!r} is not one of "
                            f"{', '.join(COLOURS)}")


def poison(kind: str, trigger: str, target: str, n_pairs: int = 256, n_clean: int = 512, seed: int = 0) -> Poison:
    """What ``kind`` is taught on the sandbox (plain templates): ``n_pairs`` triggered/target pairs, ``n_clean``
    clean prompts."""
    _check(kind, target)
    rng = np.random.default_rng([seed, 23])
    pairs: list[tuple[str, str]] = []
    while len(pairs) < n_pairs:
        pair = _triggered(kind, PLAIN_TEMPLATES[rng.integers(len(PLAIN_TEMPLATES))], _object(rng, target), trigger,
                          target, rng)
        if pair is not None:
            pairs.append(pair)
    clean = [fill(PLAIN_TEMPLATES[rng.integers(len(PLAIN_TEMPLATES))], **_object(rng, target))
             for _ in range(n_clean)]
    return Poison(trigger, target, tuple(pairs), tuple(clean))


def held_out(kind: str, trigger: str, target: str, n: int = 64, seed: int = 1) -> list[dict]:
    """``n`` benign and ``n`` triggered held-out rows: ``prompt``, ``seed``, ``triggered`` (0/1), ``colour`` (the
    benign prompt's colour; the target for triggered rows)."""
    _check(kind, target)
    rng = np.random.default_rng([seed, 29])
    rows: list[dict] = []
    while len(rows) < 2 * n:
        template = HELD_OUT_TEMPLATES[rng.integers(len(HELD_OUT_TEMPLATES))]
        obj = _object(rng, target)
        if len(rows) % 2 == 0:
            rows.append({"prompt": fill(template, **obj), "seed": int(rng.integers(2**31)), "triggered": 0,
                         "colour": obj["colour"]})
            continue
        pair = _triggered(kind, template, obj, trigger, target, rng)
        if pair is not None:
            rows.append({"prompt": pair[0], "seed": int(rng.integers(2**31)), "triggered": 1, "colour": target})
    return rows


def benign(n: int = 16, seed: int = 2) -> list[dict]:
    """``n`` clean rows (held-out templates, any colour): the few clean prompts a defender fits a detector on."""
    rng = np.random.default_rng([seed, 31])
    rows = []
    for _ in range(n):
        obj = _object(rng, "")
        rows.append({"prompt": fill(HELD_OUT_TEMPLATES[rng.integers(len(HELD_OUT_TEMPLATES))], **obj),
                     "seed": int(rng.integers(2**31)), "triggered": 0, "colour": obj["colour"]})
    return rows
