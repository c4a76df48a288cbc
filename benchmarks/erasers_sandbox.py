"""Every registered eraser on the sandbox: erase one colour (red) and one shape (triangle), measure before/after.

Protocol (sandbox model: DDIM 25 steps, CFG 5, 32x32; CPU, ``--threads`` torch threads, default 1). For each
concept, ``safediff.sandbox.benchmarks.erasure_set(concept, n_per_kind)`` (seed 0) gives four prompt kinds:
``target-word`` (a plain template with the word: the only phrasing erasers are told), ``target-synonym`` (a plain
template with a synonym the model learned but no eraser is told), ``target-heldout-template`` (the word in templates
no eraser sees) and ``non-target`` (other colours/shapes). Each prompt is generated once with its own seed, before
and after the edit, and read by the exact sandbox detectors (``safediff.detectors.sandbox.attributes``):
- target rate: the fraction of target images whose detected colour (shape) is the concept (lower is better);
- non-target accuracy: the fraction of non-target images whose detected colour (shape) is the one asked for;
- other-attribute kept: on target prompts, the fraction whose *other* attribute (the shape when erasing a colour)
  is still the one asked for;
- cost: parameters changed (tensors, values) and the wall seconds of ``fit`` on this CPU;
- floor (base row, "word removed"): the concept's rate on the target-word prompts with the word deleted, same seeds:
  the model's own rate when the prompt leaves the attribute open, i.e. what mapping the word to the guide "" can reach.

Methods: every name in ``ERASERS`` that runs on the sandbox's SD-1 UNet (``sandbox_erasers``; aliases of one class
run once) with its class's ``sandbox["benchmark"]`` settings
(the papers' iteration counts are for SD 1.4 with an 860M-parameter UNet on a GPU; the sandbox UNet has 4.3M and
each fit gets a few CPU minutes; x_t and TRCE's trajectories are sampled with 10 DDIM steps; RECE validates with the
exact sandbox validator),
plus labelled variants: ``uce-2023`` (the 2023 script's edit: the word alone, no prompt expansion, shifted padding:
the prototype's setting), ``uce-shifted`` (expanded prompts, 2023 padding pairing), ``uce-last`` (2025 token
convention, expanded prompts), ``uce+synonyms`` (synonyms given by the user, for reference only: the synonym column
is then not held out), ``rece-object-hard`` (RECE's λ_reg = 1e-3 setting for "objects hard for UCE" instead of the
"object" default 0.1), ``rece-keep`` (RECE with ``keep_erased``: the re-alignment also holds the original erase rows)
and ``trce-stage1`` (TRCE's closed-form stage alone, the paper's ablation).

Resumable: edits are kept in ``OUT.edits/`` and finished entries in the JSON; a rerun skips them. Reproduce with

    HF_HUB_OFFLINE=1 python benchmarks/erasers_sandbox.py --concepts red \
        --methods uce,rece,uce-2023,uce-shifted,uce-last,uce+synonyms
    HF_HUB_OFFLINE=1 python benchmarks/erasers_sandbox.py --concepts triangle --methods uce,rece,uce-2023
    HF_HUB_OFFLINE=1 python benchmarks/erasers_sandbox.py --concepts red \
        --methods esd-x,esd-u,esd-x-strict,trce,trce-stage1                # ~1-5 CPU-minutes each
    HF_HUB_OFFLINE=1 python benchmarks/erasers_sandbox.py            # every registered eraser and variant
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from safediff.concepts import resolve
from safediff.detectors.sandbox import attributes
from safediff.edits import Edit
from safediff.models import load_pipeline
from safediff.records import git_hash, versions
from safediff.storage import write_json_atomic
from safediff.registry import ERASERS
from safediff.sandbox.validation import eraser_settings, sandbox_erasers
from safediff.sampling import generate
from safediff.sandbox.benchmarks import erasure_set
from safediff.sandbox.world import COLOURS, SYNONYMS

VARIANTS = {  # label -> (registered eraser, settings); per-concept settings are filled in by `settings_for`
    "uce-2023": ("uce", {"expand_prompts": False, "padding": "shifted"}),
    "uce-shifted": ("uce", {"padding": "shifted"}),
    "uce-last": ("uce", {"tokens": "last"}),
    "uce+synonyms": ("uce", {"also_erase": "SYNONYMS"}),
    "rece-object-hard": ("rece", {"concept_type": "object-hard"}),
    "rece-keep": ("rece", {"keep_erased": True}),
    "trce-stage1": ("trce", {"stages": (1,)}),
}
KINDS = ("target-word", "target-synonym", "target-heldout-template")


def method_names() -> list[str]:
    """Registered erasers that run on the sandbox (aliases left out), then the labelled variants."""
    return sandbox_erasers() + list(VARIANTS)


def settings_for(label: str, concept: str) -> tuple[str, dict]:
    """The registered eraser behind a label and its settings: the class's benchmark settings (with the sandbox
    validator where the eraser takes one), then the variant's."""
    name, variant = VARIANTS.get(label, (label, {}))
    settings = {**eraser_settings(ERASERS.get(name), "benchmark", resolve(concept)), **variant}
    if settings.get("also_erase") == "SYNONYMS":
        settings["also_erase"] = tuple(SYNONYMS.get(concept, ()))
    return name, settings


def measure(model, concept: str, rows: list[dict], batch: int) -> dict:
    key = "colour" if concept in COLOURS else "shape"
    other = "shape" if key == "colour" else "colour"
    pixels = generate(model, [r["prompt"] for r in rows], [r["seed"] for r in rows], batch_size=batch,
                      progress=False).pixels
    found = attributes(pixels)
    out: dict = {}
    for kind in KINDS:
        hits = [f[key] == concept for r, f in zip(rows, found) if r["kind"] == kind]
        out[f"rate_{kind.removeprefix('target-')}"] = sum(hits) / len(hits)
    target = [(r, f) for r, f in zip(rows, found) if r["kind"] in KINDS]
    out["other_attribute_kept"] = sum(f[other] == r[other] for r, f in target) / len(target)
    non = [f[key] == r[key] for r, f in zip(rows, found) if r["kind"] == "non-target"]
    out["non_target_accuracy"] = sum(non) / len(non)
    by_other: dict[str, list[bool]] = {}
    for r, f in zip(rows, found):
        if r["kind"] in ("target-word", "target-synonym"):
            by_other.setdefault(r[other], []).append(f[key] == concept)
    out["rate_word_or_synonym_by_" + other] = {k: sum(v) / len(v) for k, v in sorted(by_other.items())}
    return out


def floor_rate(model, concept: str, rows: list[dict], batch: int) -> dict:
    """The concept's rate when the prompt does not ask for it: the target-word prompts with the word removed, same
    seeds (what mapping the word to the unconditional guide "" can at best reach)."""
    from safediff.erasers.prompts import replace_word

    key = "colour" if concept in COLOURS else "shape"
    other = "shape" if key == "colour" else "colour"
    target = [r for r in rows if r["kind"] == "target-word"]
    pixels = generate(model, [replace_word(r["prompt"], concept, "") for r in target], [r["seed"] for r in target],
                      batch_size=batch, progress=False).pixels
    found = [f[key] == concept for f in attributes(pixels)]
    by_other: dict[str, list[bool]] = {}
    for r, hit in zip(target, found):
        by_other.setdefault(r[other], []).append(hit)
    return {"all": sum(found) / len(found), f"by_{other}": {k: sum(v) / len(v) for k, v in sorted(by_other.items())}}


def fit_edit(model, label: str, concept: str, edits: Path) -> Edit:
    path = edits / f"{concept}-{label}.safetensors"
    if path.is_file():
        return Edit.load(path)
    name, settings = settings_for(label, concept)
    eraser = ERASERS.get(name)(**settings)
    start = time.perf_counter()
    edit = eraser.fit(model, resolve(concept), progress=True)
    edit.metadata["benchmark"] = {"label": label, "fit_wall_seconds": time.perf_counter() - start}
    edit.save(path)
    return edit


def markdown(results: dict) -> str:
    lines = ["| concept | method | word | synonym | held-out template | non-target acc. | other attr. kept | "
             "tensors / values changed | fit s (CPU) |", "|" + "---|" * 9]
    for concept, entries in results.items():
        for label, e in entries.items():
            m = e["metrics"]
            cost = "–" if label == "base" else f"{e['tensors_changed']} / {e['values_changed']:,}"
            secs = "–" if label == "base" else f"{e['fit_seconds']:.1f}"
            lines.append(f"| {concept} | {label} | {m['rate_word']:.0%} | {m['rate_synonym']:.0%} | "
                         f"{m['rate_heldout-template']:.0%} | {m['non_target_accuracy']:.0%} | "
                         f"{m['other_attribute_kept']:.0%} | {cost} | {secs} |")
    floors = [f"{c} {e['base']['metrics']['rate_word_removed']['all']:.0%}" for c, e in results.items()
              if "rate_word_removed" in e.get("base", {}).get("metrics", {})]
    if floors:
        lines.append(f"\nFloor (target-word prompts with the word removed, same seeds): {', '.join(floors)}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="sandbox")
    ap.add_argument("--concepts", default="red,triangle")
    ap.add_argument("--methods", default=None, help="comma-separated labels (default: all; see method_names())")
    ap.add_argument("--n-per-kind", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/erasers_sandbox.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    out = Path(a.out)
    edits = out.with_suffix(".edits")
    edits.mkdir(parents=True, exist_ok=True)
    import json

    record = json.loads(out.read_text()) if out.is_file() else {}
    results = record.get("results", {})
    model = load_pipeline(a.model)
    labels = a.methods.split(",") if a.methods else method_names()
    for concept in a.concepts.split(","):
        rows = erasure_set(concept, n_per_kind=a.n_per_kind, seed=0)
        entries = results.setdefault(concept, {})
        if "base" not in entries:
            entries["base"] = {"metrics": measure(model, concept, rows, a.batch_size)}
        if "rate_word_removed" not in entries["base"]["metrics"]:
            entries["base"]["metrics"]["rate_word_removed"] = floor_rate(model, concept, rows, a.batch_size)
        for label in labels:
            if label in entries:
                continue
            edit = fit_edit(model, label, concept, edits)
            edit.apply(model)
            try:
                metrics = measure(model, concept, rows, a.batch_size)
            finally:
                edit.revert(model)
            info = edit.metadata.get("info", {})
            entries[label] = {
                "metrics": metrics, "eraser": edit.method, "hyperparameters": edit.metadata["hyperparameters"],
                "tensors_changed": len(edit.tensors), "values_changed": sum(t.numel() for t in edit.tensors.values()),
                "fit_seconds": edit.metadata["benchmark"]["fit_wall_seconds"], "edit_sha256": edit.digest,
                "info": {k: info[k] for k in ("chosen_epoch", "validation_rates", "epochs", "reg", "rows", "prompts",
                                              "erase_words") if k in info},
            }
            print(f"{concept} {label}: {metrics}", flush=True)
            record = {"protocol": {"model": model.protocol(), "n_per_kind": a.n_per_kind, "erasure_set_seed": 0,
                                   "sampler": model.defaults, "torch_threads": torch.get_num_threads(),
                                   "device": "cpu", "versions": versions(), "git": git_hash(),
                                   "sandbox_settings": {n: ERASERS.get(n).sandbox.get("benchmark", {})
                                                        for n in sandbox_erasers()},
                                   "variants": {k: [v[0], {kk: str(vv) for kk, vv in v[1].items()}]
                                                for k, v in VARIANTS.items()}},
                      "results": results}
            write_json_atomic(out, record)
    write_json_atomic(out, {**record, "results": results})
    out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
