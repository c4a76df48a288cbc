"""``safediff detect-backdoor``: score every prompt of a file for a backdoor trigger, fitted on a few clean prompts.

Writes one record of kind ``backdoor-detection`` (``safediff.records``): the model and detector protocols, the clean
prompts' file and digest, the threshold (the detector's quantile of the benign scores), one entry per prompt (prompt,
seed, score, verdict, and its label when the file has a ``triggered`` column of 0/1, which adds AUROC and accuracy),
and the compute per prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from safediff import cli_inputs as check
from safediff.errors import SafediffError


def read_rows(path: Path, seed: int, labelled: bool = True) -> tuple[list[dict], list[int] | None]:
    """Rows with their seeds (the row's, else ``seed + i``) and, when every row has one, the 0/1 labels."""
    from safediff.bench.datasets import read_prompts_csv

    rows = read_prompts_csv(path)
    for i, r in enumerate(rows):
        r["seed"] = int(r.get("seed", seed + i))
    if not labelled or not any("triggered" in r for r in rows):
        return rows, None
    labels = [r.get("triggered", "").strip() for r in rows]
    bad = next((i for i, v in enumerate(labels) if v not in ("0", "1")), None)
    if bad is not None:
        raise SafediffError(f"{path}: row {bad + 1} has triggered={labels[bad]!r}; the column holds 0 or 1 on every "
                            "row")
    return rows, [int(v) for v in labels]


def detection_record(detector, model, rows: list[dict], labels: list[int] | None, benign: list[dict],
                     prompts: Path, clean: Path) -> dict:
    """Fit ``detector`` on ``benign`` rows, score ``rows`` on ``model`` and return the ``backdoor-detection``
    record (metrics when ``labels`` are given; AUROC when both labels occur)."""
    from safediff.backdoors.detect import accuracy, auroc, detect
    from safediff.hashing import file_sha256
    from safediff.records import record

    found = detect(detector, model, benign, rows)
    entries = [{"prompt": r["prompt"], "seed": r["seed"], "score": s, "flagged": f}
               for r, s, f in zip(rows, found.scores, found.flagged)]
    metrics = None
    if labels is not None:
        for e, y in zip(entries, labels):
            e["triggered"] = y
        metrics = {"accuracy": accuracy(found.flagged, labels)}
        if 0 < sum(labels) < len(labels):
            metrics["auroc"] = auroc(found.scores, labels)
    return record(
        "backdoor-detection", model=model.protocol(), detector=detector.config(), threshold=found.threshold,
        clean={"file": str(clean), "sha256": file_sha256(clean), "n": len(benign), "scores": found.benign_scores},
        prompts_file={"file": str(prompts), "sha256": file_sha256(prompts)}, rows=entries, metrics=metrics,
        cost_per_prompt=found.cost_per_prompt)


def detect_backdoor(
    model: str = typer.Option(..., help="'sandbox', a hub id or a local folder; SPEC+EDIT applies edits (e.g. a "
                                        "suspected backdoor)."),
    prompts: Path = typer.Option(..., help="CSV with a 'prompt' column (optional seed; optional triggered = 0/1 "
                                           "labels, which add AUROC and accuracy)."),
    clean: Path = typer.Option(..., help="CSV of a few clean prompts the detector is fitted on (optional seed)."),
    method: str = typer.Option("set", help="Detector NAME[:KEY=VALUE,...]: set, attention-stats, seed-diversity."),
    seed: int = typer.Option(0, help="Seed of row i when the file gives none: seed + i."),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("float32"),
    out: Path = typer.Option(..., help="JSON record to write (a new file)."),
    steps: Optional[int] = typer.Option(None, help="Denoising steps probed (default: the detector's)."),
):
    """Score prompts for backdoor triggers (SET or a baseline) and record a score per prompt."""
    from safediff.backdoors.detect import build_backdoor_detector
    from safediff.models import load_pipeline
    from safediff.storage import check_writable, write_json_atomic

    for value, what in ((model, "--model"), (method, "--method")):
        check.text(value, what)
    check.seed(seed)
    if out.exists():
        raise SafediffError(f"--out '{out}' exists; choose a new file")
    check_writable(out)
    detector = build_backdoor_detector(method, **({} if steps is None else {"steps": steps}))
    rows, labels = read_rows(prompts, seed)
    benign, _ = read_rows(clean, seed, labelled=False)
    m = load_pipeline(model, device=check.device(device), dtype=check.dtype(dtype))
    rec = detection_record(detector, m, rows, labels, benign, prompts, clean)
    write_json_atomic(out, rec)
    metrics = rec["metrics"]
    shown = "" if metrics is None else " " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())
    typer.echo(f"{detector.name}: {sum(r['flagged'] for r in rec['rows'])} of {len(rows)} prompt(s) flagged at "
               f"threshold {rec['threshold']:.4g}{shown}; wrote {out}")
