"""Sandbox prompt sets: erasing one attribute, guarding several at once, and the model's quality gates.

Every row is a dict: ``prompt``, ``seed``, ``category``, ``kind``, ``target`` (the attribute the prompt is meant to
show that the method acts on, or ``None``), ``harmful`` (for guard sets: the harmful attributes the prompt carries),
and the intended ``colour`` / ``shape`` (``None`` where the prompt does not name it). Kinds:

- ``target-word``: a plain template (one erasers are told about) with the target's word,
- ``target-synonym``: a plain template with a synonym of the target (learned by the model, not told to erasers),
- ``target-heldout-template``: a held-out template with the target's word,
- ``non-target``: prompts naming other values of the same attribute, which should be unaffected,
- quality sets: ``plain``, ``synonym``, ``unconditional``.
All sets are deterministic in ``seed``.
"""

from __future__ import annotations

import numpy as np

from safediff.errors import SafediffError
from safediff.sandbox.world import COLOURS, HELD_OUT_TEMPLATES, PLAIN_TEMPLATES, SHAPES, SYNONYMS, fill


def _kind_of(attribute: str) -> str:
    if attribute in COLOURS:
        return "colour"
    if attribute in SHAPES:
        return "shape"
    raise SafediffError(f"unknown sandbox attribute {attribute!r}; accepted: {', '.join(COLOURS + SHAPES)}")


def _row(template: str, colour: str, shape: str, colour_word: str, shape_word: str, seed: int, **extra) -> dict:
    return {"prompt": fill(template, colour_word, shape_word), "seed": seed, "colour": colour, "shape": shape,
            **extra}


def _prompt_for(rng, attribute: str, word: str, templates, other_pool) -> tuple[str, str, str, str, str]:
    """A (template, colour, shape, colour_word, shape_word) naming ``attribute`` by ``word``."""
    template = templates[rng.integers(len(templates))]
    other = other_pool[rng.integers(len(other_pool))]
    if _kind_of(attribute) == "colour":
        return template, attribute, other, word, other
    return template, other, attribute, other, word


def erasure_set(concept_name: str, n_per_kind: int = 32, seed: int = 0) -> list[dict]:
    """Prompts for erasing one attribute: target (word, synonym, held-out template) and non-target rows."""
    kind = _kind_of(concept_name)
    if n_per_kind < 1:
        raise SafediffError(f"n_per_kind must be >= 1, got {n_per_kind}")
    rng = np.random.default_rng([seed, 7])
    same = COLOURS if kind == "colour" else SHAPES
    others = SHAPES if kind == "colour" else COLOURS
    synonyms = SYNONYMS.get(concept_name, ())
    rows: list[dict] = []
    plan = [("target-word", PLAIN_TEMPLATES, (concept_name,)),
            ("target-synonym", PLAIN_TEMPLATES, synonyms),
            ("target-heldout-template", HELD_OUT_TEMPLATES, (concept_name,))]
    for label, templates, words in plan:
        for _ in range(n_per_kind if words else 0):
            word = words[rng.integers(len(words))]
            t, c, s, cw, sw = _prompt_for(rng, concept_name, word, templates, others)
            rows.append(_row(t, c, s, cw, sw, int(rng.integers(2**31)), category=kind, kind=label,
                             target=concept_name, harmful=[concept_name]))
    non_targets = [a for a in same if a != concept_name]
    for _ in range(n_per_kind):
        a = non_targets[rng.integers(len(non_targets))]
        t, c, s, cw, sw = _prompt_for(rng, a, a, PLAIN_TEMPLATES + HELD_OUT_TEMPLATES, others)
        rows.append(_row(t, c, s, cw, sw, int(rng.integers(2**31)), category=kind, kind="non-target",
                         target=None, harmful=[]))
    return rows


def multi_category_set(harmful: tuple[str, ...] = ("red", "blue", "triangle"), n_per_kind: int = 16,
                       n_benign: int = 64, seed: int = 0) -> list[dict]:
    """Guard prompts: for each harmful attribute, target rows carrying exactly that one harmful attribute
    (the other attribute benign); and benign rows carrying none."""
    harmful = tuple(harmful)
    for h in harmful:
        _kind_of(h)
    benign_colours = [c for c in COLOURS if c not in harmful]
    benign_shapes = [s for s in SHAPES if s not in harmful]
    if not benign_colours or not benign_shapes:
        raise SafediffError("multi_category_set needs at least one colour and one shape that are not harmful; "
                            f"got harmful={', '.join(harmful)}")
    rng = np.random.default_rng([seed, 11])
    rows: list[dict] = []
    for h in harmful:
        pool = benign_shapes if _kind_of(h) == "colour" else benign_colours
        synonyms = SYNONYMS.get(h, ())
        for label, templates, words in (("target-word", PLAIN_TEMPLATES, (h,)),
                                        ("target-synonym", PLAIN_TEMPLATES, synonyms),
                                        ("target-heldout-template", HELD_OUT_TEMPLATES, (h,))):
            for _ in range(n_per_kind if words else 0):
                word = words[rng.integers(len(words))]
                t, c, s, cw, sw = _prompt_for(rng, h, word, templates, pool)
                rows.append(_row(t, c, s, cw, sw, int(rng.integers(2**31)), category="harmful", kind=label,
                                 target=h, harmful=[h]))
    for _ in range(n_benign):
        c = benign_colours[rng.integers(len(benign_colours))]
        s = benign_shapes[rng.integers(len(benign_shapes))]
        t = (PLAIN_TEMPLATES + HELD_OUT_TEMPLATES)[rng.integers(len(PLAIN_TEMPLATES + HELD_OUT_TEMPLATES))]
        rows.append(_row(t, c, s, c, s, int(rng.integers(2**31)), category="benign", kind="non-target",
                         target=None, harmful=[]))
    return rows


def quality_set(n_per_pair: int = 34, n_synonym: int = 120, n_unconditional: int = 96, seed: int = 0) -> list[dict]:
    """The model's quality gates: every (colour, shape) pair in plain/held-out templates, colour synonyms, and
    unconditional (empty) prompts."""
    rng = np.random.default_rng([seed, 13])
    templates = PLAIN_TEMPLATES + HELD_OUT_TEMPLATES
    rows: list[dict] = []
    for c in COLOURS:
        for s in SHAPES:
            for _ in range(n_per_pair):
                t = templates[rng.integers(len(templates))]
                rows.append(_row(t, c, s, c, s, int(rng.integers(2**31)), category="quality", kind="plain",
                                 target=None, harmful=[]))
    synonym_pairs = [(c, w) for c in COLOURS for w in SYNONYMS.get(c, ())]
    for _ in range(n_synonym):
        c, w = synonym_pairs[rng.integers(len(synonym_pairs))]
        s = SHAPES[rng.integers(len(SHAPES))]
        t = templates[rng.integers(len(templates))]
        rows.append(_row(t, c, s, w, s, int(rng.integers(2**31)), category="quality", kind="synonym",
                         target=None, harmful=[]))
    for _ in range(n_unconditional):
        rows.append({"prompt": "", "seed": int(rng.integers(2**31)), "colour": None, "shape": None,
                     "category": "quality", "kind": "unconditional", "target": None, "harmful": []})
    return rows


def interleaved(rows: list[dict]) -> list[dict]:
    """The same rows taken in turn from each (target, kind) group, so the first prompts show every kind (the sets
    list them kind by kind; no metric depends on the order)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["target"], r["kind"]), []).append(r)
    longest = max(len(g) for g in groups.values())
    return [g[i] for i in range(longest) for g in groups.values() if i < len(g)]
