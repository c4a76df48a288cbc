"""What the training-based erasers (ESD, TRCE stage 2, MACE's and RealEra's LoRAs) share: the training loop,
resumable state, parameter swapping.

Resumable training state is one safetensors file, written atomically.

A checkpoint holds everything the next iteration depends on, so a resumed run is bit-identical to an uninterrupted
one: the trained parameters, the optimizer state (moments and step counts), the random generators' states (as uint8
tensors), the loss history and the iteration count. A *fingerprint* (hash of the method, its hyper-parameters, the
concepts and the base weights) guards against resuming a different run from the same file.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm

from safediff.concepts import Concept
from safediff.errors import SafediffError
from safediff.hashing import json_sha256
from safediff.storage import write_bytes_atomic

def run_fingerprint(eraser, model, extra: dict) -> str:
    """Hash of what a checkpoint must match to be resumed: method, hyper-parameters except ``iterations`` (a run
    may be extended: the erasers' schedules are constant), the base weights, the edits already applied, ``extra``."""
    hp = {k: v for k, v in eraser.hyperparameters().items() if k != "iterations"}
    record = {"method": eraser.name, "hp": hp, "base": model.base_sha256, "parents": [e.digest for e in model.edits],
              **extra}
    return json_sha256(record)


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
        from safetensors.torch import save

        write_bytes_atomic(Path(path), save(tensors, metadata=meta))

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


def keywords_of(concepts: list[Concept]) -> list[str]:
    words = list(dict.fromkeys(k for c in concepts for k in c.keywords if k.strip()))
    if not words:
        raise SafediffError("no concept keywords to erase; give at least one concept with a keyword")
    return words


def loss_summary(losses: list[float], n: int = 10) -> dict:
    """Mean loss of the first and last ``n`` iterations (recorded in the edit's info)."""
    if not losses:
        return {"loss_first": None, "loss_last": None}
    return {"loss_first": sum(losses[:n]) / len(losses[:n]), "loss_last": sum(losses[-n:]) / len(losses[-n:])}


def train(state: TrainingState, iterations: int, step: Callable[[int], tuple[torch.Tensor, dict]], *,
          checkpoint: str | None, checkpoint_every: int, fingerprint: str, desc: str, progress: bool,
          max_grad_norm: float | None = None) -> None:
    """The one loop of the training erasers: ``step(iteration)`` draws a batch and returns (loss, info shown on the
    progress bar); gradients are zeroed before each step (no accumulation across steps), clipped to a total norm of
    ``max_grad_norm`` when given (parameters without a gradient this step are left out), the loss is recorded, and
    the state is checkpointed every ``checkpoint_every`` iterations and at the end."""
    with tqdm(total=iterations, initial=min(state.iteration, iterations), desc=desc, disable=not progress,
              leave=False) as bar:
        while state.iteration < iterations:
            state.optimizer.zero_grad(set_to_none=True)
            loss, info = step(state.iteration)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([p for p in state.params.values() if p.grad is not None],
                                               max_grad_norm)
            state.optimizer.step()
            state.losses.append(loss.item())
            state.iteration += 1
            bar.update(1)
            bar.set_postfix(loss=f"{state.losses[-1]:.4g}", **info)
            if checkpoint and (state.iteration % checkpoint_every == 0 or state.iteration == iterations):
                state.save(checkpoint, fingerprint)
