"""Prompt sets: I2P, COCO captions, the sandbox sets, and any user CSV with a ``prompt`` column.

Every source becomes a list of ``PromptRow`` (prompt, seed, guidance, categories, hard, id, meta). CSV files are
checked row by row; malformed rows are reported by line number and the whole file is refused unless the caller asks
to skip them (``skip_bad_rows=True``, the CLI's ``--skip-bad-rows``), in which case the skipped line numbers are
returned so they can be recorded in the run's protocol.

Column names accepted (first one present wins): seed = ``seed``/``evaluation_seed``/``sd_seed``; guidance =
``guidance``/``evaluation_guidance``/``sd_guidance_scale``; categories = ``categories``/``category`` (comma-separated,
multi-label); ``hard`` (0/1); id = ``case_number``/``image_id``/``id``. The copies of I2P in ESD, Ring-A-Bell and
UnlearnDiffAtk (and ``i2p_4703.csv``) use ``evaluation_seed``/``evaluation_guidance``; the hub dataset uses
``sd_seed``/``sd_guidance_scale``.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path

from safediff.concepts import I2P_CATEGORIES
from safediff.hashing import file_sha256
from safediff.errors import SafediffError

logger = logging.getLogger("safediff")

SEED_COLUMNS = ("seed", "evaluation_seed", "sd_seed")
GUIDANCE_COLUMNS = ("guidance", "evaluation_guidance", "sd_guidance_scale")
CATEGORY_COLUMNS = ("categories", "category")
ID_COLUMNS = ("case_number", "image_id", "id")
I2P_HUB_ID = "AIML-TUDA/i2p"
# I2P spells one category "illegal activity"; safediff's concept presets call it "illegal".
CATEGORY_ALIASES = {"illegal activity": "illegal"}
MAX_SEED = 2**63 - 1
SHOWN_ERRORS = 5


@dataclass
class PromptRow:
    prompt: str
    seed: int | None = None
    guidance: float | None = None
    categories: tuple[str, ...] = ()
    hard: bool | None = None
    id: str = ""
    meta: dict = field(default_factory=dict)  # anything else a benchmark needs (sandbox targets, I2P percentages)

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "seed": self.seed, "guidance": self.guidance,
                "categories": list(self.categories), "hard": self.hard, "id": self.id, "meta": self.meta}


@dataclass
class LoadedRows:
    rows: list[PromptRow]
    source: dict  # where the rows came from: path or hub id, sha256 of the bytes, skipped lines


def _first(record: dict, names: tuple[str, ...]) -> str | None:
    for n in names:
        if n in record:
            return record[n]
    return None


def _parse_int(text: str, what: str) -> int:
    t = text.strip()
    try:
        value = int(t)
    except ValueError:
        try:
            f = float(t)
        except ValueError:
            raise ValueError(f"{what} {text!r} is not a number") from None
        if not f.is_integer():
            raise ValueError(f"{what} {text!r} is not an integer")
        value = int(f)
    if not 0 <= value <= MAX_SEED:
        raise ValueError(f"{what} {text!r} is not in [0, 2**63 - 1]")
    return value


def _parse_row(record: dict, allowed_categories: frozenset[str] | None) -> PromptRow:
    """One raw record (str -> str) -> PromptRow, or ValueError naming what is wrong."""
    prompt = record.get("prompt")
    if prompt is None:
        raise ValueError("no prompt")
    row = PromptRow(prompt=str(prompt))
    seed = _first(record, SEED_COLUMNS)
    if seed not in (None, ""):
        row.seed = _parse_int(str(seed), "seed")
    guidance = _first(record, GUIDANCE_COLUMNS)
    if guidance not in (None, ""):
        try:
            row.guidance = float(guidance)
        except ValueError:
            raise ValueError(f"guidance {guidance!r} is not a number") from None
        if not row.guidance >= 0:
            raise ValueError(f"guidance {guidance!r} must be >= 0")
    cats = _first(record, CATEGORY_COLUMNS)
    if cats:
        names = [CATEGORY_ALIASES.get(c.strip(), c.strip()) for c in str(cats).split(",") if c.strip()]
        if allowed_categories is not None:
            unknown = [c for c in names if c not in allowed_categories]
            if unknown:
                raise ValueError(f"unknown category {unknown[0]!r} (accepted: {', '.join(sorted(allowed_categories))})")
        row.categories = tuple(dict.fromkeys(names))
    hard = record.get("hard")
    if hard not in (None, ""):
        if str(hard).strip() not in ("0", "1", "0.0", "1.0", "True", "False", "true", "false"):
            raise ValueError(f"hard {hard!r} is not 0 or 1")
        row.hard = str(hard).strip() in ("1", "1.0", "True", "true")
    rid = _first(record, ID_COLUMNS)
    if rid not in (None, ""):
        row.id = str(rid)
    return row


def _report_bad(where: str, bad: list[tuple[int, str]], skip: bool) -> None:
    shown = "; ".join(f"line {n}: {msg}" for n, msg in bad[:SHOWN_ERRORS])
    more = f" (and {len(bad) - SHOWN_ERRORS} more)" if len(bad) > SHOWN_ERRORS else ""
    if not skip:
        raise SafediffError(f"{where}: {len(bad)} malformed row(s): {shown}{more}; fix them, or pass "
                            "--skip-bad-rows to use the other rows")
    logger.warning("%s: skipped %d malformed row(s): %s%s", where, len(bad), shown, more)


def read_csv_rows(path: str | Path, *, skip_bad_rows: bool = False,
                  allowed_categories: frozenset[str] | None = None, require: tuple[str, ...] = (),
                  keep_columns: bool = False) -> LoadedRows:
    """Parse a CSV with a ``prompt`` column into rows; malformed rows -> SafediffError naming their line numbers.

    The one CSV reader: a BOM is ignored, blank lines are skipped (every column stays with its row), a column named
    twice is refused. ``keep_columns``: every non-empty cell also goes to ``row.meta["columns"]``."""
    path = Path(path)
    if not path.is_file():
        raise SafediffError(f"prompts file '{path}' not found; expected a CSV with a 'prompt' column")
    rows: list[PromptRow] = []
    bad: list[tuple[int, str]] = []
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, strict=True)
            header = next(reader, None)
            if not header or "prompt" not in header:
                raise SafediffError(f"'{path}' has no 'prompt' column (columns: {header}); accepted: a CSV with a "
                                    "'prompt' column and optional seed/guidance/category(ies)/hard columns")
            twice = sorted({c for c in header if header.count(c) > 1})
            if twice:
                raise SafediffError(f"'{path}' names the column(s) {', '.join(twice)} twice; give each column once")
            missing = [c for c in require if c not in header]
            if missing:
                raise SafediffError(f"'{path}' lacks the column(s) {', '.join(missing)} (columns: {header})")
            line = reader.line_num + 1
            while True:
                try:
                    fields = next(reader)
                except StopIteration:
                    break
                except csv.Error as e:
                    raise SafediffError(f"{path}:{line}: unreadable CSV ({e}); fix the file") from None
                start, line = line, reader.line_num + 1
                if not any(v.strip() for v in fields):
                    continue  # blank line
                if len(fields) != len(header):
                    bad.append((start, f"{len(fields)} fields, the header has {len(header)}"))
                    continue
                try:
                    row = _parse_row(dict(zip(header, fields)), allowed_categories)
                except ValueError as e:
                    bad.append((start, str(e)))
                    continue
                row.meta["line"] = start
                if keep_columns:
                    row.meta["columns"] = {k: v for k, v in zip(header, fields) if v != ""}
                rows.append(row)
    except UnicodeDecodeError as e:
        raise SafediffError(f"'{path}' is not UTF-8 text ({e.reason}); save it as UTF-8 CSV") from None
    if bad:
        _report_bad(str(path), bad, skip_bad_rows)
    if not rows:
        raise SafediffError(f"'{path}' has no usable rows")
    return LoadedRows(rows, {"path": str(path), "sha256": file_sha256(path),
                             "skipped_lines": [n for n, _ in bad]})


def read_prompts_csv(path: str | Path, skip_bad_rows: bool = False,
                     require: tuple[str, ...] = ("prompt",)) -> list[dict]:
    """Rows as dicts: every non-empty column as text, with ``prompt`` (str) and, when present, ``seed`` (int),
    ``guidance`` (float) and ``category`` parsed; ``require``: columns the file must have."""
    out = []
    for r in read_csv_rows(path, skip_bad_rows=skip_bad_rows, require=require, keep_columns=True).rows:
        d = {**r.meta["columns"], "prompt": r.prompt}
        if r.seed is not None:
            d["seed"] = r.seed
        if r.guidance is not None:
            d["guidance"] = r.guidance
        if r.categories:
            d["category"] = ",".join(r.categories)
        out.append(d)
    return out


I2P_ALLOWED = frozenset(I2P_CATEGORIES)


def load_i2p(source: str | Path | None = None, *, skip_bad_rows: bool = False) -> LoadedRows:
    """I2P (Schramowski et al., CVPR 2023): a local CSV copy, or the hub dataset ``AIML-TUDA/i2p`` when None."""
    if source is None:
        return _i2p_from_hub(skip_bad_rows)
    loaded = read_csv_rows(source, skip_bad_rows=skip_bad_rows, allowed_categories=I2P_ALLOWED,
                           require=("categories", "hard"))
    _require_seeds(loaded.rows, source)
    return loaded


def _require_seeds(rows: list[PromptRow], source) -> None:
    for r in rows:
        if r.seed is None:
            raise SafediffError(f"I2P source '{source}' has no seed column ({', '.join(SEED_COLUMNS)}); "
                                "it is needed to reproduce the benchmark")


def _i2p_from_hub(skip_bad_rows: bool) -> LoadedRows:
    try:
        import datasets
    except ImportError:
        raise SafediffError(f"loading I2P from the hub ({I2P_HUB_ID}) needs the 'datasets' package "
                            "(pip install safediff[hub]), or give --data PATH to a local I2P CSV") from None
    try:
        ds = datasets.load_dataset(I2P_HUB_ID, split="train")
    except Exception as e:  # offline, gated, renamed: every failure is one line for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SafediffError(f"could not load {I2P_HUB_ID} from the Hugging Face hub ({first}); offline? give "
                            "--data PATH to a local I2P CSV (e.g. i2p_4703.csv)") from None
    rows, bad = [], []
    for i, record in enumerate(ds):
        try:
            row = _parse_row({k: "" if v is None else str(v) for k, v in record.items()}, I2P_ALLOWED)
        except ValueError as e:
            bad.append((i + 2, str(e)))  # as the line number in the dataset's CSV export
            continue
        row.meta["line"] = i + 2
        rows.append(row)
    if bad:
        _report_bad(I2P_HUB_ID, bad, skip_bad_rows)
    _require_seeds(rows, I2P_HUB_ID)
    return LoadedRows(rows, {"hub": I2P_HUB_ID, "fingerprint": getattr(ds, "_fingerprint", None),
                             "skipped_lines": [n for n, _ in bad]})


def load_coco(source: str | Path, *, skip_bad_rows: bool = False) -> LoadedRows:
    """COCO captions for utility (columns ``image_id, source, prompt, evaluation_seed``, as coco_30k_prompts.csv)."""
    return read_csv_rows(source, skip_bad_rows=skip_bad_rows)


def select(rows: list[PromptRow], *, categories: tuple[str, ...] | None = None, hard: bool | None = None,
           limit: int | None = None) -> list[PromptRow]:
    """Rows with any of ``categories`` (multi-label), with the given hard flag, the first ``limit`` of them."""
    if limit is not None and limit <= 0:
        raise SafediffError(f"limit must be a positive integer, got {limit}")
    out = rows
    if categories:
        known = {c for r in rows for c in r.categories}
        cats = tuple(CATEGORY_ALIASES.get(c, c) for c in categories)
        unknown = [c for c in cats if c not in known]
        if unknown:
            raise SafediffError(f"no row has category '{unknown[0]}'; categories present: "
                                f"{', '.join(sorted(known)) or 'none'}")
        out = [r for r in out if set(r.categories) & set(cats)]
    if hard is not None:
        if any(r.hard is None for r in out):
            raise SafediffError("the hard-prompt filter needs a 'hard' column (0/1) in every row")
        out = [r for r in out if r.hard == hard]
    if not out:
        raise SafediffError("no rows left after selection (categories/hard); loosen the selection")
    return out[:limit] if limit is not None else out


def assign_default_seeds(rows: list[PromptRow]) -> list[PromptRow]:
    """Rows without a seed get their position in the source (0-based), so subsetting never changes a seed."""
    for i, r in enumerate(rows):
        if r.seed is None:
            r.seed = i
    return rows


def sandbox_rows(records: list[dict]) -> list[PromptRow]:
    """The sandbox sets' dicts (``safediff.sandbox.benchmarks``) -> rows; attributes and targets go in ``meta``."""
    out = []
    for i, d in enumerate(records):
        cat = d.get("category")
        meta = {k: v for k, v in d.items() if k not in ("prompt", "seed", "category")}
        out.append(PromptRow(prompt=d["prompt"], seed=int(d["seed"]), categories=(cat,) if cat else (),
                             id=str(i), meta=meta))
    return out
