"""Named benchmarks: rows (prompt, seed, categories, guidance, ...) + default detectors + metric families.

- ``i2p``: I2P, 4,703 prompts (``--data`` CSV or the hub); detector ``i2p-harmful`` (Q16 OR NudeNet); flagged rate
  per category, I2P's expected maximum.
- ``i2p-<category>`` (``sexual``, ``violence``, ...): the I2P rows of one category; ``nudenet:exposed9`` for
  sexual (plus per-class counts), else ``i2p-harmful``.
- ``coco-utility``: COCO captions (``--data``, e.g. coco_30k_prompts.csv); ``clip-score``.
- ``sandbox-multi`` (red, blue, triangle harmful), ``sandbox-erase-<value>`` (any of the 23 values),
  ``sandbox-erase-k{1,5,10,20}`` (mass erasure), ``sandbox-quality``: the sandbox sets, read by the presence
  detector (every object's colour, shape, style and half) and the mark detector, scored per kind by
  ``sandbox.metrics``. ``sandbox-erase-<value>@N`` and
  ``sandbox-multi@N`` are the same sets with N rows per kind (the guard set: 4N benign rows), their rows interleaved
  by kind so the first images show every kind (``safediff demo`` uses them).
- a path to a CSV with a ``prompt`` column: no default detector (give ``--detector``); rates per detector.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from safediff.bench.datasets import (LoadedRows, PromptRow, assign_default_seeds, load_coco, load_i2p, read_csv_rows,
                                     sandbox_rows, select)
from safediff.concepts import I2P_CATEGORIES
from safediff.errors import SafediffError
from safediff.sandbox.benchmarks import MULTI_KS, MULTI_ORDER
from safediff.sandbox.values import VALUES

MAX_PER_KIND = 10_000  # rows per kind of a sized sandbox set
SANDBOX_DETECTORS = ("sandbox-presence", "sandbox-mark")  # the objects read per image, and the mark


@dataclass
class Benchmark:
    name: str
    version: str
    description: str
    rows: list[PromptRow]
    detectors: tuple[str, ...]
    metrics: tuple[str, ...]  # metric families: flag_rate, expected_max, class_counts, clip_score, sandbox
    concept: str | None  # what a guard steers away from by default on this benchmark
    source: dict
    selection: dict = field(default_factory=dict)

    def rows_sha256(self) -> str:
        data = json.dumps([r.to_dict() for r in self.rows], sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(data.encode()).hexdigest()

    def protocol(self) -> dict:
        return {"name": self.name, "version": self.version, "source": self.source, "selection": self.selection,
                "n_rows": len(self.rows), "rows_sha256": self.rows_sha256(), "metrics": list(self.metrics)}


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    description: str
    load: Callable[[str | None, bool], LoadedRows]
    detectors: tuple[str, ...]
    metrics: tuple[str, ...]
    concept: str | None = None
    categories: tuple[str, ...] | None = None  # a fixed subset (i2p-<category>)
    version: str = "1"


def _i2p(data: str | None, skip: bool) -> LoadedRows:
    return load_i2p(data, skip_bad_rows=skip)


def _coco(data: str | None, skip: bool) -> LoadedRows:
    if data is None:
        raise SafediffError("benchmark 'coco-utility' needs --data PATH: a CSV of COCO captions with a 'prompt' "
                            "column (and evaluation_seed), e.g. coco_30k_prompts.csv")
    return load_coco(data, skip_bad_rows=skip)


def _sandbox(make: Callable[[], list[dict]], what: str) -> Callable[[str | None, bool], LoadedRows]:
    def load(data: str | None, skip: bool) -> LoadedRows:
        if data is not None:
            raise SafediffError("sandbox benchmarks are generated in code; --data is not accepted for them")
        return LoadedRows(sandbox_rows(make()), {"generator": what})
    return load


def _erasure(attribute: str) -> Callable[[], list[dict]]:
    def make() -> list[dict]:
        from safediff.sandbox.benchmarks import erasure_set

        return erasure_set(attribute)
    return make


def _multi() -> list[dict]:
    from safediff.sandbox.benchmarks import multi_category_set

    return multi_category_set()


def _erase_first(k: int) -> Callable[[], list[dict]]:
    def make() -> list[dict]:
        from safediff.sandbox.benchmarks import erase_first

        return erase_first(k)
    return make


def _quality() -> list[dict]:
    from safediff.sandbox.benchmarks import quality_set

    return quality_set()


I2P_METRICS = ("flag_rate", "expected_max", "class_counts")
SPECS: dict[str, BenchmarkSpec] = {
    "i2p": BenchmarkSpec("i2p", "I2P (Schramowski et al. 2023), all 7 categories", _i2p, ("i2p-harmful",),
                         I2P_METRICS, concept="i2p-all"),
    **{f"i2p-{c}": BenchmarkSpec(f"i2p-{c}", f"I2P prompts of category '{c}'", _i2p,
                                 ("nudenet:exposed9",) if c == "sexual" else ("i2p-harmful",), I2P_METRICS,
                                 concept=c, categories=(c,)) for c in I2P_CATEGORIES},
    "coco-utility": BenchmarkSpec("coco-utility", "COCO captions for CLIP score / FID", _coco, ("clip-score",),
                                  ("clip_score",)),
    "sandbox-multi": BenchmarkSpec("sandbox-multi", "sandbox guard set: red, blue and triangle are harmful",
                                   _sandbox(_multi, "safediff.sandbox.benchmarks.multi_category_set()"),
                                   SANDBOX_DETECTORS, ("sandbox",), concept="red,blue,triangle"),
    **{f"sandbox-erase-{a}": BenchmarkSpec(f"sandbox-erase-{a}", f"sandbox erasure set for '{a}'",
                                           _sandbox(_erasure(a), f"safediff.sandbox.benchmarks.erasure_set({a!r})"),
                                           SANDBOX_DETECTORS, ("sandbox",), concept=a) for a in VALUES},
    **{f"sandbox-erase-k{k}": BenchmarkSpec(f"sandbox-erase-k{k}", f"sandbox mass erasure: the first {k} values of "
                                            "MULTI_ORDER at once", _sandbox(_erase_first(k), "safediff.sandbox."
                                                                             f"benchmarks.erase_first({k})"),
                                            SANDBOX_DETECTORS, ("sandbox",), concept=",".join(MULTI_ORDER[:k]))
       for k in MULTI_KS},
    "sandbox-quality": BenchmarkSpec("sandbox-quality", "the sandbox model's quality gates",
                                     _sandbox(_quality, "safediff.sandbox.benchmarks.quality_set()"),
                                     SANDBOX_DETECTORS, ("sandbox",)),
}


SIZED = re.compile(r"(?P<base>sandbox-erase-(?P<attribute>[a-z]+)|sandbox-multi)@(?P<n>[0-9]+)")


def _sized(name: str) -> BenchmarkSpec | None:
    """``sandbox-erase-<attribute>@N`` / ``sandbox-multi@N``: a registered sandbox set resized, rows interleaved."""
    m = SIZED.fullmatch(name)
    if m is None or m["base"] not in SPECS:
        return None
    n = int(m["n"])
    if not 1 <= n <= MAX_PER_KIND:
        raise SafediffError(f"benchmark '{name}': the size after '@' must be 1..{MAX_PER_KIND} rows per kind")
    from safediff.sandbox import benchmarks as sets

    if m["attribute"]:
        call = f"safediff.sandbox.benchmarks.erasure_set({m['attribute']!r}, n_per_kind={n})"

        def make() -> list[dict]:
            return sets.erasure_set(m["attribute"], n_per_kind=n)
    else:
        harmful = tuple(SPECS["sandbox-multi"].concept.split(","))
        call = f"safediff.sandbox.benchmarks.multi_category_set({harmful!r}, n_per_kind={n}, n_benign={4 * n})"

        def make() -> list[dict]:
            return sets.multi_category_set(harmful, n_per_kind=n, n_benign=4 * n)

    def load(data: str | None, skip: bool) -> LoadedRows:
        if data is not None:
            raise SafediffError("sandbox benchmarks are generated in code; --data is not accepted for them")
        return LoadedRows(sandbox_rows(sets.interleaved(make())), {"generator": call, "order": "interleaved"})

    base = SPECS[m["base"]]
    return BenchmarkSpec(name, f"{base.description}, {n} rows per kind: {call}", load, base.detectors, base.metrics,
                         concept=base.concept)


def names() -> list[str]:
    return sorted(SPECS)


def _user_csv(path: Path, skip: bool) -> tuple[BenchmarkSpec, LoadedRows]:
    spec = BenchmarkSpec(f"csv:{path.name}", f"user prompts from {path}",
                         lambda d, s: read_csv_rows(path, skip_bad_rows=s), (),
                         ("flag_rate", "class_counts", "clip_score"))
    return spec, spec.load(None, skip)


def load_benchmark(name: str, *, data: str | None = None, categories: tuple[str, ...] | None = None,
                   hard: bool | None = None, limit: int | None = None, skip_bad_rows: bool = False) -> Benchmark:
    """A registered benchmark by name, or a user CSV given by path; then the category / hard / count selection."""
    sized = _sized(name)
    if name in SPECS or sized is not None:
        spec = SPECS.get(name) or sized
        loaded = spec.load(data, skip_bad_rows)
    elif name.endswith(".csv") or Path(name).is_file():
        if data is not None:
            raise SafediffError("give the CSV either as --benchmark PATH or as --data, not both")
        spec, loaded = _user_csv(Path(name), skip_bad_rows)
    else:
        close = difflib.get_close_matches(name, SPECS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise SafediffError(f"unknown benchmark '{name}'{hint}; accepted: {', '.join(names())} (sandbox sets also "
                            "as NAME@N, N rows per kind), or a path to a CSV with a 'prompt' column")
    rows = assign_default_seeds(loaded.rows)
    cats = tuple(categories or ()) or spec.categories
    chosen = select(rows, categories=cats, hard=hard, limit=limit)
    selection = {"categories": list(cats) if cats else None, "hard": hard, "limit": limit}
    return Benchmark(name=spec.name, version=spec.version, description=spec.description, rows=chosen,
                     detectors=spec.detectors, metrics=spec.metrics, concept=spec.concept, source=loaded.source,
                     selection=selection)
