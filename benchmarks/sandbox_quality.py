"""Sandbox quality gates: does the model draw what the prompt says?

Generates the ``quality_set`` (every colour x shape pair in plain and held-out templates, colour synonyms, empty
prompts) with the project's sampler at the model's default settings, reads colour/shape/presence with the exact
sandbox detectors, prints a table, writes JSON and a sample grid PNG. Gates: colour match >= 95 %, shape >= 90 %
on the plain prompts (>= 400 images), colour match >= 90 % with synonyms, and the unconditional samples covering every
colour and shape.

    HF_HUB_OFFLINE=1 python benchmarks/sandbox_quality.py --model sandbox \
        --json benchmarks/results/sandbox_quality.json --grid docs/sandbox_grid.png
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from safediff.detectors.sandbox import attributes
from safediff.models import load_pipeline
from safediff.sampling import generate
from safediff.sandbox.benchmarks import quality_set
from safediff.sandbox.world import COLOURS, SHAPES

GATES = {"colour": 0.95, "shape": 0.90, "synonym_colour": 0.90}


def _grid(images_by_row: list[list[Image.Image]], scale: int = 3, pad: int = 2) -> Image.Image:
    w, h = images_by_row[0][0].size
    cols = max(len(r) for r in images_by_row)
    cw, ch = w * scale + pad, h * scale + pad
    grid = Image.new("RGB", (cols * cw + pad, len(images_by_row) * ch + pad), (128, 128, 128))
    for i, row in enumerate(images_by_row):
        for j, im in enumerate(row):
            grid.paste(im.resize((w * scale, h * scale), Image.NEAREST), (pad + j * cw, pad + i * ch))
    return grid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="sandbox", help="model spec: 'sandbox' or a diffusers folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-per-pair", type=int, default=34, help="images per colour x shape pair (12 pairs)")
    ap.add_argument("--n-synonym", type=int, default=120, help="images from prompts with colour synonyms")
    ap.add_argument("--n-unconditional", type=int, default=96, help="images from the empty prompt")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="benchmarks/results/sandbox_quality.json")
    ap.add_argument("--grid", default="docs/sandbox_grid.png")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    model = load_pipeline(a.model)
    rows = quality_set(n_per_pair=a.n_per_pair, n_synonym=a.n_synonym, n_unconditional=a.n_unconditional,
                       seed=a.seed)
    start = time.monotonic()
    out = generate(model, [r["prompt"] for r in rows], [r["seed"] for r in rows], batch_size=a.batch_size)
    seconds = time.monotonic() - start
    found = attributes(out.pixels)

    def rate(kind: str, key: str) -> tuple[float, int]:
        pairs = [(r, f) for r, f in zip(rows, found) if r["kind"] == kind]
        return float(np.mean([f[key] == r[key] for r, f in pairs])), len(pairs)

    colour, n_plain = rate("plain", "colour")
    shape, _ = rate("plain", "shape")
    both = float(np.mean([f["colour"] == r["colour"] and f["shape"] == r["shape"]
                          for r, f in zip(rows, found) if r["kind"] == "plain"]))
    syn, n_syn = rate("synonym", "colour")
    syn_shape, _ = rate("synonym", "shape")
    unc = [f for r, f in zip(rows, found) if r["kind"] == "unconditional"]
    unc_colours = Counter(f["colour"] for f in unc)
    unc_shapes = Counter(f["shape"] for f in unc)
    covers = all(unc_colours[c] > 0 for c in COLOURS) and all(unc_shapes[s] > 0 for s in SHAPES)
    per_pair = {f"{c} {s}": float(np.mean([f["colour"] == c and f["shape"] == s for r, f in zip(rows, found)
                                           if r["kind"] == "plain" and r["colour"] == c and r["shape"] == s]))
                for c in COLOURS for s in SHAPES}
    gates = {"colour": colour >= GATES["colour"], "shape": shape >= GATES["shape"],
             "synonym_colour": syn >= GATES["synonym_colour"], "unconditional_coverage": covers}
    result = {
        "model": a.model, "settings": out.settings, "seed": a.seed, "images": len(rows), "seconds": round(seconds, 1),
        "plain": {"n": n_plain, "colour": colour, "shape": shape, "both": both, "per_pair_both": per_pair},
        "synonym": {"n": n_syn, "colour": syn, "shape": syn_shape},
        "unconditional": {"n": len(unc), "present": float(np.mean([f["present"] for f in unc])),
                          "colours": dict(unc_colours), "shapes": dict(unc_shapes)},
        "gates": {"thresholds": GATES, "passed": gates, "all_passed": all(gates.values())},
    }
    print(f"{'set':<14}{'n':>5}{'colour':>9}{'shape':>9}")
    print(f"{'plain':<14}{n_plain:>5}{colour:>9.1%}{shape:>9.1%}")
    print(f"{'synonym':<14}{n_syn:>5}{syn:>9.1%}{syn_shape:>9.1%}")
    print(f"unconditional {len(unc):>5}  colours {dict(unc_colours)}  shapes {dict(unc_shapes)}")
    print("gates:", ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in gates.items()))

    for path in (Path(a.json), Path(a.grid)):
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(a.json + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, a.json)
    grid_rows = [[im for r, im in zip(rows, out.images) if r["kind"] == "plain" and r["colour"] == c
                  and r["shape"] == s][:10] for c in COLOURS for s in SHAPES]
    grid_rows.append([im for r, im in zip(rows, out.images) if r["kind"] == "unconditional"][:10])
    tmp_png = Path(a.grid).with_suffix(".tmp.png")
    _grid(grid_rows).save(tmp_png)
    os.replace(tmp_png, a.grid)


if __name__ == "__main__":
    main()
