"""What every eraser shares: hyper-parameters as dataclass fields, ``fit`` -> ``Edit``, the contract's metadata.

An eraser is a dataclass whose fields are its hyper-parameters (with the method's defaults; ``safediff.options.option``
gives ranges and help). ``fit(model, concepts, preserve, guide)`` returns an :class:`~safediff.edits.Edit` and leaves
the model exactly as it found it (erasers that must try their edit on the model, e.g. RECE's per-epoch validation,
restore the original tensors). Apply the result with ``edit.apply(model)``. Built from a spec by
``safediff.erasers.build_eraser("uce:lamb=0.3")``.

Class metadata read by the demo, the benchmarks and the contract suite (``tests/contract``):
- ``sandbox``: settings per purpose on the sandbox: ``benchmark`` (``benchmarks/erasers_sandbox_v2.py``), ``demo``
  (``safediff demo``, sized for its 10-minute budget) and ``smoke`` (``demo --quick`` and the contract tests on tiny
  models: the fewest steps that exercise every code path);
- ``touches(name)``: whether a parameter name (``unet.….attn2.to_k.weight``) is one the method may change;
- ``zero_strength``: settings under which the method must leave the model unchanged;
- ``archs``: the architectures (``Adapter.arch``: sd1, sd2, sdxl, sd3, flux) the method runs on, empty for all;
  ``fit`` refuses the others in one line with ``archs_reason`` (why, and what to use instead).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from safediff.concepts import Concept
from safediff.errors import SafediffError
from safediff.options import check_fields
from safediff.records import provenance


@dataclass
class Eraser:
    name: ClassVar[str] = ""  # registry name
    paper: ClassVar[str] = ""  # citation recorded with every edit
    sandbox: ClassVar[dict[str, dict]] = {}  # settings per purpose: "benchmark", "demo", "smoke"
    zero_strength: ClassVar[dict] = {}  # settings that must leave the model unchanged
    archs: ClassVar[tuple[str, ...]] = ()  # Adapter.arch values the method runs on; () = every architecture
    archs_reason: ClassVar[str] = ""  # why the others are refused, and what to use instead

    def __post_init__(self):
        check_fields(self, f"eraser {self.name}")

    # subclasses implement -----------------------------------------------------------------------------------
    def compute(self, model, concepts: list[Concept], preserve: list[str] | None, guide: str | None,
                progress: bool) -> tuple[dict[str, torch.Tensor], dict]:
        """New values of the parameters this method changes (``unet.…`` names), and a JSON-able info dict."""
        raise NotImplementedError

    def touches(self, name: str) -> bool:
        """Whether the method may change the parameter ``name`` (e.g. ``unet.….attn2.to_k.weight``)."""
        raise NotImplementedError

    # shared -------------------------------------------------------------------------------------------------
    def fit(self, model, concepts: list[Concept], preserve: list[str] | None = None, guide: str | None = None,
            progress: bool = True):
        """Compute the edit that makes ``model`` (as it is now, edits included) forget ``concepts``.

        ``preserve``: prompts/concepts to keep (default: each concept's own preserve list; "" is always kept by the
        closed-form methods). ``guide``: what the concepts are mapped to (default: each concept's guide, "" =
        unconditional). The model is not modified.
        """
        from safediff.adapters import require_arch
        from safediff.edits import Edit, changed_tensors

        require_arch("eraser", self.name, self.archs, self.archs_reason, model.adapter)
        concepts = list(concepts)
        if not concepts:
            raise SafediffError("no concept to erase; give at least one (e.g. --concept red)")
        base = model.base_sha256  # must be read before anything touches the weights
        parents = [e.digest for e in model.edits]
        start = time.perf_counter()
        with torch.no_grad():
            tensors, info = self.compute(model, concepts, preserve, guide, progress)
        seconds = time.perf_counter() - start
        changed = changed_tensors(model, tensors)
        metadata = {
            "method": self.name,
            "paper": self.paper,
            "hyperparameters": self.hyperparameters(),
            "concepts": [dataclasses.asdict(c) for c in concepts],
            "preserve": None if preserve is None else list(preserve),
            "guide": guide,
            "base_weights_sha256": base,
            "base": {"spec": model.spec, "architecture": model.adapter.arch,
                     "dtype": str(model.dtype).replace("torch.", "")},
            "parents": parents,
            "fit_seconds": round(seconds, 3),
            # CPU float reductions depend on the thread count (recorded in the provenance), so a trained edit
            # reproduces bit for bit only with it and the device
            "device": str(model.device),
            "provenance": provenance(),
            "info": info,
        }
        return Edit(changed, metadata)

    def hyperparameters(self) -> dict:
        """Every dataclass field that is a hyper-parameter (callables such as validators are left out)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.metadata.get("hyperparameter", True)}


def fit_to_file(eraser: Eraser, model, concepts: list[Concept], out: Path, **fit_kwargs):
    """Fit and save the edit to ``out``, a new file (atomically; never replacing a file another run wrote meanwhile).
    Iterative erasers (ESD, TRCE) checkpoint to ``OUT.checkpoint.safetensors`` unless given a checkpoint: the same
    call after a crash resumes where it stopped; the checkpoint is removed once the edit is saved."""
    from safediff.storage import check_writable, remove_stale_temporaries

    out = Path(out)
    if out.exists():
        raise SafediffError(f"--out '{out}' exists; choose a new file")
    check_writable(out)
    remove_stale_temporaries(out.parent, out.name)
    checkpoint = None
    if "checkpoint" in {f.name for f in dataclasses.fields(eraser)} and eraser.checkpoint is None:
        checkpoint = out.with_name(out.name.removesuffix(".safetensors") + ".checkpoint.safetensors")
        eraser = dataclasses.replace(eraser, checkpoint=str(checkpoint))
    edit = eraser.fit(model, concepts, **fit_kwargs)
    try:
        edit.save(out, exclusive=True)
    except FileExistsError:
        raise SafediffError(f"--out '{out}' was written by another run while this one fitted; nothing was "
                            "overwritten (this edit is lost: choose a new --out and run again)") from None
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    return edit


def _jsonable(value):
    if isinstance(value, tuple):
        return list(value)
    return value


@contextlib.contextmanager
def weights_set_to(model, tensors: dict[str, torch.Tensor]):
    """Temporarily give ``model`` these parameter values; the exact original tensors are restored on exit."""
    from safediff.edits import resolve_parameter

    params = {name: resolve_parameter(model, name) for name in tensors}
    saved = {name: p.detach().clone() for name, p in params.items()}
    try:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[name].to(device=p.device, dtype=p.dtype))
        yield model
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])
