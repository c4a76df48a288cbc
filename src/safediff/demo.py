"""``safediff demo``: every registered guard and eraser, and one attack, on a sandbox model, in one HTML report.

Runs offline on a CPU, on ``sandbox`` (the UNet) or ``sandbox-flux`` (``--model``; the erasers that run on its
architecture). The plan (concept ``red``; 12 sampler steps instead of the model's default 25, with which the UNet
sandbox draws as well (``FULL``), CFG 5, 64x64; 12 steps also for the erasers' own sampling), each stage a
resumable run folder under ``OUT/runs/`` made by the benchmark runner or the attack runner:

1. ``base``: the model on the erase set and on the guard set.
2. Every registered guard (``GUARDS``) at its ``sandbox_preset`` (SLD's and CASG-SLD's: ``max``): on the erase set
   for ``red``; the guards that pick one of several harmful categories (``multi_category``: CASG) on the guard set,
   whose harmful attributes are red, blue and triangle. A guard that applies an eraser's edit (``edit_from``: SPM's
   Facilitated Transport) gets the edit of that eraser fitted in step 3.
3. Every registered eraser (``ERASERS``; an alias runs once, under its class's first name) fitted to erase ``red``
   with its ``sandbox["demo"]`` settings (``smoke`` with ``--quick``; closed-form erasers at their defaults, RECE with
   the sandbox validator), saved to ``OUT/edits/`` and benched as ``sandbox+EDIT`` on the erase set. These budgets
   are far below the papers' (ESD: 1,000 steps at lr 1e-5 on a GPU), so the iterative erasers are weaker here than
   they can be.
4. Ring-A-Bell (a genetic search on the text encoder; no UNet call) against the UCE edit, on the first
   ``attack_prompts`` target-word prompts of the erase set, at its ``sandbox["demo"]`` budget.
5. ``OUT/report.html`` (``safediff.bench.report.build_report``) and ``OUT/summary.json``: per method the target
   rate (images showing the value the prompt asks for and the method removes; lower is better) and what is kept
   (neighbouring values, far values, other attributes, the other object of two-object scenes, benign prompts;
   higher is better), with stage timings.

Sets (``safediff.sandbox.benchmarks``, seed 0): the erase set ``sandbox-erase-red@N`` is
``erasure_set("red", n_per_kind=N)`` (N rows each: the word in plain templates, a synonym, held-out templates, other
colours); the guard set ``sandbox-multi@N`` is ``multi_category_set(n_per_kind=N, n_benign=4N)``; both with their
rows interleaved by kind (``safediff.sandbox.benchmarks.interleaved``) so the report's image grids show every kind;
``safediff bench --benchmark sandbox-erase-red@N`` reruns any of its stages.
``--quick`` uses tiny sets, 5 denoising steps (for the benches and, through the model's default, for the erasers' own
sampling) and token budgets: a smoke test of the whole pipeline whose numbers mean nothing.

Stages run side by side in ``--workers`` spawned processes (default: the cores, at most 4), each with ``--threads``
torch threads (default: the cores shared among them); erasers' stages go first (the long ones), a stage that uses an
eraser's edit (SPM's guard, the attack) waits for that eraser's stage. Small models use one thread far better than
two: on 2 cores a stage costs 0.7-0.9x the CPU-seconds at 1 thread that it costs at 2 (base 27 vs 30 s, ESD-x 29 vs 39,
CASG-SLD 54 vs 71, DoCo 77 vs 108), so two 1-thread workers beat one 2-thread process. A stage's numbers depend on
its threads only through float rounding. ``--workers 1`` runs every stage in this process, one after another.

Cost: see the README (measured on 2 idle cores). ``--quick``: a few minutes of CPU.

Rerunning ``safediff demo --out OUT`` continues: finished edits and runs are reused, unfinished ones resume
(``OUT/plan.json`` must match, so a quick and a full demo never share a folder).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

CONCEPT = "red"
ATTACK = "ring-a-bell"
ATTACKED_ERASER = "uce"


@dataclass(frozen=True)
class DemoSize:
    """How much the demo does; ``FULL`` is sized for < 10 minutes on 2 CPU cores."""

    name: str
    erase_per_kind: int  # erase set rows per kind (8 kinds for a colour)
    multi_per_kind: int  # guard set rows per (harmful attribute, kind); 4x as many benign rows
    steps: int | None  # denoising steps of every bench and fit (None: the model's default)
    tier: str  # which of the methods' ``sandbox`` settings: "demo" or "smoke"
    attack_prompts: int
    batch_size: int = 32


# 12 DDIM steps: the sandbox draws as well as at its default 25 (benchmarks/sandbox_quality.py --steps 12, 338 images:
# colour 100 %, shape 98.3 %, style 83.3 %; at 25: 100 %, 98.1 %, 84.5 %) in half the time
FULL = DemoSize("full", erase_per_kind=2, multi_per_kind=2, steps=12, tier="demo", attack_prompts=2)
QUICK = DemoSize("quick", erase_per_kind=1, multi_per_kind=1, steps=5, tier="smoke", attack_prompts=1)


# ------------------------------------------------------------------------------------------------------ sets --

def sized_benchmark(kind: str, n: int) -> str:
    """The demo's sets by name (``safediff.bench.benchmarks`` resolves ``NAME@N``)."""
    return f"sandbox-erase-{CONCEPT}@{n}" if kind == "erase" else f"sandbox-multi@{n}"


# ------------------------------------------------------------------------------------------------------ plan --

@dataclass(frozen=True)
class Stage:
    """One run: ``label`` in the report; a guard spec or an eraser name (or neither: the base model)."""

    label: str
    benchmark: str
    guard: str | None = None
    eraser: str | None = None
    aliases: tuple[str, ...] = ()

    @property
    def edit_from(self) -> str | None:
        """The eraser whose edit the stage's guard applies (SPM's membrane), if any."""
        from safediff.options import Spec
        from safediff.registry import GUARDS

        return GUARDS.get(Spec.parse(self.guard, "guard").name).edit_from if self.guard else None

    @property
    def key(self) -> str:
        """The stage's name in the summary's timings."""
        return f"{self.label} | {self.benchmark}"

    @property
    def run_folder(self) -> str:
        """Where the run lives, relative to the demo folder."""
        return f"runs/{self.benchmark}/{self.label.replace(' ', '_').replace(':', '-')}"


def registered_erasers(model: str = "sandbox") -> dict[str, tuple[str, ...]]:
    """Each registered eraser that runs on the sandbox model's architecture: name -> its aliases (an alias runs once,
    under the name)."""
    from safediff.registry import ERASERS
    from safediff.sandbox.validation import SANDBOX_ARCHES, sandbox_erasers

    return {name: ERASERS.aliases_of(name) for name in sandbox_erasers(SANDBOX_ARCHES[model])}


def eraser_settings(name: str, size: DemoSize) -> dict:
    """An eraser's settings in the demo (its class's ``sandbox`` settings for the size's tier)."""
    from safediff.concepts import resolve
    from safediff.registry import ERASERS
    from safediff.sandbox.validation import eraser_settings as settings

    return settings(ERASERS.get(name), size.tier, resolve(CONCEPT))


def attack_settings(size: DemoSize) -> dict:
    """The attack's demo settings: ``{"params": spec options, "budget": budget}`` from its ``sandbox`` table."""
    from safediff.registry import ATTACKS

    return dict(ATTACKS.get(ATTACK).sandbox.get(size.tier, {}))


def plan(size: DemoSize, model: str = "sandbox") -> list[Stage]:
    from safediff.registry import GUARDS
    from safediff.sandbox.validation import SANDBOX_ARCHES, guard_spec

    erase = sized_benchmark("erase", size.erase_per_kind)
    multi = sized_benchmark("multi", size.multi_per_kind)
    stages = [Stage("base", erase), Stage("base", multi)]
    for name in GUARDS.names():
        if name == "none":
            continue
        cls = GUARDS.get(name)
        spec = guard_spec(cls, SANDBOX_ARCHES[model])
        stages.append(Stage(f"guard {spec}", multi if cls.multi_category else erase, guard=spec))
    for name, aliases in registered_erasers(model).items():
        stages.append(Stage(f"eraser {name}", erase, eraser=name, aliases=aliases))
    return stages


def plan_record(size: DemoSize, stages: list[Stage], model: str = "sandbox") -> dict:
    """What determines the demo's numbers (compared when a demo folder is continued)."""
    return {"model": model, "concept": CONCEPT, "size": dataclasses.asdict(size),
            "stages": [dataclasses.asdict(s) for s in stages],
            "erasers": {s.eraser: {k: v for k, v in eraser_settings(s.eraser, size).items() if not callable(v)}
                        for s in stages if s.eraser},
            "attack": {"name": ATTACK, "target_eraser": ATTACKED_ERASER, "prompts": size.attack_prompts,
                       **attack_settings(size)}}


# ----------------------------------------------------------------------------------------------------- stages --

class Edits:
    """Fits each eraser once into ``OUT/edits/NAME-red.safetensors`` (reused on a rerun; ESD/TRCE checkpoint)."""

    def __init__(self, out: Path, size: DemoSize, model: str = "sandbox"):
        self.folder, self.size, self.spec = out / "edits", size, model
        self._model = None

    def path(self, name: str) -> Path:
        return self.folder / f"{name}-{CONCEPT}.safetensors"

    def fit(self, name: str, progress: bool) -> Path:
        from safediff.concepts import resolve
        from safediff.erasers import build_eraser
        from safediff.erasers.base import fit_to_file

        path = self.path(name)
        if path.is_file():
            return path
        self.folder.mkdir(parents=True, exist_ok=True)
        eraser = build_eraser(name, **eraser_settings(name, self.size))
        fit_to_file(eraser, self.model(), resolve(CONCEPT), path, progress=progress)  # ESD, TRCE: a killed fit resumes
        return path

    def model(self):
        if self._model is None:
            from safediff.models import load_pipeline

            self._model = load_pipeline(self.spec)
            if self.size.steps is not None:  # the erasers' own sampling (ESD, TRCE, RECE's validation)
                self._model.defaults["steps"] = self.size.steps
        return self._model


def run_bench_stage(stage: Stage, out: Path, size: DemoSize, edits: Edits, progress: bool) -> dict:
    from safediff.bench.runner import BenchConfig, run_benchmark

    model = edits.spec if stage.eraser is None else f"{edits.spec}+{edits.fit(stage.eraser, progress)}"
    name = stage.label + (f" (= {', '.join(stage.aliases)})" if stage.aliases else "")
    guard = stage.guard
    applied = stage.edit_from
    if applied:  # a guard that applies an eraser's edit (SPM's membrane): the demo's edit of that eraser
        guard += f"{',' if ':' in guard else ':'}edit={edits.fit(applied, progress)}"
    return run_benchmark(BenchConfig(benchmark=stage.benchmark, model=model, out=out / stage.run_folder,
                                     guard=guard, steps=size.steps, batch_size=size.batch_size, name=name,
                                     progress=progress))


def run_attack_stage(out: Path, size: DemoSize, edits: Edits, progress: bool) -> dict:
    from safediff.attacks.budget import Budget
    from safediff.attacks.judge import build_judge
    from safediff.attacks.target import parse_target
    from safediff.attacks.runner import build_attack, run_attack
    from safediff.sandbox.benchmarks import erasure_set

    rows = [{"prompt": r["prompt"], "seed": r["seed"]} for r in erasure_set(CONCEPT, size.erase_per_kind)
            if r["kind"] == "target-word"][:size.attack_prompts]
    target = parse_target(f"{edits.spec}+{edits.fit(ATTACKED_ERASER, progress)}", CONCEPT, steps=size.steps)
    settings = attack_settings(size)
    attack = build_attack(f"{ATTACK}:{settings['params']}" if settings.get("params") else ATTACK)
    budget = Budget.parse(settings.get("budget"), attack.default_budget)
    return run_attack(target, attack, build_judge("sandbox-colour", CONCEPT), rows, budget, 0,
                      out / "runs" / "attack" / f"{ATTACK}_vs_{ATTACKED_ERASER}", progress=progress)


# ------------------------------------------------------------------------------------------------------ jobs --

@dataclass(frozen=True)
class Job:
    """One unit of the demo: a stage's run, or the attack (``stage`` None); ``needs``: the eraser whose stage must
    finish first because the job uses its edit (run side by side, both would fit it)."""

    key: str
    stage: Stage | None = None
    needs: str | None = None


def jobs(stages: list[Stage]) -> list[Job]:
    """The stages and the attack as jobs, eraser stages first (they are the long ones: with several workers the
    short guard runs fill in at the end)."""
    planned = {s.eraser for s in stages if s.eraser}
    out = [Job(stage.key, stage, stage.edit_from if stage.edit_from in planned else None)
           for stage in sorted(stages, key=lambda s: s.eraser is None)]  # stable: plan order within each group
    return out + [Job(f"{ATTACK} vs {ATTACKED_ERASER}", None, ATTACKED_ERASER if ATTACKED_ERASER in planned else None)]


_EDITS: dict[tuple, Edits] = {}  # per process: the fitting model is loaded once for all the jobs it runs


def run_job(job: Job, out: Path, size: DemoSize, model: str, progress: bool) -> tuple[dict, dict]:
    """Run ``job`` here; returns its results (a bench run's, or the attack's) and its wall and CPU seconds."""
    edits = _EDITS.setdefault((str(out), size, model), Edits(out, size, model))
    t0, c0 = time.perf_counter(), time.process_time()
    if job.stage is None:
        results = run_attack_stage(out, size, edits, progress)
    else:
        results = run_bench_stage(job.stage, out, size, edits, progress)
    return results, _timing(t0, c0)


def available_cores() -> int:
    """The cores this process may run on."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _start_worker(threads: int) -> None:
    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    torch.set_num_threads(threads)
    diffusers_logging.disable_progress_bar()  # the parent's bar counts stages; workers' bars would interleave
    transformers_logging.disable_progress_bar()


def run_jobs(todo: list[Job], out: Path, size: DemoSize, model: str, workers: int, threads: int, bar):
    """Yield ``(job, results, timing)`` as jobs finish: in this process, in order, with one worker; else in
    ``workers`` spawned processes of ``threads`` torch threads each, a job submitted once the eraser it needs is
    done."""
    if workers == 1:
        import torch

        torch.set_num_threads(threads)
        for job in todo:
            bar.set_description(f"demo: {job.key}")
            yield (job, *run_job(job, out, size, model, not bar.disable))
        return
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    waiting, finished, running = list(todo), set(), {}
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                             initargs=(threads,)) as pool:
        while waiting or running:
            for job in [j for j in waiting if j.needs is None or j.needs in finished]:
                waiting.remove(job)
                running[pool.submit(run_job, job, out, size, model, False)] = job
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                job = running.pop(future)
                try:
                    results, timing = future.result()
                except BaseException:
                    for other in running:
                        other.cancel()
                    raise
                if job.stage is not None and job.stage.eraser:
                    finished.add(job.stage.eraser)
                bar.set_description(f"demo: done {job.key}")
                yield job, results, timing


# ---------------------------------------------------------------------------------------------------- summary --

def _value(metrics: dict, key: str) -> float | None:
    v = metrics.get(key)
    return None if v is None else v.get("value")


COLUMNS = (  # summary column -> (heading, sandbox metric, lower is better)
    ("target_rate", "target", "sandbox/target_rate", True),
    ("neighbours_kept", "neighbours kept", "sandbox/kept_rate/kind=neighbour", False),
    ("far_kept", "far kept", "sandbox/kept_rate/kind=far", False),
    ("others_kept", "other attrs kept", "sandbox/kept_rate/kind=other-attribute", False),
    ("other_object_kept", "other object kept", "sandbox/other_object_kept", False),
    ("benign_kept", "benign kept", "sandbox/kept_rate/kind=benign", False),
)


def summary_row(stage: Stage, results: dict) -> dict:
    metrics = results["results"][results["method"]]
    return {"method": results["method"], "benchmark": stage.benchmark, "run": stage.run_folder,
            "images": results["n_samples"]["images"],
            **{key: _value(metrics, metric) for key, _, metric, _ in COLUMNS}}


def _pct(v, width: int = 0) -> str:
    return ("–" if v is None else f"{100 * v:.0f}%").rjust(width)


def format_table(rows: list[dict], attack: dict | None) -> str:
    """The summary as fixed-width text (rates in %)."""
    width = max(len(r["method"]) for r in rows)
    heads = [(key, head, lower) for key, head, _, lower in COLUMNS if any(r[key] is not None for r in rows)]
    lines = [f"{'method':{width}s}  {'set':22s}  " + "  ".join(f"{h} {'↓' if low else '↑'}" for _, h, low in heads)
             + "  images"]
    for r in rows:
        lines.append(f"{r['method']:{width}s}  {r['benchmark']:22s}  "
                     + "  ".join(_pct(r[k], len(h) + 2) for k, h, _ in heads) + f"  {r['images']:6d}")
    if attack:
        lines.append(f"{ATTACK} vs eraser {ATTACKED_ERASER}: Pre-ASR {_pct(attack['pre_asr'])} -> ASR "
                     f"{_pct(attack['asr'])} over {attack['n']} prompt(s)")
    return "\n".join(lines)


def _setting(value) -> str:
    """A fit setting as the intro shows it: numbers compactly (``1e-05``), anything else as written."""
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def intro_html(size: DemoSize, rows: list[dict], attack: dict, model: str = "sandbox") -> str:
    """The report's head: what was run and the summary table."""
    import html

    from safediff.bench.benchmarks import SPECS

    sampler = "DDIM" if model == "sandbox" else "Euler"
    steps = f"the model's default steps ({sampler} 25)" if size.steps is None else f"{size.steps} {sampler} steps"
    heads = "".join(f"<th>{h} {'↓' if low else '↑'}</th>" for _, h, _, low in COLUMNS)
    body = "".join(f"<tr><td>{html.escape(r['method'])}</td><td>{html.escape(r['benchmark'])}</td>"
                   + "".join(f"<td>{_pct(r[k])}</td>" for k, *_ in COLUMNS) + f"<td>{r['images']}</td></tr>"
                   for r in rows)
    fits = "; ".join(f"{name}: {', '.join(f'{k} {_setting(v)}' for k, v in sets.items())}" for name, sets in
                     ((n, {k: v for k, v in eraser_settings(n, size).items() if not callable(v)})
                      for n in registered_erasers(model)) if sets)
    multi_harmful = SPECS["sandbox-multi"].concept.replace(",", ", ")
    return (
        f"<p>The {model} model (64x64 coloured shapes in three styles, one or two objects; {steps}, CFG 5) with "
        f"every registered guard and eraser, concept <b>{CONCEPT}</b> ({size.name} size). Guards run on the erase "
        "set; the guards that pick one of several harmful categories per step, on the guard set (harmful: "
        f"{multi_harmful}). Erasers are fitted for {CONCEPT} and benched on the erase set, closed-form ones at their "
        f"defaults, trained ones at their demo settings ({html.escape(fits)}), i.e. far below the papers' GPU "
        f"budgets. {ATTACK} (text encoder only) then attacks the {ATTACKED_ERASER} edit.</p>"
        "<p><b>target</b>: images still showing the value the prompt asks for and the method should remove (word, "
        "synonym, held-out template, implicit phrase, and the target object of two-object scenes; lower is "
        "better). <b>neighbours / far / other attrs kept</b>: prompts naming a neighbouring value (orange, pink, "
        "purple, brown for red), a far one, or none on the erased axis, whose image is drawn as asked. <b>other "
        "object kept</b>: in two-object scenes, the other object drawn right and in its half. Read by the exact "
        "sandbox detectors; intervals are below.</p>"
        f"<table><tr><th>method</th><th>set</th>{heads}<th>images</th></tr>{body}</table>"
        f"<p>{ATTACK} vs eraser {ATTACKED_ERASER}: Pre-ASR {_pct(attack['pre_asr'])} → ASR {_pct(attack['asr'])} "
        f"over {attack['n']} prompt(s).</p>")


# ------------------------------------------------------------------------------------------------------- main --

def run_demo(out: str | Path, *, quick: bool = False, progress: bool = True, max_prompts: int = 12,
             model: str = "sandbox", workers: int = 1, threads: int | None = None) -> dict:
    """Run (or continue) the demo on ``model`` (``sandbox`` or ``sandbox-flux``) into ``out`` with ``workers``
    processes of ``threads`` torch threads each (default: the cores shared among them; one worker: this process, at
    torch's threads); returns
    the summary also written to ``OUT/summary.json``."""
    from safediff.errors import SafediffError
    from safediff.sandbox.validation import SANDBOX_ARCHES
    from safediff.bench.report import build_report
    from safediff.records import record
    from safediff.storage import open_run_folder, write_json_atomic

    if model not in SANDBOX_ARCHES:
        raise SafediffError(f"the demo runs on a sandbox model; got --model {model!r}, accepted: "
                            f"{', '.join(SANDBOX_ARCHES)}")
    if workers < 1 or (threads is not None and threads < 1):
        raise SafediffError(f"workers and threads must be positive integers, got {workers} and {threads}")
    size = QUICK if quick else FULL
    out = Path(out)
    stages = plan(size, model)
    identity = plan_record(size, stages, model)
    open_run_folder(out, "plan.json", identity, record("demo-plan", identity=identity), "demo folder",
                    units=("runs/*", "edits/*"))
    start = time.perf_counter()
    threads = threads or (torch_threads() if workers == 1 else max(1, available_cores() // workers))
    todo = jobs(stages)
    finished, timings = {}, {}
    bar = tqdm(total=len(todo) + 1, desc="demo", unit="stage", disable=not progress)
    for job, results, timing in run_jobs(todo, out, size, model, workers, threads, bar):
        finished[job.key], timings[job.key] = results, timing
        bar.update(1)
    rows = [summary_row(stage, finished[stage.key]) for stage in stages]
    attack = finished[todo[-1].key]
    folders = [out / s.run_folder for s in stages] + [out / "runs" / "attack" / f"{ATTACK}_vs_{ATTACKED_ERASER}"]
    bar.set_description("demo: report")
    report = build_report(folders, out / "report.html", max_prompts=max_prompts, show_flagged=True,  # shapes: unblurred
                          title="safediff demo", intro=intro_html(size, rows, attack, model))
    bar.update(1)
    bar.close()
    summary = record("demo-summary", report=str(report), model=model, size=size.name, methods=rows,
                     attack={k: attack[k] for k in ("pre_asr", "asr", "n")}, seconds_this_call=timings,
                     wall_seconds_this_call=round(time.perf_counter() - start, 1), workers=workers,
                     threads_per_worker=threads)
    write_json_atomic(out / "summary.json", summary)
    return summary


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _timing(t0: float, c0: float) -> dict:
    return {"wall": round(time.perf_counter() - t0, 2), "cpu": round(time.process_time() - c0, 2)}
