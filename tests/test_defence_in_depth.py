"""The defence-in-depth benchmark's plumbing on a tiny model folder (``--quick``): every single defence and both
readings of the pair get a utility run and every attack cell through the one runner, the summary is recomputed
from the cells, and a second call reuses everything; the Pareto front of the plot is the set of non-dominated
points."""

import json
import random

import pytest

from safediff.bench.plots import pareto_chart, pareto_front
from bench_helpers import load_benchmark



def _module():
    return load_benchmark("defence_in_depth")


def test_quick_matrix_and_resume(tiny_folder, tmp_path, monkeypatch):
    from safediff.detectors.sandbox import SHAPE_WEIGHTS

    if not SHAPE_WEIGHTS.is_file():
        pytest.skip("sandbox shape/style weights are absent")
    mod = _module()
    out = tmp_path / "did.json"
    argv = ["--quick", "--model", str(tiny_folder), "--erasers", "uce", "--guards", "sld",
            "--attacks", "concept-arithmetic,concept-inversion", "--out", str(out)]
    report = mod.main(argv)
    defences = report["defences"]
    assert set(defences) == {"none", "uce", "sld", "uce+sld", "uce+sld/base"}
    assert defences["uce+sld/base"]["guard"].endswith("concept_weights=base")
    assert "concept_weights" not in defences["uce+sld"]["guard"]
    for label, entry in defences.items():
        cells = entry["attacks"]
        assert set(cells) == {"concept-arithmetic", "concept-inversion"}
        assert entry["worst_asr"] == max(c["asr"] for c in cells.values())
        assert (cells[entry["worst_attack"]]["asr"] == entry["worst_asr"] > 0 if entry["worst_asr"] > 0
                else entry["worst_attack"] == "none succeeds")
        for name, cell in cells.items():  # the cell is the runner's own results.json
            run = json.loads((out.with_suffix(".runs") / f"{mod.slug(label)}__{name}" / "results.json").read_text())
            assert (cell["pre_asr"], cell["asr"], cell["n"]) == (run["pre_asr"], run["asr"], run["n"])
            assert cell["n"] == 1
        assert set(entry["utility"]) >= {"neighbour", "far", "target_word_rate"}
        assert entry["defence_cost"]["unet_evals_per_step"] == (3.0 if entry["guard"] else 2.0)
    assert "fit_seconds" in defences["uce"]["defence_cost"]
    assert json.loads(out.read_text())["defences"] == defences
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert out.with_suffix(".md").read_text().count("\n") == 2 + len(defences)

    def refuse(*args, **kwargs):
        raise AssertionError("a finished cell was recomputed")

    monkeypatch.setattr(mod, "run_attack", refuse)
    monkeypatch.setattr(mod, "run_benchmark", refuse)
    assert mod.main(argv)["defences"] == defences


def test_pairs_take_the_best_of_each_kind_and_read_through_base_only_where_the_guard_can():
    mod = _module()
    done = {"uce": ("eraser", 1.0, 0.94), "mace": ("eraser", 0.5, 0.38), "esd-x": ("eraser", 1.0, 0.81),
            "sld:medium": ("guard", 1.0, 0.0), "adavd": ("guard", 1.0, 0.94), "safree": ("guard", 1.0, 0.5)}
    report = {"defences": {n: {"kind": k, "worst_asr": w, "utility": {"neighbour": u}}
                           for n, (k, w, u) in done.items()}}
    pairs = mod.pair_defences(report, ["uce", "mace", "esd-x", "doco"], ["sld:medium", "adavd", "safree"], 2, 3)
    assert [p["label"] for p in pairs] == [
        "mace+adavd", "mace+adavd/base", "mace+safree", "mace+sld:medium", "mace+sld:medium/base",
        "uce+adavd", "uce+adavd/base", "uce+safree", "uce+sld:medium", "uce+sld:medium/base"]  # doco: not finished
    assert [p["guard"] for p in pairs[:5]] == ["adavd", "adavd:concept_weights=base", "safree", "sld:medium",
                                               "sld:medium,concept_weights=base"]  # as given, else sandbox preset
    assert all(p["guard"].endswith("concept_weights=base") == p["label"].endswith("/base") for p in pairs)


def test_explicit_pairs_take_specs_with_options_and_refuse_what_cannot_run():
    from safediff.errors import SafediffError

    mod = _module()
    pairs = mod.explicit_pairs(["uce+sld:weak/base", "rece:concept_type=object-hard+adavd", "uce+safree"])
    assert [(p["label"], p["eraser"], p["guard"]) for p in pairs] == [
        ("uce+sld:weak/base", "uce", "sld:weak,concept_weights=base"),
        ("rece:concept_type=object-hard+adavd", "rece:concept_type=object-hard", "adavd"),
        ("uce+safree", "uce", mod.guard_spec("safree"))]
    for item, message in (("uce", "is not ERASER\\+GUARD"), ("uce+safree/base", "safree cannot read"),
                          ("nope+sld", "nope"), ("uce+nope/base", "nope")):
        with pytest.raises(SafediffError, match=message):
            mod.explicit_pairs([item])


def test_bad_size_is_one_line(tmp_path):
    from safediff.errors import SafediffError

    with pytest.raises(SafediffError, match="--prompts must be >= 1"):
        _module().main(["--prompts", "0", "--out", str(tmp_path / "x.json")])


def test_pareto_front_is_the_non_dominated_set():
    rng = random.Random(0)
    points = [(f"p{i}", rng.choice([0.0, 0.25, 0.5, 1.0]), rng.choice([0.5, 0.9, 1.0])) for i in range(30)]
    front = set(pareto_front(points))

    def beats(a, b):  # a dominates b: no worse on both axes (x lower, y higher), better on one
        return a[1] <= b[1] and a[2] >= b[2] and (a[1] < b[1] or a[2] > b[2])

    for p in points:
        assert (p[0] in front) == (not any(beats(q, p) for q in points))
    xs = [dict((label, x) for label, x, _ in points)[label] for label in pareto_front(points)]
    assert xs == sorted(xs)
    assert pareto_chart("t", points, "x", "y", goal=(0.25, 0.9))[:4] == b"\x89PNG"
