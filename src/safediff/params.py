"""``key=value`` strings from the command line -> typed dataclass fields (erasers, attacks, attack budgets).

A field's annotation names its type: ``bool``, ``int``, ``float``, ``str`` or ``tuple[str, ...]`` (comma-separated
words), each optionally ``| None`` (then ``none``/``null``/empty gives None). Keys may use ``-`` for ``_``.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

from safediff.errors import SafediffError


def comma_items(text: str | None) -> list[str]:
    """``"k=5, lr=0.01"`` -> ``["k=5", "lr=0.01"]`` (for values without commas; the eraser CLI repeats --param)."""
    return [p.strip() for p in (text or "").split(",") if p.strip()]


def parse_value(field: dataclasses.Field, text: str, owner: str):
    """``text`` converted to the type ``field``'s annotation names; a bad value is one clear SafediffError."""
    kind = str(field.type).replace(" ", "")
    optional = kind.endswith("|None")
    kind = kind.removesuffix("|None")
    text = text.strip()
    if optional and text.lower() in ("none", "null", ""):
        return None
    try:
        if kind == "bool":
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind.startswith("tuple"):
            return tuple(w.strip() for w in text.split(",") if w.strip())
        return text
    except ValueError:
        raise SafediffError(f"{owner}: {field.name}={text!r} is not a valid {kind}") from None


def typed_fields(cls, items: Iterable[str], owner: str, fields: Iterable[dataclasses.Field] | None = None) -> dict:
    """``["k=5", "lr=0.01"]`` -> ``{"k": 5, "lr": 0.01}`` for the dataclass ``cls`` (or only the given ``fields``)."""
    accepted = {f.name: f for f in (dataclasses.fields(cls) if fields is None else fields)}
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in accepted:
            raise SafediffError(f"{owner}: unknown parameter '{item}'; accepted: key=value with keys "
                                f"{', '.join(sorted(accepted))}")
        values[key] = parse_value(accepted[key], value, owner)
    return values
