"""benchmarks/sandbox_quality.py's ``measure``: each gate read from the rows and the objects found in their images."""

import pytest

from bench_helpers import load_benchmark
from safediff.sandbox.benchmarks import quality_set
from safediff.sandbox.world import COLOURS, P_MARK, SHAPES, STYLES

quality = load_benchmark("sandbox_quality")


def drawn_as_asked(row: dict, style_of=lambda obj: obj["style"]) -> list[dict]:
    """What a perfect model would show for ``row`` (an open value drawn as the first one of its axis)."""
    x = {"any": 32.0, "left": 16.0, "right": 48.0}
    return [{"colour": o["colour"], "shape": o["shape"], "style": style_of(o) or STYLES[0], "side":
             "left" if x[o["position"]] < 32 else "right", "x": x[o["position"]], "area": 300} for o in row["objects"]]


@pytest.fixture(scope="module")
def rows():
    return quality_set(n_per_combo=1, n_synonym=40, n_implicit=40, n_two=20, n_unconditional=0)


def test_a_model_that_draws_every_prompt_passes_every_gate_but_coverage_it_was_not_shown(rows):
    marks = [i < round(P_MARK * len(rows)) for i in range(len(rows))]  # the mark at its training share
    m = quality.measure(rows, [drawn_as_asked(r) for r in rows], marks)
    assert m["colour"]["value"] == m["shape"]["value"] == m["style"]["value"] == 1.0
    assert m["two_object"]["value"] == 1.0 and m["synonym"]["value"] == m["implicit"]["value"] == 1.0
    assert abs(m["mark"]["value"] - P_MARK) < 0.01
    assert all(v for k, v in m["gates"].items() if k != "unconditional_coverage")
    assert not m["gates"]["unconditional_coverage"]  # no unconditional rows: nothing seen, so not passed
    assert all(cell["value"] == 1.0 for by_shape in m["style_by_shape"].values() for cell in by_shape.values())


def test_style_by_shape_and_read_as_locate_a_style_lost_on_some_shapes(rows):
    lost = ("star", "triangle", "diamond")

    def style_of(obj):
        return "outlined" if obj["style"] == "striped" and obj["shape"] in lost else obj["style"]

    m = quality.measure(rows, [drawn_as_asked(r, style_of) for r in rows], [False] * len(rows))
    by_shape = m["style_by_shape"]["striped"]
    assert all(by_shape[s]["value"] == (0.0 if s in lost else 1.0) and by_shape[s]["n"] == len(COLOURS)
               for s in SHAPES)
    assert m["style_read_as"]["striped"] == {"striped": len(COLOURS) * (len(SHAPES) - 3), "outlined": len(COLOURS) * 3}
    assert m["style_read_as"]["solid"] == {"solid": len(COLOURS) * len(SHAPES)}
    assert m["style"]["value"] == pytest.approx(1 - 3 / (len(SHAPES) * len(STYLES)))  # 87.5 %: under the gate
    assert not m["gates"]["style"] and m["gates"]["shape"]
