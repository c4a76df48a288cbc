"""``safediff bench``: generate, detect and score a benchmark into a resumable run folder.

Jobs (prompt row i, image j) get seed ``row.seed + j`` and guidance ``--guidance``, else the row's, else the model's.
They are cut into batches deterministically (grouped by guidance in order of first appearance, then
``batch_size`` at a time), so a restarted run redoes exactly the unfinished batches and produces the same bytes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from safediff.bench.benchmarks import Benchmark, load_benchmark
from safediff.bench.results import build_results, method_label
from safediff.bench.store import RunStore
from safediff.errors import SafediffError

logger = logging.getLogger("safediff")
MAX_BATCH = 1024
MAX_IMAGES_PER_PROMPT = 1000


@dataclass
class BenchConfig:
    benchmark: str
    model: str
    out: Path
    guard: str | None = None
    concept: str | None = None
    detectors: list[str] | None = None  # None = the benchmark's defaults
    data: str | None = None
    categories: tuple[str, ...] | None = None
    hard: bool | None = None
    limit: int | None = None
    skip_bad_rows: bool = False
    images_per_prompt: int = 1
    steps: int | None = None
    guidance: float | None = None
    height: int | None = None
    width: int | None = None
    scheduler: str | None = None
    negative_prompt: str | None = None
    batch_size: int = 8
    device: str = "cpu"
    dtype: str = "float32"
    backend: str = "local"
    workers: int = 2
    name: str | None = None
    progress: bool = True


def plan_batches(bench: Benchmark, images_per_prompt: int, batch_size: int, guidance: float | None,
                 default_guidance: float) -> list[list[dict]]:
    """Jobs grouped by guidance (first appearance order), cut into batches of ``batch_size``."""
    groups: dict[float, list[dict]] = {}
    k = 0
    for i, row in enumerate(bench.rows):
        g = guidance if guidance is not None else (row.guidance if row.guidance is not None else default_guidance)
        for j in range(images_per_prompt):
            groups.setdefault(float(g), []).append({"index": k, "row": i, "j": j, "prompt": row.prompt,
                                                    "seed": int(row.seed) + j, "guidance": float(g)})
            k += 1
    return [jobs[s:s + batch_size] for jobs in groups.values() for s in range(0, len(jobs), batch_size)]


def _check(cfg: BenchConfig) -> None:
    from safediff.sampling import SCHEDULERS, check_settings

    check_settings(cfg.steps or 1, 1.0 if cfg.guidance is None else cfg.guidance, cfg.height or 8, cfg.width or 8,
                   cfg.images_per_prompt)
    if not 0 < cfg.batch_size <= MAX_BATCH:
        raise SafediffError(f"batch-size must be an integer in 1..{MAX_BATCH}, got {cfg.batch_size}")
    if not 0 < cfg.images_per_prompt <= MAX_IMAGES_PER_PROMPT:
        raise SafediffError(f"images-per-prompt must be an integer in 1..{MAX_IMAGES_PER_PROMPT}, got "
                            f"{cfg.images_per_prompt}")
    if cfg.scheduler is not None and cfg.scheduler not in SCHEDULERS:
        raise SafediffError(f"unknown scheduler '{cfg.scheduler}'; accepted: {', '.join(SCHEDULERS)}")
    if cfg.backend not in ("local", "ray"):
        raise SafediffError(f"unknown backend '{cfg.backend}'; accepted: local, ray")
    if cfg.workers <= 0:
        raise SafediffError(f"workers must be a positive integer, got {cfg.workers}")


def worker_spec(cfg: BenchConfig, bench: Benchmark, detectors: list[str]) -> dict:
    concept = cfg.concept if cfg.concept is not None else (bench.concept if cfg.guard not in (None, "none") else None)
    return {"model": cfg.model, "device": cfg.device, "dtype": cfg.dtype, "guard": cfg.guard, "concept": concept,
            "detectors": detectors,
            "generation": {"steps": cfg.steps, "height": cfg.height, "width": cfg.width, "scheduler": cfg.scheduler,
                           "negative_prompt": cfg.negative_prompt, "eta": 0.0}}


def run_benchmark(cfg: BenchConfig) -> dict:
    """Run (or resume) a benchmark; returns the results dict also written to ``RUN/results.json``."""
    from safediff.options import Spec
    from safediff.guards import build_guard
    from safediff.records import versions
    from safediff.registry import DETECTORS
    from safediff.sampling import MAX_IMAGES

    _check(cfg)
    bench = load_benchmark(cfg.benchmark, data=cfg.data, categories=cfg.categories, hard=cfg.hard, limit=cfg.limit,
                           skip_bad_rows=cfg.skip_bad_rows)
    detectors = list(cfg.detectors) if cfg.detectors else list(bench.detectors)
    if not detectors:
        raise SafediffError(f"benchmark '{bench.name}' has no default detector; give --detector (accepted: "
                            f"{', '.join(DETECTORS.names())})")
    for spec in detectors:
        DETECTORS.get(Spec.parse(spec, "detector").name)  # unknown names fail before anything heavy is loaded
    if len(set(detectors)) != len(detectors):
        raise SafediffError("the same --detector is given twice")
    if "sandbox" in bench.metrics:
        from safediff.sandbox.metrics import DETECTORS as SANDBOX

        missing = [d for d in SANDBOX if d not in {Spec.parse(x, "detector").name for x in detectors}]
        if missing:
            raise SafediffError(f"benchmark '{bench.name}' reads the sandbox detectors together; add --detector "
                                f"{' --detector '.join(missing)} (or leave --detector out for the defaults)")
    if len(bench.rows) * cfg.images_per_prompt > MAX_IMAGES:
        raise SafediffError(f"{len(bench.rows)} prompt(s) x {cfg.images_per_prompt} image(s) exceeds {MAX_IMAGES} "
                            "images per run; select fewer rows (--limit, --category)")
    spec = worker_spec(cfg, bench, detectors)
    build_guard(spec["guard"], spec["concept"])  # bad guard/concept fails before loading the model

    backend = _backend(cfg, spec)
    try:
        worker_identity = backend.protocol()
        run_settings = {"images_per_prompt": cfg.images_per_prompt, "batch_size": cfg.batch_size,
                        "guidance": cfg.guidance}
        identity = {"benchmark": bench.protocol(), "worker": worker_identity, "run": run_settings,
                    "libraries": versions()}
        store = RunStore.open(cfg.out, identity, backend=cfg.backend)
        batches = plan_batches(bench, cfg.images_per_prompt, cfg.batch_size, cfg.guidance,
                               worker_identity["generation"]["default_guidance"])
        done = {b: store.batch(b) for b in range(len(batches))}
        pending = [b for b, recs in done.items() if recs is None]
        total = sum(len(b) for b in batches)
        with tqdm(total=total, initial=total - sum(len(batches[b]) for b in pending), desc="images",
                  unit="img", disable=not cfg.progress) as bar:
            for b, outputs in backend.map(pending, batches):
                done[b] = _store_batch(store, b, batches[b], bench, outputs)
                bar.update(len(outputs))
    finally:
        backend.close()
    samples = [r for b in range(len(batches)) for r in done[b]]
    samples.sort(key=lambda r: r["index"])
    label = cfg.name or method_label(cfg.model, worker_identity["guard"], spec["concept"])
    results = build_results(label=label, benchmark=bench, identity=identity, samples=samples)
    store.write_results(results)
    return results


def _store_batch(store: RunStore, b: int, jobs: list[dict], bench: Benchmark, outputs) -> list[dict]:
    records = []
    for job, (png, partial) in zip(jobs, outputs):
        row = bench.rows[job["row"]]
        records.append({**job, "id": row.id, "categories": list(row.categories), "hard": row.hard,
                        "meta": row.meta, "image": store.put_image(png), **partial})
    store.put_batch(b, records)
    return records


class LocalBackend:
    def __init__(self, spec: dict):
        from safediff.bench.worker import Worker

        self.worker = Worker(spec)

    def protocol(self) -> dict:
        return self.worker.protocol()

    def map(self, pending: list[int], batches: list[list[dict]]):
        for b in pending:
            yield b, self.worker.run(batches[b])

    def close(self) -> None:
        pass


def _backend(cfg: BenchConfig, spec: dict):
    if cfg.backend == "ray":
        from safediff.bench.ray_backend import RayBackend

        return RayBackend(spec, cfg.workers)
    return LocalBackend(spec)
