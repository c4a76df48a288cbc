"""Prompt sets: any user CSV with a ``prompt`` column (optional ``seed``, ``category``, ``guidance`` columns)."""

from __future__ import annotations

import csv
from pathlib import Path

from safediff.errors import SafediffError


def read_prompts_csv(path: str | Path) -> list[dict]:
    """Rows as dicts with ``prompt`` (str) and, when present, ``seed`` (int), ``guidance`` (float), ``category``."""
    path = Path(path)
    if not path.is_file():
        raise SafediffError(f"prompts file '{path}' not found; expected a CSV with a 'prompt' column")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "prompt" not in reader.fieldnames:
            raise SafediffError(f"'{path}' has no 'prompt' column (columns: {reader.fieldnames}); accepted: a CSV "
                                "with a 'prompt' column and optional seed/category/guidance columns")
        rows = []
        for line, row in enumerate(reader, start=2):
            out = {"prompt": row["prompt"] or ""}
            for key, cast in (("seed", int), ("guidance", float)):
                if row.get(key) not in (None, ""):
                    try:
                        out[key] = cast(float(row[key])) if cast is int else cast(row[key])
                    except ValueError:
                        raise SafediffError(f"{path}:{line}: {key} '{row[key]}' is not a number") from None
            if row.get("category"):
                out["category"] = row["category"]
            rows.append(out)
    if not rows:
        raise SafediffError(f"'{path}' has no rows")
    return rows
