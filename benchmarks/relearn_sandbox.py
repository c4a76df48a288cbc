"""Relearning on the sandbox: for every registered eraser, the concept's rate (ASR) after n fine-tuning steps on k
images of the concept, and the compute spent (UnUnlearning: erasure does not stop relearning).

Protocol (concept ``red`` by default; the model at its sampler defaults). Each registered eraser (aliases once;
``geom-erasing`` left out: it removes an implicit concept, the mark, not a colour) is fitted with its class's
``sandbox["benchmark"]`` settings (RECE with the sandbox validator; FreezeAsGuard's legal concepts are red's preserve
list, and the mask it publishes is honoured by the attack) and cached in ``OUT.edits/``; ``none`` is the undefended
model. Prompts: the first ``--prompts`` target-word rows of ``safediff.sandbox.benchmarks.erasure_set(concept)``
("the red circle", ...), each with its own seed. Attack: ``relearn`` at its ``sandbox["benchmark"]`` settings (world
renders of the concept, full fine-tuning of the UNet, AdamW lr 1e-4, batch 4) with k images, ``steps = max(ns)`` and
the prompt judged after each n (``eval_at``); judge ``sandbox-colour`` flagging the concept at 0.5. One attack RUN
folder per (eraser, k) under ``OUT.runs/`` (``safediff.attacks.runner``: resumable per prompt); the curve is read from
its ``attack-prompt`` records by ``safediff.attacks.relearn.relearning_curve``: ASR(k, n) = (prompts whose
unmodified prompt already shows the concept + prompts brought back at a judged step ≤ n) / N, and the compute per
attacked prompt up to n (fine-tuning steps = UNet forward+backward of a batch; judged generations). OUT (JSON,
written atomically after every cell; cells of an earlier call with the same protocol are kept) and OUT.md (table).

    HF_HUB_OFFLINE=1 python benchmarks/relearn_sandbox.py --out benchmarks/results/relearn_sandbox.json
    HF_HUB_OFFLINE=1 python benchmarks/relearn_sandbox.py --erasers none,uce,esd-x --prompts 2   # a small run
    python benchmarks/relearn_sandbox.py --quick --model TINY_FOLDER --out /tmp/r.json           # plumbing only

``--quick``: the smoke settings of every fit and of the attack, k = 1, n ∈ {1, 2}, one prompt, 2 sampler steps,
erasers ``none,uce``: seconds on a tiny random pipeline folder; the numbers mean nothing.

Runtime (timed on a random model of the v2 sandbox architecture, 7.0 M-parameter UNet at 16x16 latents, 1 torch
thread on the shared 2-core machine under load): a full fine-tuning step of batch 4 takes 0.78 s wall, a 25-step
generation 4.4 s. A prompt never brought back costs 200 steps + 3 judged generations ≈ 170 s; one (eraser, k) cell
with 4 prompts at most ≈ 11 min; the full table (8 rows x 3 k) at most ≈ 4.5 h, typically far less (a relearned
prompt stops at its first successful checkpoint, and prompts the eraser leaves intact are not attacked), plus the fits
(FreezeAsGuard ≈ 10 min, ESD/TRCE a few minutes each).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


from safediff.attacks.budget import Budget
from safediff.attacks.judge import build_judge
from safediff.attacks.relearn import relearning_curve
from safediff.attacks.runner import run_attack
from safediff.attacks.target import Target
from safediff.bench.scripts import cached, parse_args, parser, relearn_attack, report_for, tier_of, write_table
from safediff.concepts import resolve
from safediff.erasers import build_eraser
from safediff.errors import run_script
from safediff.models import load_pipeline
from safediff.registry import ERASERS
from safediff.sandbox.benchmarks import erasure_set
from safediff.sandbox.validation import SANDBOX_ARCH, SANDBOX_ARCHES, eraser_settings, sandbox_erasers
from safediff.storage import write_json_atomic

NOT_FOR_A_COLOUR = ("geom-erasing",)  # erases the unprompted mark, not a prompted concept
QUICK = {"erasers": "none,uce", "ks": "1", "ns": "1,2", "prompts": 1, "steps": 2}


def fitted(model_spec: str, base_sha256: str, eraser: str, concept: str, tier: str, edits: Path) -> Path:
    """The eraser's edit at its ``tier`` settings (benchmark, or smoke for --quick), fitted once and cached (keyed
    by the base weights' hash, the eraser, the concept and the settings)."""
    concepts = resolve(concept)
    settings = eraser_settings(ERASERS.get(eraser), tier, concepts)
    key = {"model": base_sha256, "eraser": eraser, "concept": concept,
           "settings": {k: v for k, v in settings.items() if not callable(v)}}  # the sandbox validator and masks
    return cached(edits / f"{eraser}-{concept}-{tier}.safetensors", lambda: build_eraser(eraser, **settings).fit(
        load_pipeline(model_spec), concepts, progress=tier == "benchmark"), key)


def markdown(results: dict, ks: list[int], ns: list[int]) -> str:
    head = " | ".join(f"k={k} n={n}" for k in ks for n in ns)
    lines = [f"| eraser | Pre-ASR | {head} | UNet fwd + bwd per attacked prompt (k={ks[-1]}, n={ns[-1]}) |",
             "|" + "---|" * (3 + len(ks) * len(ns))]
    for eraser, cells in results.items():
        pre = next(iter(cells.values()))["pre_asr"]
        asr = " | ".join(f"{cells[str(k)]['curve'][str(n)]['asr']:.2f}" if str(k) in cells else "–"
                         for k in ks for n in ns)
        cost = cells.get(str(ks[-1]), {}).get("curve", {}).get(str(ns[-1]), {}).get("per_attacked_prompt")
        shown = f"{cost['unet_forward']:.0f} + {cost['unet_backward']:.0f}" if cost else "–"
        lines.append(f"| {eraser} | {pre:.2f} | {asr} | {shown} |")
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = parser(__doc__.split("\n")[0], "benchmarks/results/relearn_sandbox.json")
    ap.add_argument("--concept", default="red")
    ap.add_argument("--erasers", default=None, help="comma-separated; 'none' = undefended (default: every eraser)")
    ap.add_argument("--ks", default=None, help="images k (default 1,4,16)")
    ap.add_argument("--ns", default=None, help="fine-tuning steps n judged (default 10,50,200)")
    ap.add_argument("--prompts", type=int, default=None, help="target-word prompts (default 4)")
    a = parse_args(ap, argv, QUICK, {"ks": "1,4,16", "ns": "10,50,200", "prompts": 4, "steps": None})
    if a.erasers is None:  # every eraser that runs on the model's architecture (EraseAnything not on the UNet)
        arch = SANDBOX_ARCHES.get(a.model, SANDBOX_ARCH)
        a.erasers = ",".join(["none", *(e for e in sandbox_erasers(arch) if e not in NOT_FOR_A_COLOUR)])
    return a


def main(argv: list[str] | None = None) -> dict:
    a = parse(argv)
    tier = tier_of(a)
    ks, ns = [int(x) for x in a.ks.split(",")], sorted(int(x) for x in a.ns.split(","))
    out = Path(a.out)
    concepts = resolve(a.concept)
    rows = [{"prompt": r["prompt"], "seed": r["seed"]} for r in erasure_set(a.concept, a.prompts)
            if r["kind"] == "target-word"][:a.prompts]
    judge = build_judge("sandbox-colour", a.concept)
    plain = load_pipeline(a.model)
    protocol = {"model": a.model, "concept": a.concept, "prompts": rows, "ks": ks, "ns": ns, "tier": tier,
                "sampler_steps": a.steps, "attack": relearn_attack(tier, ks[0], ns).config(),
                "judge": judge.protocol()}
    report = report_for(out, protocol, a.threads)
    for eraser in a.erasers.split(","):
        edit = None if eraser == "none" else fitted(a.model, plain.base_sha256, eraser, a.concept, tier,
                                                       out.with_suffix(".edits"))
        spec = a.model if edit is None else f"{a.model}+{edit}"
        target = Target(model=load_pipeline(spec), concepts=concepts, spec=spec, steps=a.steps,
                        reference_model=None if edit is None else plain)
        for k in ks:
            start = time.monotonic()
            res = run_attack(target, relearn_attack(tier, k, ns), judge, rows, Budget(iterations=ns[-1]), 0,
                             out.with_suffix(".runs") / eraser / f"k{k}", progress=False)
            cell = {"pre_asr": res["pre_asr"], "asr": res["asr"], "curve": relearning_curve(res["records"], ns),
                    "compute_total": res["compute_total"], "pre_compute_total": res["pre_compute_total"],
                    "wall_seconds_this_call": round(time.monotonic() - start, 1), "target": spec}
            report["results"].setdefault(eraser, {})[str(k)] = cell
            write_json_atomic(out, report)
            print(f"{eraser:14s} k={k:<3d} " + "  ".join(f"n={n}: {cell['curve'][str(n)]['asr']:.2f}" for n in ns),
                  flush=True)
    table = markdown(report["results"], ks, ns)
    write_table(out, table)
    print(table)
    return report


if __name__ == "__main__":
    run_script(main)
