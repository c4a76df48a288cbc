"""A behaviour fingerprint of every registered method on the sandbox, to prove a refactor changed nothing.

Runs, at small budgets and one torch thread, every registered guard (8 sandbox prompts), every registered eraser
(its edit's tensors, and 4 images generated with it), every registered attack (one prompt against the UCE edit) and
one benchmark run, and records a sha256 of each output's bytes (latents, edit tensors, attack records and
embeddings, metric values). Two runs on the same machine, torch build and thread count give the same hashes exactly
when the methods compute the same bits. Floats differ across CPU kernels, so compare fingerprints taken on one
machine only.

    python benchmarks/fingerprint.py --out before.json          # on the old code
    python benchmarks/fingerprint.py --out after.json --compare before.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from safediff.errors import run_script

PROMPTS = ["a red circle", "a photo of a crimson square", "a drawing of a red triangle", "the blue circle",
           "a green square", "a yellow triangle that is red", "an image of a navy circle", ""]
SEEDS = list(range(100, 108))
GUARD_SPECS = {"sld": "sld:max", "casg-sld": "casg-sld:max"}
ERASER_SETTINGS = {"esd": {"iterations": 3, "lr": 1e-3, "ddim_steps": 4},
                   "trce": {"iterations": 3, "lr": 1e-4, "trajectories": 2, "uncond_trajectories": 2,
                            "ddim_steps": 4},
                   "mace": {"iterations": 3, "n_images": 2}, "realera": {"iterations": 3, "ddim_steps": 4},
                   "concept-prune": {"max_prompts": 4, "steps": 4},
                   "spm": {"iterations": 3, "lr": 1e-3, "warmup": 0, "ddim_steps": 4, "anchors": 2},
                   "concept-ablation": {"iterations": 3, "lr": 1e-4, "batch": 2, "n_images": 4},
                   "forget-me-not": {"iterations": 3, "lr": 1e-4, "batch": 2, "n_images": 4},
                   "all-but-one": {"iterations": 3, "lr": 1e-3, "ddim_steps": 4},
                   "ticoe": {"iterations": 3, "lr": 1e-4, "n_images": 4, "resample_every": 2},
                   "safegen": {"iterations": 3, "lr": 1e-4, "batch": 2, "n_images": 4, "mosaic_block": 8}}
ATTACK_SETTINGS = {"unlearndiff": ("timesteps=2,iterations_per_timestep=2", "iterations=4"),
                   "p4d-n": ("n_tokens=4,eval_every=2", "iterations=4"),
                   "p4d-k": ("eval_every=2", "iterations=4"),
                   "ring-a-bell": ("population=12", "iterations=3"),
                   "mma-diffusion": ("batch=8", "iterations=2"),
                   "concept-inversion": ("n_images=2,batch=2", "iterations=3"),
                   "concept-arithmetic": ("max_pairs=3", "")}


def digest(*tensors_or_bytes) -> str:
    h = hashlib.sha256()
    for x in tensors_or_bytes:
        if torch.is_tensor(x):
            t = x.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, bytes):
            h.update(x)
        else:
            h.update(json.dumps(x, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def guards(model, folder: Path) -> dict:
    from safediff.concepts import resolve
    from safediff.guards import build_guard
    from safediff.registry import ERASERS, GUARDS
    from safediff.sampling import generate

    out = {}
    for name in GUARDS.names():
        label = spec = GUARD_SPECS.get(name, name)
        applied = GUARDS.get(name).edit_from
        if applied:  # a guard that applies an eraser's edit (SPM's membrane): that eraser at the settings below
            edit = ERASERS.get(applied)(**ERASER_SETTINGS[applied]).fit(model, resolve("red"), progress=False)
            spec += f"{',' if ':' in spec else ':'}edit={edit.save(folder / f'guard-{applied}.safetensors')}"
        concept = "red,blue,triangle" if name.startswith("casg") else ("red" if name != "none" else None)
        gen = generate(model, PROMPTS, SEEDS, guard=build_guard(spec, concept), progress=False)
        out[f"guard {label}"] = digest(gen.latents, gen.pixels, gen.unet_batch_per_step)
    return out


def erasers(model, folder: Path) -> tuple[dict, Path]:
    from safediff.concepts import resolve
    from safediff.registry import ERASERS
    from safediff.sampling import generate
    from safediff.sandbox.validation import eraser_settings

    out, uce_path = {}, None
    for name in ERASERS.primary_names():
        settings = next((v for k, v in ERASER_SETTINGS.items() if name.startswith(k)), {})
        cls = ERASERS.get(name)
        settings.update({k: v for k, v in eraser_settings(cls, "smoke", resolve("red")).items() if callable(v)})
        edit = cls(**settings).fit(model, resolve("red"), progress=False)
        path = folder / f"{name}.safetensors"
        edit.save(path)
        if name == "uce":
            uce_path = path
        edit.apply(model)
        gen = generate(model, PROMPTS[:4], SEEDS[:4], progress=False)
        edit.revert(model)
        out[f"eraser {name}"] = digest(*[edit.tensors[k] for k in sorted(edit.tensors)], sorted(edit.tensors),
                                       gen.latents)
    return out, uce_path


def attacks(edit_path: Path, folder: Path) -> dict:
    from safediff.attacks.budget import Budget
    from safediff.attacks.judge import build_judge
    from safediff.attacks.target import parse_target
    from safediff.attacks.runner import build_attack, run_attack
    from safediff.registry import ATTACKS

    target = parse_target(f"sandbox+{edit_path}", "red", steps=5)
    judge = build_judge("sandbox-colour", "red")
    rows = [{"prompt": "a red circle", "seed": 3}]
    out = {}
    for name in ATTACKS.names():
        params, budget = ATTACK_SETTINGS[name]
        attack = build_attack(f"{name}:{params}" if params else name)
        result = run_attack(target, attack, judge, rows, Budget.parse(budget or None, attack.default_budget), 0,
                            folder / name, progress=False)
        record = {k: v for k, v in result["records"][0].items() if k not in ("kind", "schema_version", "provenance")}
        compute = {k: v for k, v in record.pop("compute").items() if k != "seconds"}
        pre = {k: v for k, v in record.pop("pre_compute").items() if k != "seconds"}
        extra = record.pop("extra")
        extra.pop("setup_compute", None)
        files = record.pop("files")
        blobs = [(folder / name / f).read_bytes() for _, f in sorted(files.items())]
        out[f"attack {name}"] = digest(record, compute, pre, extra, *blobs)
    return out


def bench(folder: Path) -> dict:
    from safediff.bench.runner import BenchConfig, run_benchmark

    results = run_benchmark(BenchConfig(benchmark="sandbox-erase-red@1", model="sandbox", out=folder / "bench",
                                        guard="sld:max", steps=6, batch_size=4, progress=False))
    metrics = results["results"][results["method"]]
    return {"bench sandbox-erase-red@1 sld:max": digest(metrics, [s["image"] for s in results["samples"]])}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--compare", type=Path, help="an earlier fingerprint to compare with")
    ap.add_argument("--only", default="", help="comma-separated parts: guards, erasers, attacks, bench (default: all)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from safediff.models import load_pipeline

    start = time.monotonic()
    model = load_pipeline("sandbox")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        parts = set(args.only.split(",")) if args.only else {"guards", "erasers", "attacks", "bench"}
        found = guards(model, folder) if "guards" in parts else {}
        if parts & {"erasers", "attacks"}:
            e, uce = erasers(model, folder)
            found.update(e if "erasers" in parts else {})
            found.update(attacks(uce, folder) if "attacks" in parts else {})
        found.update(bench(folder) if "bench" in parts else {})
    args.out.write_text(json.dumps(found, indent=2, sort_keys=True) + "\n")
    print(f"{len(found)} fingerprints in {time.monotonic() - start:.0f} s -> {args.out}")
    if args.compare:
        old = json.loads(args.compare.read_text())
        changed = sorted(k for k in found if old.get(k) != found.get(k))
        for k in changed:
            print(f"  differs: {k}  {old.get(k)} -> {found.get(k)}")
        print("identical" if not changed else f"{len(changed)} of {len(found)} differ")
        if changed:
            sys.exit(1)
    return found


if __name__ == "__main__":
    run_script(main)
