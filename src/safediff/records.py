"""One record layout for every output safediff writes, and one ``provenance()``.

Every JSON record (a generation folder's ``protocol.json``, a bench or attack run's ``protocol.json`` and
``results.json``, an attack prompt's record, an edit's metadata, the demo's plan and summary, the report's marker, a
backdoor detection) is a dict with

    kind            what it is (``KINDS``)
    schema_version  ``SCHEMA_VERSION``; bumped on any breaking change of a kind's layout
    identity        (run records) everything that determines the numbers: compared when a run is resumed
    provenance      how and where it was made: package and library versions, the safediff commit, Python, torch
                    threads, time; never compared (it is not part of what the numbers depend on beyond ``identity``)

plus the kind's own fields, listed by the TypedDicts below (after lm-evaluation-harness' ``result_schema.py``).
``read_record`` checks kind and version and says in one line what is wrong.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import platform
import subprocess
from pathlib import Path
from typing import Any, TypedDict

from safediff.errors import SafediffError

SCHEMA_VERSION = 2
PACKAGES = ("torch", "diffusers", "transformers", "safetensors", "accelerate", "numpy", "pillow")


def versions() -> dict:
    import safediff

    out = {"safediff": safediff.__version__, "python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = None
    return out


def git_hash() -> str | None:
    """The commit of the safediff checkout in use (None for an installed wheel), '+dirty' when modified."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def provenance() -> dict:
    """How and where a record was made (CPU float reductions depend on the thread count, so it is recorded)."""
    import torch

    return {"versions": versions(), "git": git_hash(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def record(kind: str, **fields) -> dict:
    """A record of ``kind`` with the given fields and this process's provenance."""
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}")
    return {"kind": kind, "schema_version": SCHEMA_VERSION, **fields, "provenance": provenance()}


def read_record(path: str | Path, kinds: tuple[str, ...]) -> dict:
    """A record of one of ``kinds`` from a JSON file; anything else -> SafediffError in one line."""
    path = Path(path)
    if not path.is_file():
        raise SafediffError(f"'{path}' not found")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise SafediffError(f"'{path}' is not valid JSON (damaged?)") from None
    return check_record(data, kinds, str(path))


def check_record(data: Any, kinds: tuple[str, ...], where: str) -> dict:
    if not isinstance(data, dict) or data.get("kind") not in kinds:
        got = data.get("kind") if isinstance(data, dict) else type(data).__name__
        raise SafediffError(f"'{where}' is not a safediff {' or '.join(kinds)} record (kind {got!r})")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise SafediffError(f"'{where}' has record schema version {data.get('schema_version')}; this safediff "
                            f"reads version {SCHEMA_VERSION} (rerun the command that made it)")
    schema = SCHEMAS.get(data["kind"])
    missing = sorted(k for k in (schema.__annotations__ if schema else ()) if k not in data)
    if missing:
        raise SafediffError(f"'{where}' is a damaged {data['kind']} record (missing {', '.join(missing)}); rerun the "
                            "command that made it")
    return data


# ---------------------------------------------------------------------------------------------------- schemas --

class Provenance(TypedDict):
    versions: dict[str, str | None]
    git: str | None
    torch_threads: int
    platform: str
    created: str


class GenerationRecord(TypedDict):
    """``generate --out DIR``: DIR/protocol.json."""

    kind: str  # "generation"
    schema_version: int
    model: dict  # Model.protocol(): spec, architecture, base weights sha256, edits, dtype
    generation: dict  # steps, guidance, size, eta, negative prompt, scheduler + config, guard config
    images: list[dict]  # file, prompt, seed
    device: str
    provenance: Provenance


class BenchRunRecord(TypedDict):
    """A bench run folder's protocol.json."""

    kind: str  # "bench-run"
    schema_version: int
    identity: dict  # benchmark (rows hash), worker (model, guard, detectors, generation), run, libraries
    provenance: Provenance


class BenchResults(TypedDict):
    """A bench run's results.json (``safediff.bench.results``)."""

    kind: str  # "bench-results"
    schema_version: int
    method: str
    benchmark: dict
    results: dict[str, dict[str, dict]]
    higher_is_better: dict[str, bool]
    configs: dict
    versions: dict
    n_samples: dict
    samples: list[dict]
    identity: dict  # what protocol.json holds: the numbers follow from it
    provenance: Provenance


class AttackRunRecord(TypedDict):
    """An attack run folder's protocol.json."""

    kind: str  # "attack-run"
    schema_version: int
    identity: dict  # target, attack, budget, judge, seeds, prompts, ASR definition
    provenance: Provenance


class AttackPromptRecord(TypedDict):
    """RUN/prompts/NNNNNN.json: one attacked prompt."""

    kind: str  # "attack-prompt"
    schema_version: int
    index: int
    prompt: str
    seed: int
    adversarial_prompt: str | None
    pre_success: bool
    success: bool
    compute: dict
    pre_compute: dict
    files: dict[str, str]
    provenance: Provenance


class AttackResults(TypedDict):
    """An attack run's results.json."""

    kind: str  # "attack-results"
    schema_version: int
    n: int
    pre_asr: float
    asr: float
    records: list[dict]
    identity: dict
    provenance: Provenance


class EditRecord(TypedDict):
    """An edit's metadata (the safetensors header of ``Edit.save``)."""

    kind: str  # "edit"
    schema_version: int
    method: str
    paper: str
    hyperparameters: dict
    concepts: list[dict]
    base_weights_sha256: str
    parents: list[str]
    edit_sha256: str  # digest of the tensors, checked on load
    provenance: Provenance


class DemoPlan(TypedDict):
    kind: str  # "demo-plan"
    schema_version: int
    identity: dict  # the stages, sizes and method settings
    provenance: Provenance


class DemoSummary(TypedDict):
    kind: str  # "demo-summary"
    schema_version: int
    report: str
    methods: list[dict]
    attack: dict
    provenance: Provenance


class BackdoorDetectionRecord(TypedDict):
    """``detect-backdoor --out FILE``: a score per prompt (``safediff.backdoors``)."""

    kind: str  # "backdoor-detection"
    schema_version: int
    model: dict  # Model.protocol(): spec, weights, edits (a suspected backdoor is one)
    detector: dict  # name, paper, options
    threshold: float  # the detector's quantile of the clean prompts' scores
    clean: dict  # file, sha256, n, scores
    prompts_file: dict  # file, sha256
    rows: list[dict]  # prompt, seed, score, flagged (and triggered: the label, when given)
    metrics: dict | None  # accuracy (and auroc) when the prompts are labelled
    cost_per_prompt: dict  # UNet calls and samples, text encodings, seconds
    provenance: Provenance


KINDS = ("generation", "bench-run", "bench-results", "attack-run", "attack-prompt", "attack-results", "edit",
         "demo-plan", "demo-summary", "report", "backdoor-detection")

SCHEMAS = {"generation": GenerationRecord, "bench-run": BenchRunRecord, "bench-results": BenchResults,
           "attack-run": AttackRunRecord, "attack-prompt": AttackPromptRecord, "attack-results": AttackResults,
           "demo-plan": DemoPlan, "demo-summary": DemoSummary,
           "backdoor-detection": BackdoorDetectionRecord}  # edits are checked by their digest instead
