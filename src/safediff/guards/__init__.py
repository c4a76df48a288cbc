"""Inference-time guards, built by spec: ``build_guard("sld:max,safety_scale=2000", "sexual")``."""

from __future__ import annotations

from safediff.concepts import resolve
from safediff.errors import SafediffError
from safediff.guards.base import Guard, NoGuard
from safediff.guards.unedited import with_concept_weights
from safediff.options import Spec
from safediff.registry import GUARDS


def build_guard(spec: str | Spec | None, concept: str | None = None) -> Guard:
    """``NAME[:PRESET][,KEY=VALUE...]`` plus a concept spec (a preset name, ``a,b`` or free text); None/"none" ->
    plain CFG. Every guard with concept branches also takes ``concept_weights=edited|base`` (``guards.unedited``:
    on an edited model, read the concept through the weights the edits replaced)."""
    if not spec or str(spec) == "none":
        if concept:
            raise SafediffError("--concept needs a --guard (e.g. --guard sld:max); accepted guards: "
                                + ", ".join(GUARDS.names()))
        return NoGuard()
    parsed = Spec.parse(spec, "guard")
    cls = GUARDS.get(parsed.name)
    concepts = resolve(concept if concept is not None else cls.default_concept)
    mode = parsed.options.pop("concept_weights", "edited")
    return with_concept_weights(cls(concepts, preset=parsed.preset, **parsed.options), mode)
