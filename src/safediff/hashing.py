"""sha256 identities of tensors, modules, files, bytes and JSON-able records: one implementation of each.

A tensor contributes ``"{key}:{dtype}:{shape}"`` and then its bytes (C order, CPU), so the same values under another
name, dtype or shape hash differently; 0-d and empty tensors are covered.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

import torch


def _update(h, key: str, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def tensors_sha256(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """Over (key, tensor) pairs in the order given."""
    h = hashlib.sha256()
    for key, t in named:
        _update(h, key, t)
    return h.hexdigest()


def state_sha256(modules: list[torch.nn.Module]) -> str:
    """Over every parameter and buffer of the modules, in order, each module's entries sorted by name (keys
    ``"{index}.{name}"``): a model's weights identity."""
    return tensors_sha256((f"{i}.{name}", t) for i, m in enumerate(modules)
                          for name, t in sorted(m.state_dict().items()))


def module_sha256(module: torch.nn.Module) -> str:
    """A detector network's identity: its state sorted by name, each tensor flattened (the layout detector records
    have always used)."""
    return tensors_sha256((name, t.reshape(-1)) for name, t in sorted(module.state_dict().items()))


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (detector weights, prompt sets, images), read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def canonical_json(data) -> str:
    """One text per value: sorted keys, no spaces, ``str`` for anything JSON has no type for."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def json_sha256(data) -> str:
    return bytes_sha256(canonical_json(data).encode())
