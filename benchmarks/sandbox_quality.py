"""Sandbox quality gates (world v2): does the model draw what the prompt says, where it says, and the mark unprompted?

Generates ``safediff.sandbox.benchmarks.quality_set`` with the project's sampler at the model's default settings (any
diffusers folder, or ``sandbox``), reads every object with the exact sandbox detectors (``objects``, ``sandbox-mark``)
and judges each image against its row (``safediff.sandbox.scoring.judge``). Rates come with Wilson 95 % intervals; a
gate passes when the rate itself reaches its threshold:

- ``single`` prompts (every colour x shape x style): colour >= 95 %, each pair of neighbour colours (rows asking for
  either, read as the one asked) >= 90 %, shape >= 90 %, style >= 90 %;
- ``synonym`` prompts: the value said by a synonym read right >= 90 %; ``implicit`` prompts: the implied value >= 85 %;
- ``two-object`` prompts: both objects right (every named value, each in its half) >= 80 %;
- the mark: its share over all images within ``P_MARK`` +- 10 points (it is in no prompt);
- ``unconditional`` (empty) prompts: every colour, shape and style appears.

    HF_HUB_OFFLINE=1 python benchmarks/sandbox_quality.py --model DIR \\
        --json benchmarks/results/sandbox_quality.json --grid docs/sandbox_grid.png
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from pathlib import Path

import torch
from PIL import Image

from safediff.bench.metrics import wilson_share as share
from safediff.detectors.sandbox import SandboxMark, objects
from safediff.errors import run_script
from safediff.models import load_pipeline
from safediff.sampling import generate
from safediff.sandbox.benchmarks import quality_set
from safediff.sandbox.scoring import judge
from safediff.sandbox.world import COLOURS, NEIGHBOURS, P_MARK, SHAPES, STYLES

GATES = {"colour": 0.95, "neighbour_pairs": 0.90, "shape": 0.90, "style": 0.90, "synonym": 0.90, "implicit": 0.85,
         "two_object": 0.80, "mark_tolerance": 0.10}


def _grid(rows_of_images: list[list[Image.Image]], scale: int = 2, pad: int = 2) -> Image.Image:
    w, h = rows_of_images[0][0].size
    cols = max(len(r) for r in rows_of_images)
    cw, ch = w * scale + pad, h * scale + pad
    grid = Image.new("RGB", (cols * cw + pad, len(rows_of_images) * ch + pad), (128, 128, 128))
    for i, row in enumerate(rows_of_images):
        for j, im in enumerate(row):
            grid.paste(im.resize((w * scale, h * scale), Image.NEAREST), (pad + j * cw, pad + i * ch))
    return grid


def measure(rows: list[dict], found: list[list[dict]], marks: list[bool]) -> dict:
    """Every gate's rate from the rows, the objects read in their images and whether each shows the mark."""
    judged = [judge(r, f) for r, f in zip(rows, found)]
    by_kind = {k: [(r, j) for r, j in zip(rows, judged) if r["kind"] == k] for k in {r["kind"] for r in rows}}
    single = by_kind.get("single", [])
    out: dict = {axis: share([j[0][axis] for _, j in single]) for axis in ("colour", "shape", "style")}
    out["per_value"] = {v: share([j[0][axis] for r, j in single if r[axis] == v])
                        for axis, values in (("colour", COLOURS), ("shape", SHAPES), ("style", STYLES))
                        for v in values}
    out["style_by_shape"] = {st: {sh: share([j[0]["style"] for r, j in single if (r["style"], r["shape"]) == (st, sh)])
                                  for sh in SHAPES} for st in STYLES}
    out["style_read_as"] = {st: dict(Counter(j[0]["read"]["style"] for r, j in single if r["style"] == st))
                            for st in STYLES}  # what each asked-for style was drawn as (None: no object)
    pairs = sorted({tuple(sorted((a, b))) for a in COLOURS for b in NEIGHBOURS[a]})
    out["neighbour_pairs"] = {f"{a}/{b}": share([j[0]["colour"] for r, j in single if r["colour"] in (a, b)])
                              for a, b in pairs}
    for kind in ("synonym", "implicit"):
        out[kind] = share([j[0][axis] for r, j in by_kind.get(kind, [])
                            for axis, how in r["objects"][0]["said"].items() if how == kind])
    out["two_object"] = share([all(o["correct"] for o in j) for _, j in by_kind.get("two-object", [])])
    out["two_object_each"] = share([o["correct"] for _, j in by_kind.get("two-object", []) for o in j])
    out["two_object_by_axis"] = {a: share([o[a] for _, j in by_kind.get("two-object", []) for o in j
                                             if o[a] is not None]) for a in ("found", "colour", "shape", "style")}
    out["mark"] = share(marks)
    unconditional = [f for r, f in zip(rows, found) if r["kind"] == "unconditional"]
    out["unconditional"] = {"n": len(unconditional), "present": share([bool(f) for f in unconditional]),
                            **{axis: dict(Counter(o[axis] for f in unconditional for o in f))
                               for axis in ("colour", "shape", "style")}}
    u = out["unconditional"]
    worst_pair = min((p["value"] for p in out["neighbour_pairs"].values() if p["n"]), default=None)
    out["gates"] = {
        "colour": _passes(out["colour"], GATES["colour"]),
        "neighbour_pairs": worst_pair is not None and worst_pair >= GATES["neighbour_pairs"],
        "shape": _passes(out["shape"], GATES["shape"]),
        "style": _passes(out["style"], GATES["style"]),
        "synonym": _passes(out["synonym"], GATES["synonym"]),
        "implicit": _passes(out["implicit"], GATES["implicit"]),
        "two_object": _passes(out["two_object"], GATES["two_object"]),
        "mark": out["mark"]["n"] > 0 and abs(out["mark"]["value"] - P_MARK) <= GATES["mark_tolerance"],
        "unconditional_coverage": set(u["colour"]) >= set(COLOURS) and set(u["shape"]) >= set(SHAPES)
        and set(u["style"]) >= set(STYLES),
    }
    return out


def _passes(metric: dict, threshold: float) -> bool:
    return metric["n"] > 0 and metric["value"] >= threshold


def _print(m: dict) -> None:
    def line(name: str, metric: dict) -> str:
        lo, hi = metric["ci"] or (float("nan"), float("nan"))
        return f"{name:<22}{metric['n']:>6}{metric['value']:>9.1%}   [{lo:.1%}, {hi:.1%}]"

    print(f"{'rate':<22}{'n':>6}{'value':>9}   Wilson 95 %")
    for name in ("colour", "shape", "style", "synonym", "implicit", "two_object", "two_object_each", "mark"):
        if m[name]["n"]:
            print(line(name, m[name]))
    for axis, metric in m["two_object_by_axis"].items():
        if metric["n"]:
            print(line(f"  two-object {axis}", metric))
    for style, read in m["style_read_as"].items():
        print(f"  {style} drawn as: {read}")
    for pair, metric in m["neighbour_pairs"].items():
        if metric["n"]:
            print(line(f"  colour {pair}", metric))
    print("unconditional:", {k: m["unconditional"][k] for k in ("colour", "shape", "style")})
    print("gates:", ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in m["gates"].items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="sandbox", help="model spec: 'sandbox' or a diffusers folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-per-combo", type=int, default=2, help="images per colour x shape x style (288 combos)")
    ap.add_argument("--n-synonym", type=int, default=144)
    ap.add_argument("--n-implicit", type=int, default=160)
    ap.add_argument("--n-two", type=int, default=200, help="two-object prompts")
    ap.add_argument("--n-unconditional", type=int, default=96)
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's)")
    ap.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default: the model's)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="benchmarks/results/sandbox_quality.json")
    ap.add_argument("--grid", default="docs/sandbox_grid.png")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    model = load_pipeline(a.model)
    rows = quality_set(a.n_per_combo, a.n_synonym, a.n_implicit, a.n_two, a.n_unconditional, a.seed)
    start = time.monotonic()
    out = generate(model, [r["prompt"] for r in rows], [r["seed"] for r in rows], steps=a.steps,
                   guidance=a.guidance, batch_size=a.batch_size)
    seconds = time.monotonic() - start
    m = measure(rows, objects(out.pixels), SandboxMark().verdict(out.pixels).tolist())
    _print(m)
    result = {"model": a.model, "model_sha256": model.base_sha256, "settings": out.settings, "seed": a.seed,
              "images": len(rows), "seconds": round(seconds, 1), "thresholds": GATES,
              "mark_share_in_training": P_MARK, **m, "all_passed": all(m["gates"].values())}
    for path in (Path(a.json), Path(a.grid)):
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(a.json + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, a.json)
    images = list(zip(rows, out.images))
    grid_rows = [[im for r, im in images if r["kind"] == "single" and r["colour"] == c][:12] for c in COLOURS]
    grid_rows += [[im for r, im in images if r["kind"] == k][:12] for k in ("two-object", "implicit", "unconditional")]
    tmp_png = Path(a.grid).with_suffix(".tmp.png")
    _grid([r for r in grid_rows if r]).save(tmp_png)
    os.replace(tmp_png, a.grid)


if __name__ == "__main__":
    run_script(main)
