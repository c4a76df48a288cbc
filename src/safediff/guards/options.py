"""Guard option strings: ``PRESET[,KEY=VALUE...]`` (the part after ``NAME:`` in ``--guard NAME:...``).

``"max"`` picks a preset, ``"max,safety_scale=2000"`` a preset with overrides, ``"safety_scale=2000"`` overrides on
the guard's default preset. Values are numbers; each guard declares which keys it accepts and their valid ranges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from safediff.errors import SafediffError


@dataclass(frozen=True)
class Knob:
    """One numeric hyper-parameter: its type and the closed range of accepted values."""

    kind: type  # int or float
    low: float
    high: float
    meaning: str

    def check(self, guard: str, key: str, value) -> int | float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SafediffError(f"{guard}: {key} must be a number, got {value!r}")
        if self.kind is int and float(value) != int(value):
            raise SafediffError(f"{guard}: {key} must be an integer, got {value}")
        value = self.kind(value)
        if not math.isfinite(value) or not self.low <= value <= self.high:
            raise SafediffError(f"{guard}: {key} ({self.meaning}) must be in [{self.low:g}, {self.high:g}], "
                                f"got {value:g}")
        return value


def _number(guard: str, key: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise SafediffError(f"{guard}: {key}={text!r} is not a number") from None


def parse_options(guard: str, spec: str | None, presets: dict[str, dict], default: str | None,
                  knobs: dict[str, Knob]) -> tuple[str | None, dict]:
    """``"max,safety_scale=2000"`` -> ("max", {"safety_scale": 2000.0}); unknown preset or key -> SafediffError."""
    preset, overrides = None, {}
    for part in [p.strip() for p in (spec or "").split(",") if p.strip()]:
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq:
            if preset is not None:
                raise SafediffError(f"{guard}: two presets given ('{preset}', '{key}'); give one of "
                                    f"{', '.join(presets) or '(none)'}")
            preset = key
        elif key not in knobs:
            raise SafediffError(f"{guard}: unknown option '{key}'; accepted: {', '.join(knobs) or '(none)'}")
        else:
            overrides[key] = _number(guard, key, value.strip())
    if preset is not None and preset not in presets:
        accepted = ", ".join(presets) if presets else f"none ({guard} has no presets)"
        raise SafediffError(f"{guard}: unknown preset '{preset}'; accepted: {accepted}")
    return preset if preset is not None else default, overrides


def resolve_params(guard: str, spec: str | None, presets: dict[str, dict], default: str | None,
                   knobs: dict[str, Knob], **overrides) -> tuple[str | None, dict]:
    """Preset values, then overrides from the option string, then keyword overrides; every value range-checked."""
    preset, from_spec = parse_options(guard, spec, presets, default, knobs)
    unknown = sorted(set(overrides) - set(knobs))
    if unknown:
        raise SafediffError(f"{guard}: unknown option '{unknown[0]}'; accepted: {', '.join(knobs)}")
    values = {**(presets[preset] if preset is not None else {}), **from_spec, **overrides}
    missing = [k for k in knobs if k not in values]
    if missing:
        raise SafediffError(f"{guard}: no value for {', '.join(missing)}; give a preset ({', '.join(presets)}) "
                            "or set them")
    return preset, {k: knobs[k].check(guard, k, values[k]) for k in knobs}
