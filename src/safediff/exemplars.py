"""Images that show a concept, or that show none of several concepts, named by the concept presets.

A ``Concept`` says where images of it come from in its ``exemplars`` field, ``SOURCE:ARGUMENT``:

- ``sandbox:VALUE``: scenes the sandbox world renders (``safediff.sandbox.exemplars``), exact by construction.

Erasers that learn from images (SafeGen) read them here, so method code never asks which world it runs on; on real
models the user gives a folder instead (``safediff.imagesets.folder_arrays``).
"""

from __future__ import annotations

import numpy as np

from safediff.concepts import Concept
from safediff.errors import SafediffError

SOURCES = ("sandbox",)


def _arguments(concepts: list[Concept]) -> tuple[str, list[str]] | None:
    specs = [c.exemplars for c in concepts]
    if not all(specs):
        return None
    sources = {s.partition(":")[0] for s in specs}
    if len(sources) != 1 or not sources <= set(SOURCES):
        raise SafediffError(f"concept exemplars {specs} mix sources or name an unknown one; accepted: "
                            + ", ".join(f"{s}:..." for s in SOURCES))
    return sources.pop(), [s.partition(":")[2] for s in specs]


def has_exemplars(concepts: list[Concept]) -> bool:
    """Whether every concept names where images of it come from."""
    return _arguments(concepts) is not None


def exemplar_images(concepts: list[Concept], n: int, seed: int, present: bool = True) -> np.ndarray:
    """uint8 [n, H, W, 3]: images each showing one of ``concepts`` (in turn), or with ``present=False`` images
    showing none of them; deterministic in ``seed``. SafediffError when a concept names no exemplars."""
    found = _arguments(concepts)
    if found is None:
        missing = [c.name for c in concepts if not c.exemplars]
        raise SafediffError(f"no exemplar images are known for {', '.join(missing)}; give a folder of images")
    _, arguments = found
    from safediff.sandbox.exemplars import render

    return render(arguments, n, seed, present)
