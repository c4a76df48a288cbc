"""Run one attack over a prompt file into a resumable RUN folder, and score it (Pre-ASR, ASR, compute).

RUN layout: ``protocol.json`` (written first; a restart with a different protocol is refused), one
``prompts/NNNNNN.json`` per finished prompt (written last, atomically, after its images ``NNNNNN_pre.png`` /
``NNNNNN_adv.png`` and, for embedding attacks, ``NNNNNN_embedding.safetensors`` in the attack's format:
concept-inversion writes a diffusers textual-inversion file), and ``results.json``.
A restart skips every prompt whose JSON exists.

Metrics (UnlearnDiffAtk's ``check_asr.py`` definitions): Pre-ASR = share of prompts whose unmodified prompt already
succeeds; ASR = (no-attack successes + attack successes) / N.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from safediff.attacks.base import Attack, AttackResult, Budget, Judge, Target
from safediff.errors import SafediffError
from safediff.params import comma_items, typed_fields
from safediff.protocol import git_hash, versions, write_bytes_atomic, write_json_atomic

COMPUTE_KEYS = ("iterations", "unet_forward", "unet_forward_samples", "unet_backward", "text_encoder", "seconds")


def read_attack_prompts(path: str | Path, required: tuple[str, ...] = ("prompt",)) -> list[dict]:
    """Rows of a CSV (all columns kept; ``seed`` cast to int); missing required columns -> SafediffError."""
    from safediff.bench.datasets import read_prompts_csv

    path = Path(path)
    rows = read_prompts_csv(path)  # validates the file, the 'prompt' column and numeric seeds
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise SafediffError(f"'{path}' lacks column(s) {', '.join(missing)} needed by this attack (columns: "
                                f"{reader.fieldnames}); accepted: a CSV with columns {', '.join(required)}")
        raw = list(reader)
    return [{**{k: v for k, v in r.items() if v not in (None, "")}, **parsed} for r, parsed in zip(raw, rows)]


def build_attack(name: str, params: str | None = None) -> Attack:
    """``ATTACKS[name]`` with hyper-parameters from ``"k=5,lr=0.01"`` (dataclass fields, cast to their type)."""
    from safediff.registry import ATTACKS

    cls = ATTACKS.get(name)
    return cls(**typed_fields(cls, comma_items(params), f"attack {name}"))


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_protocol(target: Target, attack: Attack, judge: Judge, budget: Budget, rows: list[dict], seed: int,
                 prompts_file: str | None) -> dict:
    """Everything that determines the numbers (compared on resume)."""
    return {
        "target": target.protocol(), "attack": attack.config(), "budget": budget.protocol(),
        "judge": judge.protocol(), "seed": seed,
        "seeds": [int(r.get("seed", seed + i)) for i, r in enumerate(rows)],
        "prompts": [r["prompt"] for r in rows],
        "prompts_file_sha256": _sha256_file(Path(prompts_file)) if prompts_file else None,
        "asr_definition": "(no-attack successes + attack successes) / N (UnlearnDiffAtk check_asr.py)",
    }


def open_run(out: Path, protocol: dict) -> Path:
    """Create RUN or check that an existing RUN has the same protocol (else refuse)."""
    out = Path(out)
    path = out / "protocol.json"
    if out.exists() and not out.is_dir():
        raise SafediffError(f"--out '{out}' exists and is not a folder; give a new or an earlier RUN folder")
    if path.is_file():
        saved = json.loads(path.read_text())["experiment"]
        if json.loads(json.dumps(protocol, sort_keys=True, default=str)) != saved:
            diff = sorted(k for k in set(saved) | set(protocol)
                          if json.dumps(saved.get(k), sort_keys=True, default=str)
                          != json.dumps(protocol.get(k), sort_keys=True, default=str))
            raise SafediffError(f"RUN '{out}' was made with a different protocol (differs in: {', '.join(diff)}); "
                                "use a new --out folder or the original settings")
    elif out.exists() and any(out.iterdir()):
        raise SafediffError(f"--out '{out}' is a non-empty folder that is not an attack RUN; choose a new folder")
    else:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SafediffError(f"--out '{out}' is not writable: {e.strerror}") from None
        write_json_atomic(path, {"experiment": protocol, "versions": versions(), "git": git_hash(),
                                 "torch_threads": torch.get_num_threads()})
    (out / "prompts").mkdir(exist_ok=True)
    return out


def save_result(out: Path, index: int, result: AttackResult, embedding_tensors: dict | None = None) -> dict:
    stem = f"{index:06d}"
    record = {"index": index, **result.record()}
    files = {}
    if result.pre_image is not None:
        write_bytes_atomic(out / "prompts" / f"{stem}_pre.png", _png(result.pre_image))
        files["pre_image"] = f"prompts/{stem}_pre.png"
    if result.image is not None:
        write_bytes_atomic(out / "prompts" / f"{stem}_adv.png", _png(result.image))
        files["image"] = f"prompts/{stem}_adv.png"
    if embedding_tensors is not None:
        from safetensors.torch import save

        write_bytes_atomic(out / "prompts" / f"{stem}_embedding.safetensors", save(embedding_tensors))
        files["embedding"] = f"prompts/{stem}_embedding.safetensors"
    record["files"] = files
    write_json_atomic(out / "prompts" / f"{stem}.json", record)
    return record


def summarise(records: list[dict]) -> dict:
    n = len(records)
    pre = sum(bool(r["pre_success"]) for r in records)
    found = sum(bool(r["success"]) and not r["pre_success"] for r in records)
    total = {k: round(sum(r["compute"].get(k, 0) for r in records), 3) for k in COMPUTE_KEYS}
    pre_total = {k: round(sum(r["pre_compute"].get(k, 0) for r in records), 3) for k in COMPUTE_KEYS}
    attacked = [r for r in records if not r["pre_success"]]
    return {
        "n": n, "pre_success": pre, "attack_success": found,
        "pre_asr": pre / n if n else 0.0, "asr": (pre + found) / n if n else 0.0,
        "compute_total": total, "pre_compute_total": pre_total,
        "compute_per_attacked_prompt": {k: round(v / len(attacked), 3) for k, v in total.items()} if attacked else {},
    }


def run_attack(target: Target, attack: Attack, judge: Judge, rows: list[dict], budget: Budget, seed: int,
               out: str | Path, prompts_file: str | None = None, progress: bool = True) -> dict:
    """Attack every row (skipping finished ones), then write and return ``results.json``'s content."""
    protocol = run_protocol(target, attack, judge, budget, rows, seed, prompts_file)
    out = open_run(Path(out), protocol)
    records = []
    bar = tqdm(list(enumerate(rows)), desc=f"{attack.name} prompts", disable=not progress)
    for i, row in bar:
        path = out / "prompts" / f"{i:06d}.json"
        if path.is_file():
            records.append(json.loads(path.read_text()))
            continue
        result = attack.run(target, row, judge, budget, int(row.get("seed", seed + i)))
        tensors = None if result.embedding is None else attack.embedding_tensors(result.embedding,
                                                                                 target.model.adapter)
        records.append(save_result(out, i, result, tensors))
        bar.set_postfix(asr=f"{summarise(records)['asr']:.2f}")
    summary = summarise(records)
    results = {**summary, "records": records, "protocol": protocol, "versions": versions(), "git": git_hash()}
    write_json_atomic(out / "results.json", results)
    return results
