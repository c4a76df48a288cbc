"""Erasers, built by spec: ``build_eraser("uce:lamb=0.3")`` (safediff's one option grammar)."""

from __future__ import annotations

import dataclasses

from safediff.errors import SafediffError
from safediff.options import Spec, typed_values
from safediff.registry import ERASERS


def build_eraser(spec, **settings):
    """``NAME[:KEY=VALUE,...]`` -> the eraser, its options typed by its fields; ``settings`` (values in code, e.g. a
    class's ``sandbox`` settings) go under the spec's options."""
    parsed = Spec.parse(spec, "eraser")
    cls = ERASERS.get(parsed.name)
    owner = f"eraser {parsed.name}"
    if parsed.preset is not None:
        raise SafediffError(f"{owner} has no presets; got '{parsed.preset}' (give KEY=VALUE options)")
    unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise SafediffError(f"{owner} does not take {', '.join(unknown)}")
    return cls(**{**settings, **typed_values(cls, parsed.options, owner)})
