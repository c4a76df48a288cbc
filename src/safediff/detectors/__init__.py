"""Detectors, built by name: ``build_detector("nudenet:exposed9,threshold=0.45")``.

A spec is ``NAME[:PRESET][,KEY=VALUE...]`` (as guards): the first option without ``=`` is the preset, ``threshold``
is a number in [0, 1], other keys are the detector's own string options (model ids or paths).
"""

from __future__ import annotations

import inspect

from safediff.detectors.base import Detector
from safediff.errors import SafediffError
from safediff.registry import DETECTORS


def parse_spec(spec: str) -> tuple[str, str | None, dict[str, str]]:
    """``"q16:threshold=0.4,clip=DIR"`` -> ("q16", None, {"threshold": "0.4", "clip": "DIR"})."""
    name, _, rest = spec.strip().partition(":")
    preset, options = None, {}
    for part in [p.strip() for p in rest.split(",") if p.strip()]:
        key, eq, value = part.partition("=")
        if not eq:
            if preset is not None:
                raise SafediffError(f"detector '{spec}': two presets ({preset}, {part}); give one, then KEY=VALUE")
            preset = part
        elif key.strip() in options:
            raise SafediffError(f"detector '{spec}': option '{key.strip()}' given twice")
        else:
            options[key.strip()] = value.strip()
    return name.strip(), preset, options


def build_detector(spec: str) -> Detector:
    name, preset, options = parse_spec(spec)
    cls = DETECTORS.get(name)
    params = inspect.signature(cls.__init__).parameters
    kwargs: dict = {}
    if preset is not None:
        if "preset" not in params:
            raise SafediffError(f"detector '{name}' has no presets; got '{preset}'")
        kwargs["preset"] = preset
    threshold = options.pop("threshold", None)
    for key, value in options.items():
        if key not in params or key in ("self", "preset", "threshold"):
            accepted = [p for p in params if p not in ("self", "preset", "threshold")] + ["threshold"]
            raise SafediffError(f"detector '{name}': unknown option '{key}'; accepted: {', '.join(accepted)}")
        kwargs[key] = value
    detector = cls(**kwargs)
    if threshold is not None:
        try:
            t = float(threshold)
        except ValueError:
            raise SafediffError(f"detector '{name}': threshold '{threshold}' is not a number") from None
        if not 0.0 <= t <= 1.0:
            raise SafediffError(f"detector '{name}': threshold must be in [0, 1], got {t:g}")
        detector.threshold = t
    return detector
