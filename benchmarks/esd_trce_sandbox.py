"""ESD-x, ESD-u and TRCE erasing "red" on the sandbox: fit cost on CPU and the red rate before / after.

Protocol (sandbox model: DDIM 25 steps, CFG 5, 32x32; CPU, ``--threads`` torch threads, default 1):
- target: "a red {shape}" for the 3 shapes x ``--seeds`` seeds (0..n-1); an image counts as red when the sandbox
  colour detector's best colour is red (``safediff.detectors.sandbox.attributes``; no object -> not red);
- generalisation (``erasure_set("red")``, 16 prompts per kind): red rate on a synonym ("crimson", "scarlet", never
  told to the erasers) and on held-out templates; utility: non-target colours ("a green square", ...) shown correctly,
  and the shape of "a red {shape}" kept;
- cost: wall seconds of ``fit`` and iterations per second (ESD: optimizer steps; TRCE: stage-2 steps, trajectory
  caching included; its stage 1 alone is timed and evaluated too, the paper's ablation).

Sandbox settings (the papers' defaults are for SD 1.4 with 860M UNet parameters and a GPU; the sandbox UNet has 4.3M
and the budget is ~5 minutes of CPU per fit): see ``SETTINGS``. Everything else is the eraser's default.

Resumable: each method's edit is saved next to the JSON (``OUT.edits/NAME.safetensors``) and each finished method is
kept in the JSON, so a rerun skips what is done. Reproduce with

    HF_HUB_OFFLINE=1 python benchmarks/esd_trce_sandbox.py --out benchmarks/results/esd_trce_sandbox.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from safediff.concepts import resolve
from safediff.detectors.sandbox import attributes
from safediff.erasers.edit import Edit
from safediff.models import load_pipeline
from safediff.protocol import git_hash, versions, write_json_atomic
from safediff.registry import ERASERS
from safediff.sampling import generate
from safediff.sandbox.benchmarks import erasure_set
from safediff.sandbox.world import SHAPES

# x_t / trajectories are sampled with 10 DDIM steps (the model samples with 25) to fit the CPU budget.
SETTINGS = {
    "esd-x": {"iterations": 150, "lr": 1e-3, "ddim_steps": 10},
    "esd-u": {"iterations": 200, "lr": 1e-4, "ddim_steps": 10},
    "trce": {"iterations": 100, "lr": 1e-4, "trajectories": 20, "uncond_trajectories": 16, "ddim_steps": 10},
    "trce-stage1": {"stages": (1,)},
}


def target_rows(seeds: int) -> list[dict]:
    return [{"prompt": f"a red {s}", "seed": k, "colour": "red", "shape": s} for s in SHAPES for k in range(seeds)]


def evaluate(model, rows: list[dict], batch: int) -> list[dict]:
    out = generate(model, [r["prompt"] for r in rows], [r["seed"] for r in rows], batch_size=batch, progress=False)
    return attributes(out.pixels)


def scores(model, seeds: int, batch: int) -> dict:
    target = target_rows(seeds)
    found = evaluate(model, target, batch)
    result = {"red_rate": sum(f["colour"] == "red" for f in found) / len(found),
              "shape_kept": sum(f["shape"] == r["shape"] for f, r in zip(found, target)) / len(found),
              "n_target": len(found)}
    rows = [r for r in erasure_set("red", n_per_kind=16) if r["kind"] != "target-word"]
    found = evaluate(model, rows, batch)
    for kind in ("target-synonym", "target-heldout-template"):
        hits = [f["colour"] == "red" for r, f in zip(rows, found) if r["kind"] == kind]
        result[f"red_rate_{kind.removeprefix('target-')}"] = sum(hits) / len(hits)
    kept = [f["colour"] == r["colour"] for r, f in zip(rows, found) if r["kind"] == "non-target"]
    result["non_target_colour_kept"] = sum(kept) / len(kept)
    return result


def fit(model, name: str, edits: Path) -> tuple[Edit, dict]:
    path = edits / f"{name}.safetensors"
    if path.is_file():
        edit = Edit.load(path)
        return edit, edit.metadata["benchmark_cost"]
    eraser = ERASERS.get(name.removesuffix("-stage1"))(**SETTINGS[name])
    start = time.perf_counter()
    edit = eraser.fit(model, resolve("red"), progress=False)
    seconds = time.perf_counter() - start
    steps = eraser.iterations if 2 in getattr(eraser, "stages", (2,)) else None
    cost = {"fit_seconds": round(seconds, 2), "iterations": steps,
            "iterations_per_second": round(steps / seconds, 3) if steps else None,
            "hyperparameters": eraser.hyperparameters(), "info": edit.metadata["info"]}
    edit.metadata["benchmark_cost"] = cost
    edit.save(path)
    return edit, cost


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/esd_trce_sandbox.json")
    ap.add_argument("--model", default="sandbox")
    ap.add_argument("--methods", default="esd-x,esd-u,trce,trce-stage1")
    ap.add_argument("--seeds", type=int, default=8, help="seeds per shape for 'a red {shape}'")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=48)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    edits = out.with_suffix(".edits")
    edits.mkdir(parents=True, exist_ok=True)
    result = json.loads(out.read_text()) if out.is_file() else {}
    model = load_pipeline(args.model)
    result.update({"model": model.protocol(), "threads": args.threads, "seeds_per_shape": args.seeds,
                   "settings": SETTINGS, "versions": versions(), "git": git_hash()})
    result.setdefault("methods", {})
    if "none" not in result["methods"]:
        result["methods"]["none"] = scores(model, args.seeds, args.batch)
        write_json_atomic(out, result)
    for name in args.methods.split(","):
        if name in result["methods"]:
            continue
        edit, cost = fit(model, name, edits)
        edit.apply(model)
        try:
            result["methods"][name] = {**cost, **scores(model, args.seeds, args.batch)}
        finally:
            edit.revert(model)
        write_json_atomic(out, result)
    print(f"{'method':14s} {'fit s':>8s} {'it/s':>7s} {'red':>6s} {'syn':>6s} {'heldout':>8s} {'others ok':>9s}")
    for name, r in result["methods"].items():
        its = r.get("iterations_per_second")
        print(f"{name:14s} {r.get('fit_seconds', 0):8.1f} {its if its else '-':>7} {r['red_rate']:6.2f} "
              f"{r['red_rate_synonym']:6.2f} {r['red_rate_heldout-template']:8.2f} {r['non_target_colour_kept']:9.2f}")


if __name__ == "__main__":
    main()
