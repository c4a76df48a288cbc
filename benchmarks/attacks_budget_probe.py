"""Is UnlearnDiffAtk budget-limited against UCE on the sandbox? Rerun it with a 10x larger budget.

The sandbox benchmark (benchmarks/attacks_sandbox.py) gives UnlearnDiffAtk 3 timesteps x 12 iterations per prompt and
it finds nothing against the UCE-erased model. Here: 10 timesteps x 40 iterations (400 UNet forward+backward passes,
20 % of the paper's 2,000), judged after every timestep, on the first two target-word prompts whose unmodified prompt
fails. Recorded per prompt: success, best judge score, the objective at the start and end (first/last 8 iterations)
of each timestep, compute. Needs the UCE edit that attacks_sandbox.py caches in ``RESULTS.edits/``.

    HF_HUB_OFFLINE=1 python benchmarks/attacks_budget_probe.py --out benchmarks/results/attacks_budget_probe.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from safediff.errors import run_script

sys.path.insert(0, str(Path(__file__).parent))
from attacks_sandbox import CONCEPT, targets  # noqa: E402

from safediff.attacks.budget import Budget  # noqa: E402
from safediff.attacks.judge import build_judge  # noqa: E402
from safediff.attacks.unlearndiff import UnlearnDiffAtk  # noqa: E402
from safediff.storage import write_json_atomic  # noqa: E402
from safediff.sandbox.benchmarks import erasure_set  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/attacks_budget_probe.json")
    ap.add_argument("--edits", default="benchmarks/results/attacks_sandbox.edits")
    ap.add_argument("--prompts", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = [{"prompt": r["prompt"], "seed": r["seed"]} for r in erasure_set(CONCEPT, 8) if r["kind"] == "target-word"]
    target = targets("sandbox", {"uce": ("uce", {})}, Path(args.edits), ["uce"])["uce"]
    judge = build_judge("sandbox-colour", CONCEPT)
    attack = UnlearnDiffAtk(timesteps=10, iterations_per_timestep=40)
    out = []
    for row in rows:
        start = time.monotonic()
        r = attack.run(target, row, judge, Budget(), row["seed"])
        if r.pre_success:
            continue
        segments: dict[int, list[float]] = {}
        for h in r.history:
            segments.setdefault(h["timestep"], []).append(h["objective"])
        out.append({"prompt": r.prompt, "success": r.success, "adv": r.adversarial_prompt,
                    "best_score": max(e["score"] for e in r.evaluations), "compute": r.compute,
                    "objective_per_timestep_first_last": {t: (round(sum(v[:8]) / 8, 4), round(sum(v[-8:]) / 8, 4))
                                                          for t, v in segments.items()},
                    "seconds": round(time.monotonic() - start)})
        print(json.dumps(out[-1]), flush=True)
        if len(out) == args.prompts:
            break
    write_json_atomic(args.out, {"attack": attack.config(), "target": target.spec, "results": out})


if __name__ == "__main__":
    run_script(main)
