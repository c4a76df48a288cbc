"""Inference-time guards, built by name: ``build_guard("sld:max", "sexual")``."""

from __future__ import annotations

from safediff.concepts import resolve
from safediff.errors import SafediffError
from safediff.guards.base import Guard, NoGuard
from safediff.registry import GUARDS


def build_guard(spec: str | None, concept: str | None = None) -> Guard:
    """``NAME[:PRESET]`` plus a concept spec (a preset name, ``a,b`` or free text); None/"none" -> plain CFG."""
    if not spec or spec == "none":
        if concept:
            raise SafediffError("--concept needs a --guard (e.g. --guard sld:max); accepted guards: "
                                + ", ".join(GUARDS.names()))
        return NoGuard()
    name, _, preset = spec.partition(":")
    cls = GUARDS.get(name)
    concepts = resolve(concept if concept is not None else cls.default_concept)
    return cls(concepts, preset=preset or None)
