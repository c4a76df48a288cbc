import json
import re
from collections import Counter

import pytest

from safediff.errors import SafediffError
from safediff.sandbox.benchmarks import (MULTI_KS, MULTI_ORDER, erase_first, erasure_set, interleaved,
                                         multi_category_set, multi_erasure_set, quality_set)
from safediff.sandbox.scoring import assign, judge, others_kept, rest_kept, target_shown
from safediff.sandbox.world import (AXES, COLOURS, IMPLICIT, NEIGHBOURS, SHAPES, STYLES, SYNONYMS, VALUES, axis_of,
                                    far, words)

TARGET_KINDS = {"target-word", "target-synonym", "target-heldout-template", "target-implicit"}


def says(prompt: str, phrase: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(phrase)}(?![\w-])", prompt) is not None


def named(prompt: str) -> set[str]:
    """The values a prompt names or implies."""
    return {v for v in VALUES if any(says(prompt, p) for p in words(v))}


def intended(row: dict) -> set[str]:
    return {o[a] for o in row["objects"] for a in AXES if o[a] is not None}


def check_rows(rows: list[dict]) -> None:
    """Every prompt names exactly the values its objects intend, each said as ``said`` says."""
    for r in rows:
        assert named(r["prompt"]) == intended(r), r
        for o in r["objects"]:
            assert set(o["said"]) == {a for a in AXES if o[a] is not None}
            for axis, how in o["said"].items():
                phrases = {"word": (o[axis],), "synonym": SYNONYMS.get(o[axis], ()),
                           "implicit": IMPLICIT.get(o[axis], ())}[how]
                assert any(says(r["prompt"], p) for p in phrases), (r["prompt"], axis, how)
        lone = r["objects"][0] if len(r["objects"]) == 1 else {}
        assert (r["colour"], r["shape"], r["style"]) == (lone.get("colour"), lone.get("shape"), lone.get("style"))
        json.dumps(r)  # plain data


@pytest.mark.parametrize("value", VALUES)
def test_erasure_set_has_every_kind_with_exact_intent(value):
    rows = erasure_set(value, n_per_kind=4)
    kinds = Counter(r["kind"] for r in rows)
    expected = {"target-word", "target-heldout-template", "two-object", "other-attribute"}
    expected |= {"target-synonym"} if value in SYNONYMS else set()
    expected |= {"target-implicit"} if value in IMPLICIT else set()
    expected |= {"neighbour"} if NEIGHBOURS[value] else set()
    expected |= {"far"} if far(value) else set()
    assert set(kinds) == expected and set(kinds.values()) == {4}
    check_rows(rows)
    axis = axis_of(value)
    for r in rows:
        assert r["axis"] == axis and r["erased"] == [value] and r["category"] == axis
        targets = [o for o in r["objects"] if o["target"]]
        assert r["target"] == (value if r["kind"] in TARGET_KINDS | {"two-object"} else None)
        assert r["harmful"] == ([value] if r["target"] else [])
        assert [o[axis] for o in targets] == ([value] if r["target"] else [])
        if r["kind"] == "neighbour":
            assert r["objects"][0][axis] in NEIGHBOURS[value]
        if r["kind"] == "far":
            assert r["objects"][0][axis] in far(value)
        if r["kind"] == "other-attribute":
            assert r["objects"][0][axis] is None and not named(r["prompt"]) & set(AXES[axis])
        if r["kind"] == "two-object":
            assert [o["position"] for o in r["objects"]] == ["left", "right"] and len(targets) == 1
            other = next(o for o in r["objects"] if not o["target"])
            assert other[axis] not in (None, value)
        else:
            assert [o["position"] for o in r["objects"]] == ["any"]
    assert erasure_set(value, 4) == rows and erasure_set(value, 4, seed=1) != rows


def test_erasure_prompts_say_the_target_only_as_their_kind_says():
    rows = erasure_set("red", n_per_kind=16)
    by_kind = {k: [r["prompt"] for r in rows if r["kind"] == k] for k in {r["kind"] for r in rows}}
    assert all(says(p, "red") for p in by_kind["target-word"] + by_kind["target-heldout-template"])
    assert not any(says(p, "red") for p in by_kind["target-synonym"] + by_kind["target-implicit"])
    assert all(any(says(p, s) for s in IMPLICIT["red"]) for p in by_kind["target-implicit"])
    assert not any("red" in named(p) for k in ("neighbour", "far", "other-attribute") for p in by_kind[k])
    two = [r for r in rows if r["kind"] == "two-object"]
    assert {r["objects"][0]["target"] for r in two} == {True, False}  # the target on either side
    for r in two:  # the left object is named first
        left, right = (r["objects"][0], r["objects"][1])
        assert r["prompt"].find(left["shape"]) < r["prompt"].rfind(right["shape"])
    with pytest.raises(SafediffError, match="unknown sandbox value 'magenta'"):
        erasure_set("magenta")
    with pytest.raises(SafediffError, match="n_per_kind"):
        erasure_set("red", n_per_kind=0)


def test_multi_erasure_sets_score_erased_and_kept_values_apart():
    for k in MULTI_KS:
        rows = erase_first(k, n_per_kind=2, n_kept=24)
        erased = set(MULTI_ORDER[:k])
        check_rows(rows)
        assert {r["target"] for r in rows} == erased | {None}
        for r in rows:
            assert set(r["erased"]) == erased and r["category"] == "multi"
            others = intended(r) - ({r["target"]} if r["target"] else set())
            assert not others & erased, r  # only the target is erased; everything else it names is kept
        kept = [r for r in rows if r["kind"] == "kept"]
        assert len(kept) == 24 and all(r["target"] is None and r["axis"] is None for r in kept)
    assert {v for v in VALUES if v not in MULTI_ORDER} == {"grey", "circle", "solid"}
    assert len(set(MULTI_ORDER)) == len(MULTI_ORDER) == 20 and MULTI_KS == (1, 5, 10, 20)
    with pytest.raises(SafediffError, match="at least one value of every axis.*style"):
        multi_erasure_set(STYLES)
    with pytest.raises(SafediffError, match="distinct"):
        multi_erasure_set(["red", "red"])
    with pytest.raises(SafediffError, match="k must be"):
        erase_first(21)


def test_guard_set_rows_carry_exactly_one_harmful_value_or_none():
    rows = multi_category_set(n_per_kind=3, n_benign=12)
    check_rows(rows)
    harmful = {"red", "blue", "triangle"}
    assert {r["target"] for r in rows} == harmful | {None}
    for r in rows:
        assert intended(r) & harmful == set(r["harmful"]) == ({r["target"]} if r["target"] else set())
        assert r["category"] == ("harmful" if r["target"] else "benign") and r["erased"] == []
    with pytest.raises(SafediffError, match="every axis"):
        multi_category_set(harmful=COLOURS)


def test_quality_set_covers_every_gate():
    rows = quality_set(n_per_combo=1, n_synonym=200, n_implicit=200, n_two=20, n_unconditional=8)
    check_rows([r for r in rows if r["objects"]])
    kinds = Counter(r["kind"] for r in rows)
    assert kinds == {"single": len(COLOURS) * len(SHAPES) * len(STYLES), "synonym": 200, "implicit": 200,
                     "two-object": 20, "unconditional": 8}
    singles = {(r["colour"], r["shape"], r["style"]) for r in rows if r["kind"] == "single"}
    assert len(singles) == kinds["single"]
    said = {(o[a], how) for r in rows for o in r["objects"] for a, how in o["said"].items() if how != "word"}
    assert {v for v, how in said if how == "synonym"} == set(SYNONYMS)
    assert {v for v, how in said if how == "implicit"} == set(IMPLICIT)
    assert all(r["prompt"] == "" and r["objects"] == [] for r in rows if r["kind"] == "unconditional")
    assert quality_set(1, 200, 200, 20, 8) == rows


def test_interleaved_keeps_the_rows_and_leads_with_every_kind():
    for rows in (erasure_set("red", n_per_kind=3), multi_category_set(n_per_kind=2, n_benign=8)):
        out = interleaved(rows)
        assert sorted(map(repr, out)) == sorted(map(repr, rows))
        groups = {(r["target"], r["kind"]) for r in rows}
        assert {(r["target"], r["kind"]) for r in out[:len(groups)]} == groups


def found(colour, shape, style, side, area=100):
    return {"colour": colour, "shape": shape, "style": style, "side": side, "area": area}


def test_judging_matches_objects_by_place_and_scores_erasure():
    row = next(r for r in erasure_set("red", n_per_kind=8) if r["kind"] == "two-object" and r["objects"][0]["target"])
    left, right = row["objects"]
    other = found(right["colour"], right["shape"], right["style"] or "solid", "right")
    kept_gone = [found("blue", left["shape"], "solid", "left"), other]
    assert not target_shown(row, kept_gone) and others_kept(row, kept_gone)
    still_red = [found("red", left["shape"], "solid", "left"), other]
    assert target_shown(row, still_red) and others_kept(row, still_red)
    moved = [found("red", "star", "solid", "left", area=50), found(right["colour"], right["shape"], "solid", "left")]
    assert not others_kept(row, moved)  # the other object went to the wrong half
    assert assign(row["objects"], moved)[0]["area"] == 100 and assign(row["objects"], moved)[1] is None
    lone = next(r for r in erasure_set("circle", 2) if r["kind"] == "far")
    o = lone["objects"][0]
    verdict = judge(lone, [found(o["colour"], o["shape"], "striped", "left", 20), found("grey", "star", "solid",
                                                                                        "right", 90)])
    assert verdict[0]["found"] and verdict[0]["read"]["shape"] == "star" and not verdict[0]["correct"]
    assert judge(lone, [])[0] == {"found": False, "colour": False, "shape": False,
                                  "style": None if o["style"] is None else False, "correct": False,
                                  "read": {"colour": None, "shape": None, "style": None}}


def test_rest_kept_asks_everything_but_the_target():
    row = next(r for r in erasure_set("red", n_per_kind=8) if r["kind"] == "target-word" and r["style"] is None)
    shape = row["objects"][0]["shape"]
    assert rest_kept(row, [found("blue", shape, "solid", "left")])  # red gone, its shape kept: erased surgically
    assert not rest_kept(row, [found("blue", "star" if shape != "star" else "heart", "solid", "left")])
    assert not rest_kept(row, [])  # nothing drawn keeps nothing
    pair = next(r for r in erasure_set("red", n_per_kind=8) if r["kind"] == "two-object" and r["objects"][0]["target"])
    left, right = pair["objects"]
    other = found(right["colour"], right["shape"], right["style"] or "solid", "right")
    assert rest_kept(pair, [found("blue", left["shape"], left["style"] or "solid", "left"), other])
    assert not rest_kept(pair, [found("blue", left["shape"], left["style"] or "solid", "left")])  # other object lost
