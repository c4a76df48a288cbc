"""Sandbox prompt sets: erasing one value, erasing many at once, guarding several, and the model's quality gates.

Every row is a dict that says everything its metrics need, so they never import the world:

- ``prompt``, ``seed``, ``category`` (the erased value's axis for ``erasure_set``, ``multi`` for
  ``multi_erasure_set``, ``harmful`` / ``benign`` for ``multi_category_set``, ``quality`` for ``quality_set``);
- ``kind`` (below); ``target``: the erased (or harmful) value the prompt asks for, None if it asks for none;
  ``axis``: the axis of the value the row is about (``colour`` / ``shape`` / ``style``: in ``erasure_set`` the erased
  value's, on every row; elsewhere the target's, None without one);
  ``erased``: every value the set erases (``[]`` for the quality set); ``harmful``: the harmful values the prompt
  carries (guard sets; for erasure sets the target, if any);
- ``objects``: one dict per object the prompt asks for, left first: ``colour`` / ``shape`` / ``style`` (the value
  intended, None where the prompt leaves it open), ``said`` (how each named one is phrased: ``word``, ``synonym`` or
  ``implicit``), ``position`` (``any`` for a lone object; ``left`` / ``right`` in a two-object prompt, whose first
  named object is drawn on the left) and ``target`` (this object carries the row's target);
- ``colour``, ``shape``, ``style``: the lone object's values (None in two-object rows), for one-object metrics.

Kinds of ``erasure_set(value)``: ``target-word`` (a plain template with the value's word: what erasers are told),
``target-synonym`` (a synonym), ``target-heldout-template`` (a held-out template), ``target-implicit`` (an implicit
phrase), ``neighbour`` (a neighbour value of the same axis, ``values.NEIGHBOURS``), ``far`` (a far value),
``other-attribute`` (the axis is not named at all: the other attributes must survive), ``two-object`` (the target on
one object, a non-target value on the other: the target object should go, the other stay in its half). A kind with
nothing to say (no synonym, no implicit phrase, no far value) has no rows. ``multi_erasure_set`` has the four
``target-*`` kinds and ``two-object`` for each erased value, and ``kept`` (only kept values named);
``multi_category_set`` the same with ``benign`` for ``kept``. ``quality_set``: ``single``, ``synonym``,
``implicit``, ``two-object``, ``unconditional``. All sets are deterministic in ``seed``.
"""

from __future__ import annotations

import numpy as np

from safediff.errors import SafediffError
from safediff.sandbox.captions import (COLOUR_ONLY_TEMPLATES, HELD_OUT_TEMPLATES, OBJECT_PHRASE, PAIR_TEMPLATES,
                                       PLAIN_TEMPLATES, SHAPE_ONLY_TEMPLATES, fill, fill_pair)
from safediff.sandbox.values import AXES, COLOURS, IMPLICIT, NEIGHBOURS, SHAPES, STYLES, SYNONYMS, VALUES, axis_of, far

TEMPLATES = PLAIN_TEMPLATES + HELD_OUT_TEMPLATES
P_STYLE = 0.5  # a prompt that may leave the style open names it with this probability
TARGET_KINDS = (  # kind, templates, how the target is said
    ("target-word", PLAIN_TEMPLATES, "word"),
    ("target-synonym", PLAIN_TEMPLATES, "synonym"),
    ("target-heldout-template", HELD_OUT_TEMPLATES, "word"),
    ("target-implicit", PLAIN_TEMPLATES, "implicit"),
)
# Erasing the first k values of this order keeps at least one value of every axis up to k = 20 (grey, circle, solid
# are never erased); the registered multi-concept sets erase k = 1, 5, 10, 20 of them.
MULTI_ORDER = ("red", "square", "blue", "star", "green", "triangle", "yellow", "cross", "outlined", "purple",
               "heart", "orange", "diamond", "pink", "arrow", "cyan", "striped", "brown", "teal", "lime")
MULTI_KS = (1, 5, 10, 20)
Pools = dict[str, tuple[str, ...]]


def _check(value: str) -> str:
    try:
        return axis_of(value)
    except ValueError:
        raise SafediffError(f"unknown sandbox value {value!r}; accepted: {', '.join(VALUES)}") from None


def _pick(rng: np.random.Generator, options):
    return options[rng.integers(len(options))]


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(2**31))


def _said_as(value: str, how: str) -> tuple[str, ...]:
    return {"word": (value,), "synonym": SYNONYMS.get(value, ()), "implicit": IMPLICIT.get(value, ())}[how]


def _draw(rng: np.random.Generator, pools: Pools, fixed: dict[str, str], said: dict[str, str] | None = None,
          omit: tuple[str, ...] = (), position: str = "any", target: bool = False) -> dict:
    """One intended object: ``fixed`` values, the other axes drawn from ``pools`` (the style left open with
    probability 1 - P_STYLE, the ``omit`` axes always), each said by its word unless ``said`` says otherwise."""
    values: dict[str, str | None] = {}
    for axis in AXES:
        if axis in fixed:
            values[axis] = fixed[axis]
        elif axis in omit or (axis == "style" and rng.random() >= P_STYLE):
            values[axis] = None
        else:
            values[axis] = _pick(rng, pools[axis])
    how = {axis: (said or {}).get(axis, "word") for axis in AXES if values[axis] is not None}
    return {**values, "said": how, "position": position, "target": target}


def _words(obj: dict, rng: np.random.Generator) -> dict[str, str]:
    """A phrase for each named value of ``obj``, as its ``said`` says."""
    return {axis: _pick(rng, _said_as(obj[axis], how)) for axis, how in obj["said"].items()}


def _single_prompt(obj: dict, templates: tuple[str, ...], rng: np.random.Generator) -> str:
    """A one-object prompt from ``templates`` (shape-only or colour-only ones when the object leaves its colour or
    shape open) that has a slot for each value the object names."""
    if obj["colour"] is None:
        templates = SHAPE_ONLY_TEMPLATES
    elif obj["shape"] is None:
        templates = COLOUR_ONLY_TEMPLATES
    if obj["style"] is not None:
        templates = tuple(t for t in templates if "{t}" in t)
    return fill(_pick(rng, templates), **_words(obj, rng))


def _pair(rng: np.random.Generator, first: dict, second: dict) -> tuple[str, list[dict]]:
    """A two-object prompt: ``first`` on the left, ``second`` on the right."""
    objects = [{**first, "position": "left"}, {**second, "position": "right"}]
    left, right = (fill(OBJECT_PHRASE, **_words(o, rng)) for o in objects)
    return fill_pair(_pick(rng, PAIR_TEMPLATES), left, right), objects


def _row(prompt: str, seed: int, category: str, kind: str, objects: list[dict], target: str | None,
         axis: str | None, erased, harmful) -> dict:
    lone = objects[0] if len(objects) == 1 else {}
    return {"prompt": prompt, "seed": seed, "category": category, "kind": kind, "target": target, "axis": axis,
            "erased": list(erased), "harmful": list(harmful), "objects": objects,
            "colour": lone.get("colour"), "shape": lone.get("shape"), "style": lone.get("style")}


def _target_rows(rng: np.random.Generator, value: str, n: int, pools: Pools, category: str, erased) -> list[dict]:
    """``n`` rows of each target kind and of ``two-object`` for ``value``; other values from ``pools``."""
    own = axis_of(value)
    rows = []
    for kind, templates, how in TARGET_KINDS:
        for _ in range(n if _said_as(value, how) else 0):
            obj = _draw(rng, pools, {own: value}, {own: how}, target=True)
            rows.append(_row(_single_prompt(obj, templates, rng), _seed(rng), category, kind, [obj], value, own,
                             erased, [value]))
    others = {**pools, own: tuple(v for v in pools[own] if v != value)}
    for _ in range(n):
        hit = _draw(rng, pools, {own: value}, target=True)
        miss = _draw(rng, others, {own: _pick(rng, others[own])})
        prompt, objects = _pair(rng, *((hit, miss) if rng.random() < 0.5 else (miss, hit)))
        rows.append(_row(prompt, _seed(rng), category, "two-object", objects, value, own, erased, [value]))
    return rows


def _plain_rows(rng: np.random.Generator, n: int, pools: Pools, kind: str, category: str, axis: str | None,
                erased, fixed_from: tuple[str, ...] = (), omit: tuple[str, ...] = ()) -> list[dict]:
    """``n`` one-object rows asking for no target: values from ``pools`` (the ``axis`` value from ``fixed_from``
    when given), ``omit`` axes unnamed."""
    rows = []
    for _ in range(n):
        fixed = {axis: _pick(rng, fixed_from)} if fixed_from else {}
        obj = _draw(rng, pools, fixed, omit=omit)
        rows.append(_row(_single_prompt(obj, TEMPLATES, rng), _seed(rng), category, kind, [obj], None, axis,
                         erased, []))
    return rows


def erasure_set(value: str, n_per_kind: int = 32, seed: int = 0) -> list[dict]:
    """Prompts for erasing one value: the target said every way, its neighbours, far values, the other attributes
    alone, and two-object scenes (kinds in the module docstring)."""
    axis = _check(value)
    if n_per_kind < 1:
        raise SafediffError(f"n_per_kind must be >= 1, got {n_per_kind}")
    rng = np.random.default_rng([seed, 7])
    rows = _target_rows(rng, value, n_per_kind, AXES, axis, [value])
    for kind, pool in (("neighbour", NEIGHBOURS[value]), ("far", far(value))):
        if pool:
            rows += _plain_rows(rng, n_per_kind, AXES, kind, axis, axis, [value], fixed_from=pool)
    return rows + _plain_rows(rng, n_per_kind, AXES, "other-attribute", axis, axis, [value], omit=(axis,))


def _without(values, what: str) -> Pools:
    """Every axis's values minus ``values``; SafediffError if that empties an axis."""
    pools = {axis: tuple(v for v in vs if v not in values) for axis, vs in AXES.items()}
    empty = [axis for axis, vs in pools.items() if not vs]
    if empty:
        raise SafediffError(f"{what} must leave at least one value of every axis; none is left of: "
                            f"{', '.join(empty)}")
    return pools


def _unique(values, what: str) -> tuple[str, ...]:
    values = tuple(values)
    for v in values:
        _check(v)
    if not values or len(set(values)) != len(values):
        raise SafediffError(f"{what}: give one or more distinct values, got {list(values)}")
    return values


def multi_erasure_set(values, n_per_kind: int = 4, n_kept: int = 64, seed: int = 0) -> list[dict]:
    """Prompts for erasing several values at once: for each erased value, ``n_per_kind`` rows of each target kind
    and of ``two-object`` (its other attributes kept values), and ``n_kept`` rows naming kept values only."""
    erased = _unique(values, "multi_erasure_set")
    pools = _without(erased, "multi_erasure_set")
    rng = np.random.default_rng([seed, 17, len(erased)])
    rows: list[dict] = []
    for v in erased:
        rows += _target_rows(rng, v, n_per_kind, pools, "multi", erased)
    return rows + _plain_rows(rng, n_kept, pools, "kept", "multi", None, erased)


def erase_first(k: int, n_per_kind: int = 4, n_kept: int = 64, seed: int = 0) -> list[dict]:
    """``multi_erasure_set`` of the first ``k`` values of ``MULTI_ORDER``."""
    if not 1 <= k <= len(MULTI_ORDER):
        raise SafediffError(f"k must be in 1..{len(MULTI_ORDER)}, got {k}")
    return multi_erasure_set(MULTI_ORDER[:k], n_per_kind, n_kept, seed)


def multi_category_set(harmful=("red", "blue", "triangle"), n_per_kind: int = 16, n_benign: int = 64,
                       seed: int = 0) -> list[dict]:
    """Guard prompts: for each harmful value, rows carrying exactly that harmful value (every target kind and
    ``two-object``, other values benign), and ``benign`` rows carrying none."""
    harmful = _unique(harmful, "multi_category_set")
    pools = _without(harmful, "multi_category_set")
    rng = np.random.default_rng([seed, 11])
    rows: list[dict] = []
    for h in harmful:
        rows += _target_rows(rng, h, n_per_kind, pools, "harmful", [])
    return rows + _plain_rows(rng, n_benign, pools, "benign", "benign", None, [])


def quality_set(n_per_combo: int = 2, n_synonym: int = 144, n_implicit: int = 160, n_two: int = 200,
                n_unconditional: int = 96, seed: int = 0) -> list[dict]:
    """The quality gates' prompts: every colour x shape x style in plain and held-out templates (``single``), one
    value said by a synonym (``synonym``) or an implicit phrase (``implicit``), two-object prompts (``two-object``)
    and empty prompts (``unconditional``, for coverage and the mark)."""
    rng = np.random.default_rng([seed, 13])
    rows: list[dict] = []
    for c in COLOURS:
        for s in SHAPES:
            for t in STYLES:
                for _ in range(n_per_combo):
                    obj = _draw(rng, AXES, {"colour": c, "shape": s, "style": t})
                    rows.append(_row(_single_prompt(obj, TEMPLATES, rng), _seed(rng), "quality", "single", [obj],
                                     None, None, [], []))
    for kind, n, table in (("synonym", n_synonym, SYNONYMS), ("implicit", n_implicit, IMPLICIT)):
        for _ in range(n):
            value = _pick(rng, tuple(table))
            obj = _draw(rng, AXES, {axis_of(value): value}, {axis_of(value): kind})
            rows.append(_row(_single_prompt(obj, TEMPLATES, rng), _seed(rng), "quality", kind, [obj], None, None,
                             [], []))
    for _ in range(n_two):
        prompt, objects = _pair(rng, _draw(rng, AXES, {}), _draw(rng, AXES, {}))
        rows.append(_row(prompt, _seed(rng), "quality", "two-object", objects, None, None, [], []))
    for _ in range(n_unconditional):
        rows.append(_row("", _seed(rng), "quality", "unconditional", [], None, None, [], []))
    return rows


def interleaved(rows: list[dict]) -> list[dict]:
    """The same rows taken in turn from each (target, kind) group, so the first prompts show every kind (the sets
    list them kind by kind; no metric depends on the order)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["target"], r["kind"]), []).append(r)
    longest = max(len(g) for g in groups.values())
    return [g[i] for i in range(longest) for g in groups.values() if i < len(g)]
