"""What fitting an eraser costs: wall seconds and peak memory of one fit, each eraser in a process of its own.

Each eraser (a registered name, options allowed: ``rece:concept_type=object-hard``) is fitted on ``--concept`` at its
``sandbox[--purpose]`` settings (``safediff.sandbox.validation.eraser_settings``, as every sandbox benchmark fits
it) in a fresh Python process, so the peak is its own: the process's peak resident set size after loading the model
(the baseline) and after the fit (``resource.getrusage(RUSAGE_SELF).ru_maxrss``), their difference (what the fit
added), and on CUDA ``torch.cuda.max_memory_allocated`` of the fit. The defaults are the robust-erasure methods
(AdvUnlearn, STEREO, DoCo, SalUn, DES) and UCE as the closed-form reference. Finished erasers are kept in ``--out``
and skipped when it is rerun with the same model, concept, purpose, device and threads.

    HF_HUB_OFFLINE=1 python benchmarks/fit_cost.py --threads 2 --out benchmarks/results/fit_cost.json

A model folder or hub id of SD-1.5 size with random weights runs the same on a GPU (``--model DIR --device cuda``;
``safediff.random_models.build_pipeline("sd15").save_pretrained(DIR)`` writes one), at the ``--purpose`` settings.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from safediff.errors import SafediffError, run_script
from safediff.options import Spec, split_specs
from safediff.records import git_hash, versions
from safediff.registry import ERASERS
from safediff.storage import write_json_atomic

DEFAULT = "uce,advunlearn,stereo,doco,salun,des"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def fit_once(spec: str, model_spec: str, concept: str, purpose: str, device: str, threads: int) -> dict:
    """Load, fit, measure (runs in the child process)."""
    from safediff.concepts import resolve
    from safediff.erasers import build_eraser
    from safediff.models import load_pipeline
    from safediff.sandbox.validation import eraser_settings

    torch.set_num_threads(threads)
    model = load_pipeline(model_spec, device=device)
    concepts = resolve(concept)
    eraser = build_eraser(spec, **eraser_settings(ERASERS.get(Spec.parse(spec, "eraser").name), purpose, concepts))
    loaded = peak_rss_mib()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.monotonic()
    edit = eraser.fit(model, concepts, progress=False)
    seconds = time.monotonic() - start
    peak = peak_rss_mib()
    out = {"fit_seconds": round(seconds, 2), "peak_rss_mib": round(peak, 1), "rss_after_load_mib": round(loaded, 1),
           "fit_added_rss_mib": round(peak - loaded, 1), "edit_values": sum(t.numel() for t in edit.tensors.values()),
           "model_sha256": model.base_sha256}
    if device.startswith("cuda"):
        out["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def fit_in_child(spec: str, setting: dict) -> dict:
    """``fit_once`` in a fresh Python process (its peak memory is the fit's alone)."""
    cmd = [sys.executable, __file__, "--child", spec, f"--model={setting['model']}", f"--concept={setting['concept']}",
           f"--purpose={setting['purpose']}", f"--device={setting['device']}",
           f"--threads={setting['torch_threads']}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SafediffError(f"fitting {spec} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--erasers", default=DEFAULT, help=f"eraser specs, ';' or ',' separated (default: {DEFAULT})")
    ap.add_argument("--model", default="sandbox")
    ap.add_argument("--concept", default="red")
    ap.add_argument("--purpose", default="benchmark", choices=("benchmark", "demo", "smoke"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/fit_cost.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.threads < 1:
        raise SafediffError(f"--threads must be >= 1, got {a.threads}")
    if a.child:
        print(json.dumps(fit_once(a.child, a.model, a.concept, a.purpose, a.device, a.threads)))
        return {}
    specs = split_specs(a.erasers)
    for spec in specs:
        ERASERS.get(Spec.parse(spec, "eraser").name)
    setting = {"model": a.model, "concept": a.concept, "purpose": a.purpose, "device": a.device,
               "torch_threads": a.threads}
    out = Path(a.out)
    earlier = json.loads(out.read_text()) if out.is_file() else {}
    report = earlier if earlier.get("setting") == setting else {"setting": setting, "fits": {}}
    report.update(versions=versions(), git=git_hash())
    for spec in specs:
        if spec in report["fits"]:
            continue
        report["fits"][spec] = fit_in_child(spec, setting)
        write_json_atomic(out, report)
        f = report["fits"][spec]
        print(f"{spec:32s} fit {f['fit_seconds']:8.1f} s  peak RSS {f['peak_rss_mib']:8.1f} MiB  "
              f"(+{f['fit_added_rss_mib']:.1f} over the loaded model)"
              + (f"  CUDA peak {f['cuda_peak_mib']:.1f} MiB" if "cuda_peak_mib" in f else ""), flush=True)
    return report


if __name__ == "__main__":
    run_script(main)
