"""The plumbing the sandbox benchmark scripts built on the attack runner share (``benchmarks/relearn_sandbox.py``,
``freezeasguard_sandbox.py``, ``backdoors_sandbox.py``): their common command-line options and defaults per size,
a report resumed only under the same protocol, edits fitted once and cached, the relearning attack at a tier.

Each script writes OUT (JSON, atomically after every cell) and OUT.md (its table); ``--quick`` runs the ``smoke``
settings at tiny sizes (a plumbing check), otherwise the ``benchmark`` ones.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

import torch

from safediff.hashing import json_sha256
from safediff.records import git_hash, versions
from safediff.storage import write_bytes_atomic


def parser(description: str, out: str, steps_default: str = "the model's") -> argparse.ArgumentParser:
    """A parser with the options every script has: ``--model``, ``--steps``, ``--quick``, ``--threads``, ``--out``
    (default ``out``); the script adds its own."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", default="sandbox")
    ap.add_argument("--steps", type=int, default=None, help=f"sampler steps (default: {steps_default})")
    ap.add_argument("--quick", action="store_true", help="plumbing check: smoke settings, tiny sizes")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=out)
    return ap


def parse_args(ap: argparse.ArgumentParser, argv: list[str] | None, quick: dict, full: dict) -> argparse.Namespace:
    """The options, each one not given taken from ``quick`` (with ``--quick``) or ``full``; sets torch's threads."""
    a = ap.parse_args(argv)
    for key, value in (quick if a.quick else full).items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    torch.set_num_threads(a.threads)
    return a


def tier_of(a: argparse.Namespace) -> str:
    """The methods' sandbox settings the run uses: ``smoke`` for ``--quick``, else ``benchmark``."""
    return "smoke" if a.quick else "benchmark"


def report_for(out: Path, protocol: dict, threads: int) -> dict:
    """The report at ``out`` if it was made under ``protocol`` (its results are kept), else a new one; with the
    versions, git hash and thread count of this call."""
    report = json.loads(out.read_text()) if out.is_file() else {}
    protocol = json.loads(json.dumps(protocol, default=str))  # as stored, to compare with the stored one
    if report.get("protocol") != protocol:
        report = {"protocol": protocol, "results": {}}
    report.update({"versions": versions(), "git": git_hash(), "torch_threads": threads})
    return report


def cached(path: Path, make: Callable, key: dict, verb: str = "fitted") -> Path:
    """``make()``'s edit saved once, at ``path`` with a short hash of ``key`` (everything that determines the edit:
    model, method, settings) in its name, so an edit made under other settings is never picked up; returns where."""
    path = path.with_name(f"{path.stem}-{json_sha256(key)[:12]}{path.suffix}")
    if not path.is_file():
        start = time.monotonic()
        edit = make()
        path.parent.mkdir(parents=True, exist_ok=True)
        edit.save(path)
        print(f"{verb} {path.name} in {time.monotonic() - start:.0f} s -> {path}", flush=True)
    return path


def relearn_attack(tier: str, k: int, ns: list[int]):
    """``relearn`` at its sandbox ``tier`` settings with k images, max(ns) steps, judged after each n."""
    from safediff.attacks.runner import build_attack
    from safediff.options import parse_options
    from safediff.registry import ATTACKS

    options = {**parse_options(ATTACKS.get("relearn").sandbox[tier]["params"], "relearn"), "k": str(k),
               "steps": str(ns[-1]), "eval_at": ";".join(str(n) for n in ns[:-1])}
    return build_attack("relearn:" + ",".join(f"{key}={v}" for key, v in options.items() if v))


def write_table(out: Path, table: str) -> None:
    """OUT.md: the script's markdown table."""
    write_bytes_atomic(out.with_suffix(".md"), table.encode())
