"""Why a closed-form eraser weakens as it erases more values at once: the residual of each erased value's rows after
fitting the first k values of ``sandbox.benchmarks.MULTI_ORDER`` together (the mass-erasure sets of
``erasers_sandbox_v2.py --mass``).

For each method spec (``--methods``, semicolon-separated; fitted at its ``benchmark`` sandbox settings, the spec's
options on top) and each k of ``--mass``: one fit on the k values, then for each erased value the median over the
edited projections of ``edit_residuals.residuals`` (0: the value's rows land on the anchor's; 1: left where they
were; the rows of the value's keyword prompt, ``--tokens`` convention). A residual that grows with k while no weight
of the fit (``erase_scale``, ``lamb``, ``preserve_scale``) brings it down says the linear edit has run out of room:
the rows to move outnumber what one map of the text width can send to their anchors. Read the median: a value whose
keyword rows already lie near the anchor's (on the sandbox, striped's differ by 0.9 % of their norm, red's by 56 %)
gives a large ratio for a small change, and sets the max. Seconds per fit for the closed forms; JSON at ``--out``
(atomic), one line per (method, k) on stdout.

    HF_HUB_OFFLINE=1 python benchmarks/mass_residuals.py --mass 1,5,10,20 \\
        --methods "uce;uce:erase_scale=10;uce:lamb=0.05;uce:preserve_scale=0,lamb=1e-6;speed"
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from edit_residuals import residuals  # noqa: E402

from safediff.errors import SafediffError, run_script  # noqa: E402


def measure(model, spec: str, k: int, tokens: str) -> dict:
    """Fit ``spec`` on the first k values; each value's median residual, their median and max, the fit seconds."""
    from safediff.concepts import resolve
    from safediff.erasers import build_eraser
    from safediff.options import Spec
    from safediff.registry import ERASERS
    from safediff.sandbox.benchmarks import MULTI_ORDER
    from safediff.sandbox.validation import eraser_settings

    values = MULTI_ORDER[:k]
    concepts = resolve(",".join(values))
    settings = eraser_settings(ERASERS.get(Spec.parse(spec, "eraser").name), "benchmark", concepts)
    edit = build_eraser(spec, **settings).fit(model, concepts, progress=False)  # the spec's options over settings
    per = {}
    for v in values:
        r = residuals(model, edit, v, tokens)
        if not r:
            raise SafediffError(f"{spec}: its edit changes no layer reading the token rows; this benchmark is for "
                                "closed-form edits of those layers (uce, speed, rece, ...)")
        per[v] = statistics.median(r.values())
    return {"k": k, "values": per, "median": statistics.median(per.values()), "max": max(per.values()),
            "fit_seconds": edit.metadata["fit_seconds"]}


def main(argv: list[str] | None = None) -> dict:
    from safediff.models import load_pipeline
    from safediff.options import split_specs
    from safediff.records import git_hash, versions
    from safediff.sandbox.benchmarks import MULTI_ORDER
    from safediff.storage import write_json_atomic

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sandbox")
    ap.add_argument("--methods", default="uce", help="eraser specs, semicolon-separated")
    ap.add_argument("--mass", default="1,5,10,20", help="numbers of values erased at once")
    ap.add_argument("--tokens", default="to_end", choices=("to_end", "last"), help="rows the residual is taken over")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/mass_residuals.json")
    a = ap.parse_args(argv)
    try:
        ks = [int(k) for k in a.mass.split(",") if k.strip()]
    except ValueError:
        ks = []
    if not ks or any(not 1 <= k <= len(MULTI_ORDER) for k in ks):
        raise SafediffError(f"--mass {a.mass!r}: give comma-separated numbers of values from 1 to {len(MULTI_ORDER)}")
    torch.set_num_threads(a.threads)
    model = load_pipeline(a.model)
    report = {"protocol": {"model": a.model, "model_sha256": model.base_sha256, "tokens": a.tokens,
                           "values": list(MULTI_ORDER), "purpose": "benchmark"},
              "versions": versions(), "git": git_hash(), "results": {}}
    for spec in split_specs(a.methods):
        for k in ks:
            row = measure(model, spec, k, a.tokens)
            report["results"].setdefault(spec, {})[str(k)] = row
            print(f"{spec} k={k}: median residual {row['median']:.2f}, max {row['max']:.2f}, "
                  f"fit {row['fit_seconds']:.1f} s", flush=True)
    write_json_atomic(Path(a.out), report)
    return report


if __name__ == "__main__":
    run_script(main)
