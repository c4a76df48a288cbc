"""What the training-based erasers (ESD, TRCE stage 2) share: resumable state, parameter swapping, validation.

Resumable training state is one safetensors file, written atomically.

A checkpoint holds everything the next iteration depends on, so a resumed run is bit-identical to an uninterrupted
one: the trained parameters, the optimizer state (moments and step counts), the random generators' states (as uint8
tensors), the loss history and the iteration count. A *fingerprint* (hash of the method, its hyper-parameters, the
concepts and the base weights) guards against resuming a different run from the same file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from safediff.concepts import Concept
from safediff.errors import SafediffError

NOT_A_HYPERPARAMETER = {"hyperparameter": False}  # dataclass field metadata: not recorded, not a --param


def run_fingerprint(eraser, model, extra: dict) -> str:
    """Hash of what a checkpoint must match to be resumed: method, hyper-parameters except ``iterations`` (a run
    may be extended: the erasers' schedules are constant), the base weights, the edits already applied, ``extra``."""
    hp = {k: v for k, v in eraser.hyperparameters().items() if k != "iterations"}
    record = {"method": eraser.name, "hp": hp, "base": model.base_sha256, "parents": [e.digest for e in model.edits],
              **extra}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


@contextlib.contextmanager
def trainable(module: torch.nn.Module, params: dict[str, torch.nn.Parameter], frozen: dict[str, torch.Tensor]):
    """Only ``params`` require grad while active; on exit (also on error) they get their ``frozen`` values back and
    every parameter of ``module`` its former ``requires_grad``."""
    flags = {n: p.requires_grad for n, p in module.named_parameters()}
    try:
        module.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(frozen[n])
        for n, p in module.named_parameters():
            p.requires_grad_(flags[n])


@dataclass
class TrainingState:
    """What a training loop owns; ``save``/``load`` round-trip it exactly."""

    params: dict[str, torch.nn.Parameter]  # name -> the live parameter being trained
    optimizer: torch.optim.Optimizer | None
    generators: dict[str, torch.Generator]
    losses: list[float]
    iteration: int = 0

    def save(self, path: str | Path, fingerprint: str) -> None:
        tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in self.params.items()}
        opt = self.optimizer.state_dict()
        for idx, state in opt["state"].items():
            for key, value in state.items():
                if not torch.is_tensor(value):
                    value = torch.tensor(value)
                tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous()
        for name, g in self.generators.items():
            tensors[f"rng.{name}"] = g.get_state()
        tensors["losses"] = torch.tensor(self.losses, dtype=torch.float64)
        meta = {"fingerprint": fingerprint, "iteration": str(self.iteration),
                "param_groups": json.dumps(opt["param_groups"])}
        _save_atomic(tensors, Path(path), meta)

    def load(self, path: str | Path, fingerprint: str) -> bool:
        """Restore from ``path`` if it exists; False when there is nothing to resume. Mismatch -> SafediffError."""
        path = Path(path)
        if not path.is_file():
            return False
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise SafediffError(f"checkpoint '{path}' is unreadable ({e}); delete it to start over") from None
        if meta.get("fingerprint") != fingerprint:
            raise SafediffError(f"checkpoint '{path}' belongs to a different run (other method, hyper-parameters, "
                                "concepts or base model); delete it or choose another checkpoint path")
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(tensors[f"param.{n}"].to(p.device, p.dtype))
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = value
        self.optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
        for name, g in self.generators.items():
            g.set_state(tensors[f"rng.{name}"])
        self.losses = tensors["losses"].tolist()
        self.iteration = int(meta["iteration"])
        return True


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def keywords_of(concepts: list[Concept]) -> list[str]:
    words = list(dict.fromkeys(k for c in concepts for k in c.keywords if k.strip()))
    if not words:
        raise SafediffError("no concept keywords to erase; give at least one concept with a keyword")
    return words


def number(name: str, value, kind, minimum=None):
    try:
        out = kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError):
        raise SafediffError(f"{name} must be a number, got {value!r}") from None
    if kind is int and float(value) != out:
        raise SafediffError(f"{name} must be a whole number, got {value!r}")
    if minimum is not None and out < minimum:
        raise SafediffError(f"{name} must be >= {minimum}, got {value!r}")
    return out


def loss_summary(losses: list[float], n: int = 10) -> dict:
    """Mean loss of the first and last ``n`` iterations (recorded in the edit's info)."""
    if not losses:
        return {"loss_first": None, "loss_last": None}
    return {"loss_first": sum(losses[:n]) / len(losses[:n]), "loss_last": sum(losses[-n:]) / len(losses[-n:])}
