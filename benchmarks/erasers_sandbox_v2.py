"""Registered erasers (and guards) on the sandbox v2 erasure sets: target rates by kind, what is kept, fit time.

For each method and each target, one fit and one benchmark run through the project's runner:

- a sandbox value (``--values red,triangle``): erase it, bench ``sandbox-erase-<value>@N`` (``--n-per-kind`` N rows
  per kind: the value by its word in plain templates, by a synonym, in held-out templates, by an implicit phrase,
  in two-object scenes; neighbouring values, far values, prompts that leave the axis open);
- a mass-erasure size (``--mass 1,5,10,20``): erase the first k values of ``sandbox.benchmarks.MULTI_ORDER`` at
  once, bench ``sandbox-erase-k<k>`` (4 rows per kind and erased value, 64 rows naming kept values only).

Methods (``--methods``, default every registered eraser): a registered eraser is fitted with its class's
``sandbox[--purpose]`` settings (default ``benchmark``: a few CPU-minutes each on the sandbox UNet), the sandbox
validator when it takes one (RECE) and the exact mask provider when it takes one (MACE), through
``sandbox.validation.eraser_settings``; the edit is saved and benched as ``MODEL+EDIT``. A registered guard (e.g.
``adavd``) is benched at its ``sandbox_preset`` with the target's concepts, nothing fitted, except the edit of a guard
that applies an eraser's edit (``edit_from``: SPM's membrane, fitted as that eraser's row is, and counted in its fit
seconds); ``guard:NAME`` names the guard where an eraser has the same name (``guard:spm``). ``base`` is the model
alone. The sandbox metrics (``sandbox.metrics``) are read from each run's results: ``sandbox/target_rate`` (overall
and ``/kind=...``; lower is better), ``sandbox/kept_rate/kind=neighbour|far|other-attribute|kept`` and
``sandbox/other_object_kept`` (higher is better), with the fit's seconds (``Edit`` metadata: the wall time of
``compute``; a fit resumed from its checkpoint counts the resumed part only).

Resumable: edits are kept in ``OUT/edits/<method>-<target>.safetensors`` (iterative fits checkpoint beside them and
resume), runs in ``OUT/runs/<method>-<target>/`` (the runner resumes them), finished entries in ``OUT/results.json``;
a rerun skips what is done. Jobs on different methods may share an ``OUT`` (each entry is merged into the file as it
is then). ``OUT/results.md`` is the table. The results record the protocol (model and its weights'
sha256, set size, steps, purpose); an ``OUT`` made with another protocol (or other weights) is refused:

    HF_HUB_OFFLINE=1 python benchmarks/erasers_sandbox_v2.py --methods base,speed,concept-prune,mace,realera,adavd \\
        --values red,triangle,outlined --n-per-kind 16
    HF_HUB_OFFLINE=1 python benchmarks/erasers_sandbox_v2.py --methods base,speed,mace,realera,uce --mass 1,5,10,20
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from safediff.errors import run_script

KINDS = ("target-word", "target-synonym", "target-heldout-template", "target-implicit", "two-object")
KEPT = ("neighbour", "far", "other-attribute", "kept")


@dataclass(frozen=True)
class Plan:
    """What determines every number of an output folder (recorded as its protocol)."""

    model: str = "sandbox"
    model_sha256: str = ""  # the model's weights (``Model.base_sha256``): results of other weights are never mixed
    n_per_kind: int = 16  # rows per kind of the single-value sets (the mass-erasure sets have a fixed size)
    steps: int | None = None  # denoising steps of fits and benches (None: the model's default)
    purpose: str = "benchmark"  # which of each eraser's sandbox settings
    batch_size: int = 32


def target_sets(target: str, n_per_kind: int) -> tuple[str, str]:
    """(concept spec, benchmark name) of a target: a value (``red``) or a mass-erasure size (``k5``)."""
    from safediff.errors import SafediffError
    from safediff.sandbox.benchmarks import MULTI_KS, MULTI_ORDER
    from safediff.sandbox.values import VALUES

    if target in VALUES:
        return target, f"sandbox-erase-{target}@{n_per_kind}"
    k = int(target[1:]) if target[:1] == "k" and target[1:].isdigit() else None
    if k in MULTI_KS:
        return ",".join(MULTI_ORDER[:k]), f"sandbox-erase-k{k}"
    raise SafediffError(f"unknown target {target!r}; accepted: a sandbox value ({', '.join(VALUES)}) or "
                        f"{', '.join(f'k{k}' for k in MULTI_KS)}")


class Measurement:
    """Fits and benches into ``out``; the model is loaded once, on the first fit."""

    def __init__(self, plan: Plan, out: Path, progress: bool = True):
        self.plan, self.out, self.progress = plan, Path(out), progress
        self._model = None

    def model(self):
        if self._model is None:
            from safediff.models import load_pipeline

            self._model = load_pipeline(self.plan.model)
            if self.plan.steps is not None:  # the erasers' own sampling (ESD, TRCE, RealEra, ConceptPrune, ...)
                self._model.defaults["steps"] = self.plan.steps
        return self._model

    def fit(self, name: str, target: str, concept: str) -> tuple[Path, dict]:
        """The edit of eraser ``name`` for ``target`` (fitted, or reused from an earlier run)."""
        from safediff.concepts import resolve
        from safediff.edits import Edit
        from safediff.erasers import build_eraser
        from safediff.erasers.base import fit_to_file
        from safediff.errors import SafediffError
        from safediff.options import Spec
        from safediff.registry import ERASERS
        from safediff.sandbox.validation import eraser_settings

        path = self.out / "edits" / f"{slug(name)}-{target}.safetensors"
        settings = eraser_settings(ERASERS.get(Spec.parse(name, "eraser").name), self.plan.purpose, resolve(concept))
        eraser = build_eraser(name, **settings)
        if path.is_file():
            edit = Edit.load(path)
            now = json.loads(json.dumps(eraser.hyperparameters()))
            changed = sorted(k for k in {*now, *edit.metadata["hyperparameters"]}
                             if now.get(k) != edit.metadata["hyperparameters"].get(k))
            if changed:  # the method's settings changed since: its finished rows describe the old edit
                raise SafediffError(f"{path} was fitted with other settings than {name}'s {self.plan.purpose} ones "
                                    f"now ({', '.join(changed)}); remove it and the rows made with it from "
                                    "results.json to refit")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            edit = fit_to_file(eraser, self.model(), resolve(concept), path, progress=self.progress)
        return path, {"settings": {k: v for k, v in settings.items() if not callable(v)},
                      "hyperparameters": edit.metadata["hyperparameters"], "fit_seconds": edit.metadata["fit_seconds"],
                      "edit_sha256": edit.digest, "values_changed": sum(t.numel() for t in edit.tensors.values()),
                      "info": {k: v for k, v in edit.metadata.get("info", {}).items()
                               if k in ("masks", "pruned_share_of_denoiser", "chosen_epoch", "mined_neighbours")}}

    def entry(self, name: str, target: str) -> dict:
        """Fit (erasers) and bench one method on one target; the entry ``results.json`` keeps."""
        from safediff.bench.runner import BenchConfig, run_benchmark
        from safediff.options import Spec
        from safediff.registry import ERASERS, GUARDS
        from safediff.sandbox.validation import SANDBOX_ARCH, SANDBOX_ARCHES, guard_spec

        concept, benchmark = target_sets(target, self.plan.n_per_kind)
        label = f"{slug(name)}-{target}"
        config = BenchConfig(benchmark=benchmark, model=self.plan.model, out=self.out / "runs" / label,
                             steps=self.plan.steps, batch_size=self.plan.batch_size, name=label,
                             progress=self.progress)
        entry: dict = {"method": name, "target": target, "concepts": concept, "benchmark": benchmark}
        guard = name.removeprefix("guard:")  # the prefix names the guard where an eraser has the same name (spm)
        if guard == name and Spec.parse(name, "method").name in ERASERS:
            path, fitted = self.fit(name, target, concept)
            config.model = f"{self.plan.model}+{path}"
            entry.update(kind="eraser", edit=str(path.relative_to(self.out)), **fitted)
        elif guard in GUARDS and guard != "none":
            cls = GUARDS.get(guard)
            config.guard = guard_spec(cls, SANDBOX_ARCHES.get(self.plan.model, SANDBOX_ARCH))
            config.concept = concept
            entry.update(kind="guard", fit_seconds=0.0)
            if cls.edit_from:  # a guard applying an eraser's edit (SPM's membrane): that eraser's edit of the target
                path, fitted = self.fit(cls.edit_from, target, concept)
                config.guard += f"{',' if ':' in config.guard else ':'}edit={path}"
                entry.update(edit=str(path.relative_to(self.out)), fit_seconds=fitted["fit_seconds"],
                             edit_sha256=fitted["edit_sha256"])
            entry["guard"] = config.guard
        elif name == "base":
            entry.update(kind="base", fit_seconds=0.0)
        else:
            from safediff.errors import SafediffError

            raise SafediffError(f"unknown method {name!r}; accepted: base, a registered eraser "
                                f"({', '.join(ERASERS.primary_names())}) or guard ({', '.join(GUARDS.names())}; "
                                "guard:NAME where an eraser has the same name)")
        results = run_benchmark(config)
        metrics = results["results"][results["method"]]
        entry["run"] = str(config.out.relative_to(self.out))
        entry["metrics"] = {k: v for k, v in metrics.items() if k.startswith("sandbox/") or k == "degenerate_rate"}
        return entry


def slug(method: str) -> str:
    """A method spec (``speed:tokens=to_end``) as a file-name part (``speed_tokens-to_end``)."""
    return method.replace(":", "_").replace(",", "_").replace("=", "-")


def measure(name: str, targets: list[str], plan: Plan, out: Path, progress: bool = True) -> dict[str, dict]:
    """Fit and bench the registered eraser (or guard, or ``base``) ``name`` on each target (a sandbox value or a
    mass-erasure size ``k<k>``); return each target's entry: sandbox metrics, fit seconds, edit and run paths."""
    m = Measurement(plan, out, progress)
    return {t: m.entry(name, t) for t in targets}


def value(entry: dict, metric: str) -> str:
    v = entry["metrics"].get(metric, {}).get("value")
    return "–" if v is None else f"{v:.0%}"


def markdown(results: dict) -> str:
    """One row per (method, target): target rate overall and by kind, what is kept, TICoE's MCP (the neighbour rows
    showing their value on the erased axis, other attributes not asked), fit seconds."""
    heads = (["method", "target", "target rate"] + [k.removeprefix("target-") for k in KINDS]
             + [f"kept: {k}" for k in KEPT] + ["MCP", "other object kept", "fit s"])
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for key in sorted(results, key=lambda k: (results[k]["target"], results[k]["method"])):
        e = results[key]
        cells = [e["method"], e["target"], value(e, "sandbox/target_rate")]
        cells += [value(e, f"sandbox/target_rate/kind={k}") for k in KINDS]
        cells += [value(e, f"sandbox/kept_rate/kind={k}") for k in KEPT]
        cells += [value(e, "sandbox/mcp"), value(e, "sandbox/other_object_kept"), f"{e['fit_seconds']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    from safediff.errors import SafediffError
    from safediff.options import split_specs
    from safediff.records import git_hash, versions
    from safediff.sandbox.validation import SANDBOX_ARCH, SANDBOX_ARCHES, sandbox_erasers
    from safediff.storage import write_json_atomic

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="sandbox")
    ap.add_argument("--methods", default=None, help="semicolon- or comma-separated: base, registered erasers (with "
                    "options: speed:tokens=to_end) or guards (default: base and every registered eraser)")
    ap.add_argument("--values", default="", help="sandbox values to erase one at a time, e.g. red,triangle")
    ap.add_argument("--mass", default="", help="mass-erasure sizes, e.g. 1,5,10,20")
    ap.add_argument("--n-per-kind", type=int, default=Plan.n_per_kind)
    ap.add_argument("--steps", type=int, default=None, help="denoising steps of fits and benches (tests)")
    ap.add_argument("--purpose", default=Plan.purpose, choices=("benchmark", "demo", "smoke"))
    ap.add_argument("--batch-size", type=int, default=Plan.batch_size)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/erasers_sandbox_v2")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    targets = [v for v in a.values.split(",") if v.strip()] + [f"k{k}" for k in a.mass.split(",") if k.strip()]
    if not targets:
        ap.error("give --values and/or --mass")
    methods = split_specs(a.methods) if a.methods else ["base", *sandbox_erasers(SANDBOX_ARCHES.get(a.model,
                                                                                                   SANDBOX_ARCH))]
    from safediff.models import load_pipeline

    plan = Plan(a.model, load_pipeline(a.model).base_sha256, a.n_per_kind, a.steps, a.purpose, a.batch_size)
    out = Path(a.out)
    record_path = out / "results.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {"plan": asdict(plan), "results": {}}
    if record["plan"] != asdict(plan):
        raise SafediffError(f"{out} holds results of another plan ({record['plan']}); choose another --out")
    m = Measurement(plan, out, progress=not a.quiet)
    for name in methods:
        for target in targets:
            key = f"{name}-{target}"
            if key in record["results"]:
                continue
            entry = m.entry(name, target)
            if record_path.is_file():  # another job on other methods may have added entries meanwhile: keep them
                record["results"] = {**json.loads(record_path.read_text())["results"], **record["results"]}
            record["results"][key] = entry
            record.update(versions=versions(), git=git_hash(), torch_threads=torch.get_num_threads())
            write_json_atomic(record_path, record)
            print(f"{key}: {json.dumps({k: v['value'] for k, v in record['results'][key]['metrics'].items()})}",
                  flush=True)
    out.mkdir(parents=True, exist_ok=True)
    if record_path.is_file():
        record = json.loads(record_path.read_text())
    (out / "results.md").write_text(markdown(record["results"]))
    if not a.quiet:
        print(markdown(record["results"]))
    return record


if __name__ == "__main__":
    run_script(main)
