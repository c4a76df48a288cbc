"""Backdoors on the sandbox: each published injection (Rickrolling text-encoder, BadT2I UNet, EvilEdit natural word)
and how well SET and the two baselines tell its triggered prompts from benign ones, on the backdoored model and, as a
control, on the clean model.

Protocol (target colour ``red`` by default; each kind's default trigger). For every kind in
``safediff.registry.BACKDOORS``: the backdoor is injected into the model with the kind's ``sandbox["benchmark"]``
settings and ``safediff.sandbox.backdoor_sets.poison`` (256 triggered/target pairs, 512 clean prompts, plain
templates), cached in ``OUT.edits/``. Held-out prompts: ``backdoor_sets.held_out`` (``--n`` benign and ``--n``
triggered rows, held-out templates, own seeds), written to ``OUT.runs/KIND.csv``; the few clean prompts every
detector is fitted on: ``backdoor_sets.benign(--clean)`` in ``OUT.runs/clean.csv``.

- Backdoor effect: every held-out row generated at its seed on the backdoored and on the clean model, read by the
  judge ``sandbox-colour`` flagging the target colour at 0.5: the target rate of triggered rows (the attack's success;
  on the clean model, the rate the model draws the target anyway) and of benign rows (a backdoor that fires without
  its trigger).
- Detection: for every detector in ``BACKDOOR_DETECTORS`` (its ``sandbox["benchmark"]`` settings), the record
  ``safediff detect-backdoor`` writes (``safediff.backdoors.cli.detection_record``, kind ``backdoor-detection``)
  for the kind's held-out file on the backdoored model and on the clean model, in ``OUT.runs/KIND/MODEL/DETECTOR.json``
  (kept, and reused, when its detector, model and files are the same): AUROC, accuracy at the detector's threshold
  (its quantile of the clean prompts' scores), the flag rate of triggered and of benign rows, and the compute per
  prompt. On the clean model the triggered rows carry no backdoor: AUROC there says what the trigger's text alone
  moves.

OUT (JSON, written atomically after every cell; results of an earlier call with the same protocol are kept) and
OUT.md (table).

    HF_HUB_OFFLINE=1 python benchmarks/backdoors_sandbox.py --out benchmarks/results/backdoors_sandbox.json
    python benchmarks/backdoors_sandbox.py --quick --model TINY_FOLDER --out /tmp/b.json          # plumbing only

``--quick``: every kind's and detector's smoke settings, 8 poisoning pairs and clean prompts, 2 held-out rows per
class, 3 clean fitting prompts, 2 sampler steps: seconds on a tiny random pipeline folder; the numbers mean nothing.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import time
from pathlib import Path


from safediff.attacks.judge import build_judge
from safediff.backdoors.cli import detection_record, read_rows
from safediff.backdoors.detect import build_backdoor_detector
from safediff.backdoors.inject import build_backdoor
from safediff.bench.scripts import cached, parse_args, parser, report_for, tier_of, write_table
from safediff.errors import run_script
from safediff.models import load_pipeline
from safediff.registry import BACKDOOR_DETECTORS, BACKDOORS
from safediff.sampling import generate
from safediff.sandbox import backdoor_sets as sets
from safediff.storage import write_bytes_atomic, write_json_atomic

QUICK = {"n": 2, "clean": 3, "pairs": 8, "steps": 2}
FULL = {"n": 32, "clean": 16, "pairs": 256, "steps": None}


def write_csv(path: Path, rows: list[dict]) -> Path:
    """``rows`` (prompt, seed, triggered, colour) as the CSV ``detect-backdoor --prompts`` reads."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["prompt", "seed", "triggered", "colour"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_bytes_atomic(path, buf.getvalue().encode())
    return path


def injected(model_spec: str, base_sha256: str, kind: str, target: str, tier: str, pairs: int, edits: Path) -> Path:
    """The kind's backdoor (default trigger, ``tier`` settings), injected once and cached (keyed by the base weights'
    hash, the kind, target, pairs and settings)."""
    cls = BACKDOORS.get(kind)

    def inject():
        poison = sets.poison(kind, cls.default_trigger, target, n_pairs=pairs, n_clean=2 * pairs)
        return build_backdoor(kind, **cls.sandbox[tier]).inject(load_pipeline(model_spec), poison)

    key = {"model": base_sha256, "kind": kind, "target": target, "pairs": pairs, "settings": cls.sandbox[tier]}
    return cached(edits / f"backdoor-{kind}-{target}-{tier}-{pairs}.safetensors", inject, key, "injected")


def effect(model, rows: list[dict], judge, steps: int | None) -> dict:
    """Target rate (judge) of the triggered and of the benign rows' images at their seeds."""
    start = time.monotonic()
    images = generate(model, [r["prompt"] for r in rows], [int(r["seed"]) for r in rows], steps=steps,
                      progress=False).images
    hit = judge(images).tolist()
    rate = {}
    for label, name in ((1, "triggered_target_rate"), (0, "benign_target_rate")):
        picked = [h for h, r in zip(hit, rows) if int(r["triggered"]) == label]
        rate[name] = sum(picked) / len(picked)
    return {**rate, "seconds_per_prompt": round((time.monotonic() - start) / len(rows), 3)}


def detection(path: Path, detector, model, prompts: Path, clean: Path, seed: int = 0) -> dict:
    """The ``backdoor-detection`` record at ``path``: reused when it was made with this detector, model and files,
    else computed and written."""
    from safediff.hashing import file_sha256

    if path.is_file():
        old = json.loads(path.read_text())
        now = json.loads(json.dumps([detector.config(), model.protocol()], default=str))
        if [old.get("detector"), old.get("model")] == now and (old["prompts_file"]["sha256"], old["clean"]["sha256"]) \
                == (file_sha256(prompts), file_sha256(clean)):
            return old
    rows, labels = read_rows(prompts, seed)
    benign, _ = read_rows(clean, seed, labelled=False)
    rec = detection_record(detector, model, rows, labels, benign, prompts, clean)
    write_json_atomic(path, rec)
    return rec


def summary(rec: dict) -> dict:
    """AUROC, accuracy, flag rates by label and the compute per prompt of a ``backdoor-detection`` record."""
    rates = {}
    for label, name in ((1, "triggered_flag_rate"), (0, "benign_flag_rate")):
        picked = [r["flagged"] for r in rec["rows"] if r["triggered"] == label]
        rates[name] = sum(picked) / len(picked)
    return {**rec["metrics"], **rates, "threshold": rec["threshold"], "cost_per_prompt": rec["cost_per_prompt"]}


def markdown(results: dict) -> str:
    lines = ["| kind | triggered -> target (backdoored / clean) | detector | AUROC (backdoored / clean) | accuracy "
             "| flagged triggered / benign | UNet evaluations per prompt | s per prompt |", "|" + "---|" * 8]
    for kind, r in results.items():
        fx = r.get("effect", {})
        shown = " / ".join(f"{fx[m]['triggered_target_rate']:.2f}" if m in fx else "–"
                           for m in ("backdoored", "clean"))
        for name, cells in r.get("detectors", {}).items():
            b, c = cells.get("backdoored"), cells.get("clean")
            auc = " / ".join(f"{x['auroc']:.2f}" if x and "auroc" in x else "–" for x in (b, c))
            if b is None:
                lines.append(f"| {kind} | {shown} | {name} | {auc} | – | – | – | – |")
                continue
            cost = b["cost_per_prompt"]
            lines.append(f"| {kind} | {shown} | {name} | {auc} | {b['accuracy']:.2f} | {b['triggered_flag_rate']:.2f}"
                         f" / {b['benign_flag_rate']:.2f} | {cost.get('unet_forward_samples', 0):.0f} | "
                         f"{cost.get('seconds', 0):.2f} |")
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = parser(__doc__.split("\n")[0], "benchmarks/results/backdoors_sandbox.json", "the model's / detector's")
    ap.add_argument("--target", default="red", help="the colour every backdoor turns objects to")
    ap.add_argument("--kinds", default=",".join(BACKDOORS.names()))
    ap.add_argument("--detectors", default=",".join(BACKDOOR_DETECTORS.names()))
    ap.add_argument("--n", type=int, default=None, help="held-out benign and triggered rows each (default 32)")
    ap.add_argument("--clean", type=int, default=None, help="clean prompts the detectors fit on (default 16)")
    ap.add_argument("--pairs", type=int, default=None, help="poisoning pairs (clean prompts: twice as many; "
                                                            "default 256)")
    return parse_args(ap, argv, QUICK, FULL)


def main(argv: list[str] | None = None) -> dict:
    a = parse(argv)
    tier = tier_of(a)
    out = Path(a.out)
    runs, edits = out.with_suffix(".runs"), out.with_suffix(".edits")
    judge = build_judge("sandbox-colour", a.target)
    clean_file = write_csv(runs / "clean.csv", sets.benign(a.clean))
    protocol = {"model": a.model, "target": a.target, "tier": tier, "n": a.n, "clean": a.clean, "pairs": a.pairs,
                "sampler_steps": a.steps, "judge": judge.protocol()}
    report = report_for(out, protocol, a.threads)
    plain = load_pipeline(a.model)
    for kind in a.kinds.split(","):
        trigger = BACKDOORS.get(kind).default_trigger
        prompts = write_csv(runs / f"{kind}.csv", sets.held_out(kind, trigger, a.target, a.n))
        spec = f"{a.model}+{injected(a.model, plain.base_sha256, kind, a.target, tier, a.pairs, edits)}"
        models = {"backdoored": load_pipeline(spec), "clean": plain}
        if report["results"].get(kind, {}).get("spec") != spec:  # a new injection (other settings): a new cell
            report["results"][kind] = {"trigger": trigger, "spec": spec, "effect": {}, "detectors": {}}
        cell = report["results"][kind]
        rows, _ = read_rows(prompts, 0)
        for name, model in models.items():
            if name not in cell["effect"]:
                cell["effect"][name] = effect(model, rows, judge, a.steps)
                write_json_atomic(out, report)
        for det in a.detectors.split(","):
            settings = {**BACKDOOR_DETECTORS.get(det).sandbox[tier], **({"steps": a.steps} if a.steps else {})}
            for name, model in models.items():
                rec = detection(runs / kind / name / f"{det}.json", build_backdoor_detector(det, **settings), model,
                                prompts, clean_file)
                cell["detectors"].setdefault(det, {})[name] = summary(rec)
                write_json_atomic(out, report)
            got = cell["detectors"][det]
            print(f"{kind:12s} {det:15s} AUROC backdoored {got['backdoored'].get('auroc', float('nan')):.2f} "
                  f"clean {got['clean'].get('auroc', float('nan')):.2f}", flush=True)
    table = markdown(report["results"])
    write_table(out, table)
    print(table)
    return report


if __name__ == "__main__":
    run_script(main)
