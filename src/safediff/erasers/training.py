"""What the training-based erasers share: the training loop, resumable state, parameter swapping (the x_t
draws on the model's own trajectories are ``sampling.Trajectories``).

- ``train``: the one loop (zeroed gradients, optional gradient clipping and learning-rate factor per iteration,
  periodic checkpoints); ``TrainingState``: what it owns, saved and resumed bit-identically; ``Fit``: one run
  around a set of parameters (and side tensors), from checkpoint to trained values, the model restored;
  ``fit_denoiser``: a ``Fit`` of denoiser parameters in one call;
- ``cosine_restarts``: diffusers' cosine schedule with hard restarts and linear warm-up, as a factor per iteration.

Resumable training state is one safetensors file, written atomically.

A checkpoint holds everything the next iteration depends on, so a resumed run is bit-identical to an uninterrupted
one: the trained parameters, the optimizer state (moments and step counts), the random generators' states (as uint8
tensors), the loss history, the iteration count and any other tensors a method carries from step to step (an
adversarial prompt, ``carried``). A *fingerprint* (hash of the method, its hyper-parameters, the
concepts and the base weights) guards against resuming a different run from the same file.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm

from safediff.concepts import Concept
from safediff.erasers.modules import all_weights
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
    carried: dict[str, torch.Tensor] = field(default_factory=dict)  # other state the next step reads

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
        tensors.update({f"carried.{n}": t.detach().cpu().contiguous() for n, t in self.carried.items()})
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
        self.carried = {k.removeprefix("carried."): v for k, v in tensors.items() if k.startswith("carried.")}
        self.iteration = int(meta["iteration"])
        return True


def shuffled(seed: int, epoch: int, n: int) -> torch.Tensor:
    """Epoch ``epoch``'s order of ``n`` items: a permutation drawn from (seed, epoch) alone, so a resumed run takes
    the same batches without carrying a generator."""
    import numpy as np

    g = torch.Generator().manual_seed(int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0]))
    return torch.randperm(n, generator=g)


def cycled(seed: int, n: int, start: int, count: int) -> list[int]:
    """Items ``start .. start+count-1`` of the endless sequence of epochs over ``n`` items (each ``shuffled``):
    sampling without replacement, restarted when the items run out (AdvUnlearn's retain prompts)."""
    orders: dict[int, torch.Tensor] = {}
    out = []
    for position in range(start, start + count):
        epoch, k = divmod(position, n)
        if epoch not in orders:
            orders[epoch] = shuffled(seed, epoch, n)
        out.append(int(orders[epoch][k]))
    return out


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
          backward: bool = True, max_grad_norm: float | None = None,
          lr_factor: Callable[[int], float] | None = None) -> None:
    """The one loop of the training erasers: ``step(iteration)`` draws a batch and returns (loss, info shown on the
    progress bar); gradients are zeroed before each step (no accumulation across steps), clipped to a total norm of
    ``max_grad_norm`` when given (parameters without a gradient this step are left out), each parameter group's
    learning rate is its initial one times ``lr_factor(iteration)`` when given, the loss is recorded, and the state
    is checkpointed every ``checkpoint_every`` iterations and at the end. With ``backward=False`` the step fills the
    gradients itself (masked or projected gradients: SalUn, DoCo) and the loop only applies them."""
    for group in state.optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    with tqdm(total=iterations, initial=min(state.iteration, iterations), desc=desc, disable=not progress,
              leave=False) as bar:
        while state.iteration < iterations:
            state.optimizer.zero_grad(set_to_none=True)
            if lr_factor is not None:
                for group in state.optimizer.param_groups:
                    group["lr"] = group["initial_lr"] * lr_factor(state.iteration)
            loss, info = step(state.iteration)
            if backward:
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


def cosine_restarts(warmup: int, total: int, cycles: int) -> Callable[[int], float]:
    """The learning-rate factor of iteration i under diffusers' ``cosine_with_restarts`` schedule (as the scheduler
    has been stepped i times): i/warmup during the warm-up, then ½(1 + cos(π ((cycles·p) mod 1))) with p the share
    of the remaining iterations done; 0 from ``total`` on."""
    def factor(i: int) -> float:
        if i < warmup:
            return i / max(1, warmup)
        p = (i - warmup) / max(1, total - warmup)
        return 0.0 if p >= 1.0 else 0.5 * (1.0 + math.cos(math.pi * ((cycles * p) % 1.0)))
    return factor


class Fit:
    """One resumable training run of ``params`` (and ``side`` tensors, e.g. a module trained alongside, checkpointed
    but not part of the edit), as a context: inside it only they require grad (``trainable`` over ``module``, by
    default every weight of the model) and gradients are on; on exit ``params`` get their original values
    (``frozen``, copied here unless the caller holds them) and every flag its former value. ``start`` takes the
    optimizer and resumes from ``eraser.checkpoint`` when it exists (its fingerprint: ``run_fingerprint(eraser,
    model, extra)``); ``train`` runs the loop (``eraser.iterations`` unless told); ``trained`` copies the values."""

    def __init__(self, eraser, model, params: dict[str, torch.nn.Parameter], generators: dict[str, torch.Generator],
                 extra: dict, progress: bool, *, frozen: dict[str, torch.Tensor] | None = None,
                 side: dict[str, torch.Tensor] | None = None, module: torch.nn.Module | None = None):
        self.eraser, self.params, self.side, self.progress = eraser, params, side or {}, progress
        self.frozen = frozen if frozen is not None else {n: p.detach().clone() for n, p in params.items()}
        self.state = TrainingState({**params, **self.side}, None, generators, losses=[])
        self.fingerprint = run_fingerprint(eraser, model, extra)
        self.module = module if module is not None else all_weights(model)
        self.resumed_at: int | None = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "Fit":
        self._stack.enter_context(trainable(self.module, self.params, self.frozen))
        self._stack.enter_context(torch.enable_grad())
        for t in self.side.values():
            t.requires_grad_(True)
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def start(self, optimizer: torch.optim.Optimizer) -> bool:
        """Use ``optimizer``; resume from the eraser's checkpoint if there is one. Whether it resumed."""
        self.state.optimizer = optimizer
        checkpoint = self.eraser.checkpoint
        resumed = self.state.load(checkpoint, self.fingerprint) if checkpoint else False
        self.resumed_at = self.state.iteration if resumed else None
        return resumed

    def train(self, step: Callable[[int], tuple[torch.Tensor, dict]], iterations: int | None = None,
              desc: str | None = None, **loop) -> None:
        """``train`` with the eraser's checkpoint settings; ``loop``: its ``backward``, ``max_grad_norm``,
        ``lr_factor``."""
        e = self.eraser
        train(self.state, e.iterations if iterations is None else iterations, step, checkpoint=e.checkpoint,
              checkpoint_every=e.checkpoint_every, fingerprint=self.fingerprint, desc=desc or e.name,
              progress=self.progress, **loop)

    def trained(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The current values of ``params``, named ``prefix + name``."""
        return {f"{prefix}{n}": p.detach().clone() for n, p in self.params.items()}


def fit_denoiser(eraser, model, params: dict[str, torch.nn.Parameter],
                 make_optimizer: Callable[[], torch.optim.Optimizer], step: Callable[[int], tuple[torch.Tensor, dict]],
                 generators: dict[str, torch.Generator], extra: dict, progress: bool,
                 side: dict[str, torch.Tensor] | None = None, max_grad_norm: float | None = None,
                 lr_factor: Callable[[int], float] | None = None, frozen: dict[str, torch.Tensor] | None = None
                 ) -> tuple[dict[str, torch.Tensor], TrainingState, int | None]:
    """``Fit`` of the denoiser parameters ``params`` (names as in ``model.denoiser.named_parameters()``) and the
    ``side`` tensors, from checkpoint to trained values. Returns the trained values (named as edits name them:
    ``unet.…``, ``transformer.…``), the state and the iteration resumed at (None for a fresh run)."""
    with Fit(eraser, model, params, generators, extra, progress, frozen=frozen, side=side,
             module=model.denoiser) as fit:
        fit.start(make_optimizer())
        fit.train(step, max_grad_norm=max_grad_norm, lr_factor=lr_factor)
        new = fit.trained(model.adapter.denoiser_component + ".")
    return new, fit.state, fit.resumed_at
