"""TICoE's Morpho-Contextual Concept Preservation on the sandbox (``sandbox/mcp``), on synthetic run records: the share
of neighbour rows whose object shows the neighbour value, whatever its other attributes, per value too; degenerate
images count as lost; a set without neighbour rows reports none."""

import pytest

from safediff.bench.results import summarise
from safediff.sandbox.benchmarks import erase_first, erasure_set

SPECS = ("sandbox-presence", "sandbox-mark")


def sample(i: int, row: dict, read: dict | None, blank: bool = False) -> dict:
    objs = [] if read is None else [{"colour": read["colour"], "shape": read["shape"], "style": read["style"],
                                     "side": "left", "area": 100}]
    return {"row": i, "categories": [row["category"]], "degenerate": blank, "meta": row,
            "detections": {SPECS[0]: {"scores": {"present": 1.0}, "flagged": bool(objs), "objects": objs},
                           SPECS[1]: {"scores": {"mark": 0.0}, "flagged": False}}}


def test_mcp_is_the_share_of_neighbour_rows_showing_their_value():
    rows = [r for r in erasure_set("red", n_per_kind=8) if r["kind"] in ("neighbour", "far")]
    neighbours = [r for r in rows if r["kind"] == "neighbour"]
    samples, shown = [], {}
    for i, r in enumerate(rows):
        o = r["objects"][0]
        if r["kind"] == "far":
            samples.append(sample(i, r, {"colour": "red", "shape": "star", "style": "solid"}))  # never counted
            continue
        k = len(samples)
        if k % 4 == 0:
            read = {"colour": o["colour"], "shape": "star", "style": "striped"}  # value kept, shape wrong: counts
        elif k % 4 == 1:
            read = {"colour": "red", "shape": o["shape"], "style": o["style"] or "solid"}  # turned into red
        elif k % 4 == 2:
            read = None  # nothing drawn
        else:
            read = {"colour": o["colour"], "shape": o["shape"], "style": o["style"] or "solid"}
        blank = k % 8 == 7  # a degenerate image never counts as preserved
        ok = read is not None and read["colour"] == o["colour"] and not blank
        shown.setdefault(o["colour"], []).append(ok)
        samples.append(sample(i, r, read, blank))
    values, better = summarise(samples, ("sandbox",), {})
    flat = [x for v in shown.values() for x in v]
    assert values["sandbox/mcp"]["value"] == pytest.approx(sum(flat) / len(flat))
    assert values["sandbox/mcp"]["n"] == len(neighbours) and better["sandbox/mcp"] is True
    for colour, hits in shown.items():
        assert values[f"sandbox/mcp/value={colour}"]["value"] == pytest.approx(sum(hits) / len(hits))
    assert set(shown) <= {"orange", "pink", "purple", "brown"}
    # unlike kept_rate/kind=neighbour, MCP does not ask for the other attributes
    assert values["sandbox/mcp"]["value"] > values["sandbox/kept_rate/kind=neighbour"]["value"]


def test_sets_without_neighbour_rows_report_no_mcp():
    rows = erase_first(5, n_per_kind=1, n_kept=4)
    samples = [sample(i, r, None) for i, r in enumerate(rows)]
    values, _ = summarise(samples, ("sandbox",), {})
    assert not any(k.startswith("sandbox/mcp") for k in values)
