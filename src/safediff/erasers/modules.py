"""Which parameters of a model a training eraser updates: a parameter group (``adapters.roles.in_group``: named once,
by adapter role for the denoiser) read off the model, keyed by edit name or by the denoiser's own names."""

from __future__ import annotations

import torch

from safediff.adapters.roles import TEXT_COMPONENTS, in_group, is_text_group
from safediff.errors import SafediffError


def group_parameters(model, group: str) -> dict[str, torch.nn.Parameter]:
    """Edit name -> the live parameter, for every parameter of ``model`` in ``group``."""
    components = TEXT_COMPONENTS if is_text_group(group) else (model.adapter.denoiser_component,)
    out = {}
    for component in components:
        module = getattr(model.pipe, component, None)
        if isinstance(module, torch.nn.Module):
            out.update({f"{component}.{n}": p for n, p in module.named_parameters()
                        if in_group(group, f"{component}.{n}")})
    if not out:
        raise SafediffError(f"module '{group}' holds no parameter of this model")
    return out


def denoiser_group(model, group: str) -> dict[str, torch.nn.Parameter]:
    """Denoiser name (as ``named_parameters`` gives it, in that order) -> the live parameter, for every denoiser
    parameter in the denoiser group ``group``."""
    prefix = model.adapter.denoiser_component
    return {n: p for n, p in model.denoiser.named_parameters() if in_group(group, f"{prefix}.{n}")}


def all_weights(model) -> torch.nn.ModuleList:
    """Every weight module of ``model`` (denoiser, text encoders, VAE): what ``training.trainable`` freezes around
    the trained group, so no other parameter collects gradients."""
    return torch.nn.ModuleList(model.weight_modules())


def denoiser_keys(model, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The denoiser entries of an edit-name dict, keyed by the denoiser's own names (what ``denoiser_output``
    substitutes)."""
    prefix = model.adapter.denoiser_component + "."
    return {n.removeprefix(prefix): t for n, t in params.items() if n.startswith(prefix)}
