"""A guard on an edited model, reading its concept through the weights the edits replaced (``concept_weights=base``).

A guard that steers away from a concept reads that concept through the model it runs on: SLD's safety branch ε_S,
CASG's category branches and the negative-prompt branch are noise predictions of the concept text by the same text
encoder and UNet that generate. On an edited model these are the edited weights: once UCE has mapped the
cross-attention keys and values of "red" onto the guide's, ε_S("red") is the guide's prediction, the safety
direction ε_S − ε_∅ shrinks, and stacking the guard on the eraser guards less than the guard alone (old sandbox:
SLD-max's rate on the UCE model rose from 0.125 to 0.375).

``concept_weights`` is an option of every guard whose concept lives in branches of its own (``sld``, ``casg-sld``,
``negative-prompt``) or is read once when generation starts (``adavd``: its value targets t_k = W_v e_k):

- ``edited`` (default, the papers' definition: a guard reads the model it runs on): nothing changes, and nothing is
  recorded, so existing results keep their protocol;
- ``base``: the guard's concept texts are encoded with the text-encoder weights the edits replaced, and its concept
  branches are evaluated with the UNet weights the edits replaced, inside the same one UNet call. A forward hook on
  every UNet module that owns an edited parameter recomputes that module's output for the concept branches' rows with
  the unedited parameters and splices it into the batch. The modules that hold parameters compute each sample on its
  own (linear and convolution layers, group and layer norms; attention mixes tokens within a sample only), so the
  concept rows follow exactly the unedited model while the ∅ and prompt rows follow the edited one: the eraser
  removes the concept from what the prompt asks, the guard steers away from the concept as the unedited model knows
  it. Extra cost: the hooked modules run once more on the concept rows (K/V edits: the cross-attention
  projections only). A guard that reads its concept once in ``start`` (AdaVD) does so with every edited weight set
  to its base value for that call: AdaVD then removes from the edited model's values the directions the unedited
  model gives the concept's keywords. No extra cost per step.

SD3 / FLUX: the same, on the transformer (``transformer.…`` edits): the hooked modules (linear layers, norms) also
compute each sample on its own, and joint attention mixes text and image tokens within a sample only; FLUX's packed
latents keep the batch first. The guards these apply to run there with CFG on (FLUX: guidance > 1).

The base value of a parameter is the one the *first* applied edit touching it replaced (``Edit.originals``), so a
stack ``SPEC+A+B`` reads the concept through the loaded weights. Without edits ``base`` equals ``edited``.
"""

from __future__ import annotations

import contextlib

import torch

from safediff.errors import SafediffError
from safediff.guards.base import GenerationContext, Session

MODES = ("edited", "base")


def base_weights(model) -> dict[str, torch.Tensor]:
    """Edit name -> the value before any of ``model``'s edits (the first edit that replaced it holds it)."""
    out: dict[str, torch.Tensor] = {}
    for edit in model.edits:
        for name, tensor in edit.originals(model).items():
            out.setdefault(name, tensor)
    return out


class UneditedRows(contextlib.AbstractContextManager):
    """Forward hooks on the denoiser modules that own parameters in ``base`` (its names -> values): the batch rows
    ``rows()`` returns (a LongTensor, or None) get the module's output under the base parameters."""

    def __init__(self, denoiser: torch.nn.Module, base: dict[str, torch.Tensor], rows):
        self.denoiser, self.base, self.rows = denoiser, base, rows
        self.owners = sorted({name.rpartition(".")[0] for name in base})  # modules owning an edited parameter
        self.handles: list = []
        self.inside = False

    def __enter__(self):
        for owner in self.owners:
            module = self.denoiser.get_submodule(owner)
            # every base value inside this module (a child's too), relative to it, in the module's dtype and device
            values = {n[len(owner) + 1:]: v for n, v in self.base.items() if n.startswith(owner + ".")}
            values = {k: v.to(device=p.device, dtype=p.dtype) for k, v in values.items()
                      for p in [module.get_parameter(k)]}
            self.handles.append(module.register_forward_hook(self._hook(values), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()
        return False

    def _hook(self, values: dict[str, torch.Tensor]):
        def hook(module, args, kwargs, output):
            rows = self.rows()
            if self.inside or rows is None or not torch.is_tensor(output) or len(rows) == 0:
                return output
            n = output.shape[0]
            rows = rows.to(output.device)

            def pick(x):
                return x[rows] if torch.is_tensor(x) and x.ndim > 0 and x.shape[0] == n else x

            self.inside = True  # the recomputation below calls the module, i.e. this hook, again
            try:
                alt = torch.func.functional_call(module, values, tuple(pick(a) for a in args),
                                                 {k: pick(v) for k, v in kwargs.items()}, strict=False)
            finally:
                self.inside = False
            return output.index_copy(0, rows, alt.to(output.dtype))
        return hook


class BaseConceptSession(Session):
    """Wraps a guard's session: records which rows of each denoiser call are concept branches and hooks the
    denoiser."""

    def __init__(self, inner: Session, base_denoiser: dict[str, torch.Tensor]):
        super().__init__(inner.ctx)
        self.inner, self.base_denoiser = inner, base_denoiser
        self.rows: torch.Tensor | None = None

    def branches(self, i: int):
        out = self.inner.branches(i)
        concept = self.inner.concept_branches(len(out))
        b = len(out[0])
        self.rows = torch.cat([torch.arange(k * b, (k + 1) * b) for k in concept]) if concept else None
        return out

    def combine(self, i: int, t: torch.Tensor, eps: list[torch.Tensor]) -> torch.Tensor:
        return self.inner.combine(i, t, eps)

    def unet_hooks(self) -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        stack.enter_context(self.inner.unet_hooks())
        stack.enter_context(UneditedRows(self.ctx.model.denoiser, self.base_denoiser, lambda: self.rows))
        return stack


class BaseConceptGuard:
    """``GUARD,concept_weights=base``: the wrapped guard with its concept read through the unedited weights."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):  # everything else (name, presets, CASG's chosen categories) is the guard's own
        return getattr(self.inner, name)

    def start(self, ctx: GenerationContext) -> Session:
        from safediff.erasers.base import weights_set_to

        base = base_weights(ctx.model)
        prefix = ctx.model.adapter.denoiser_component + "."
        denoiser = {n.removeprefix(prefix): t for n, t in base.items() if n.startswith(prefix)}
        text = {n: t for n, t in base.items() if not n.startswith(prefix)}
        if not self.inner.concept_branches:  # it reads its concept in start() only: all of it through base weights
            with weights_set_to(ctx.model, base), torch.no_grad():  # a constant, as the unedited weights are
                return self.inner.start(ctx)
        with weights_set_to(ctx.model, text):  # these guards encode only their concept texts in start()
            session = self.inner.start(ctx)
        return BaseConceptSession(session, denoiser) if denoiser else session

    def config(self) -> dict:
        return {**self.inner.config(), "concept_weights": "base"}


def with_concept_weights(guard, mode: str):
    """The guard as ``concept_weights=mode`` asks; an unknown mode or a guard without concept branches -> one
    SafediffError line."""
    if mode not in MODES:
        raise SafediffError(f"guard {guard.name}: concept_weights must be one of {', '.join(MODES)}, got '{mode}'")
    if mode == "edited":
        return guard
    if not (guard.concept_branches or guard.concept_read_at_start):
        raise SafediffError(f"guard {guard.name} has no concept branches to read through unedited weights; "
                            "concept_weights=base is available for sld, casg-sld, negative-prompt, adavd")
    return BaseConceptGuard(guard)
