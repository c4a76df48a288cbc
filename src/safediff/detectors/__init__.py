"""Detectors, built by spec: ``build_detector("nudenet:exposed9,threshold=0.45")``.

The spec grammar is safediff's one grammar (``safediff.options``): ``NAME[:PRESET][,KEY=VALUE...]``; the preset and
the other options are the detector's constructor arguments, typed by their annotations; ``threshold`` (every
detector's decision threshold) is a number in [0, 1].
"""

from __future__ import annotations

import inspect

from safediff.detectors.base import Detector
from safediff.errors import SafediffError
from safediff.options import Spec, Param, convert, typed_values
from safediff.registry import DETECTORS

THRESHOLD = Param("threshold", "float", 0.0, 1.0)


def build_detector(spec: str | Spec) -> Detector:
    parsed = Spec.parse(spec, "detector")
    cls = DETECTORS.get(parsed.name)
    owner = f"detector '{parsed.name}'"
    options = dict(parsed.options)
    threshold = options.pop("threshold", None)
    accepted = [k for k in inspect.signature(cls.__init__).parameters if k not in ("self", "preset", "threshold")]
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise SafediffError(f"{owner}: unknown option '{unknown[0]}'; accepted: {', '.join([*accepted, 'threshold'])}")
    kwargs = typed_values(cls.__init__, options, owner)
    if parsed.preset is not None:
        if "preset" not in inspect.signature(cls.__init__).parameters:
            raise SafediffError(f"{owner} has no presets; got '{parsed.preset}'")
        kwargs["preset"] = parsed.preset
    detector = cls(**kwargs)
    if threshold is not None:
        detector.threshold = convert(THRESHOLD, threshold, owner)
    return detector
