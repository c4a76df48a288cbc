"""Which parameters a training eraser updates: named groups over the denoiser and the text encoder(s), by edit name.

Edit names carry their component (``unet.…`` / ``transformer.…``, ``text_encoder.…``, ``text_encoder_2.…``,
``text_encoder_3.…``; ``safediff.edits``). Groups:

- ``text_encoder``: every transformer layer and the final layer norm of every CLIP text encoder (AdvUnlearn's
  ``text_encoder_full``: the token and position embeddings stay; SDXL: both encoders; SD3: CLIP-L and CLIP-G; FLUX:
  CLIP-L). T5 (SD3's ``text_encoder_3``, FLUX's ``text_encoder_2``) is never in it: its layers are named
  ``encoder.block.…`` and its final norm ``encoder.final_layer_norm``, a CLIP's ``[text_model.]encoder.layers.…``
  and ``[text_model.]final_layer_norm``;
- ``text_encoder_all``: every parameter of every text encoder, embeddings included (DES's reference);
- denoiser groups, by role (``safediff.adapters.roles``, as ESD's variants): ``xattn`` = where text and image meet
  (UNet ``attn2``; MM-DiT every block's attention, ESD-x); ``kv`` = the text key/value projections (UNet
  ``attn2.to_k``/``to_v``; MM-DiT ``attn.add_k_proj``/``add_v_proj``, ESD-x-strict); ``noxattn`` = ESD-u's set
  (everything but those and the timestep/added embeddings, the output head and MM-DiT's text-only layers);
  ``full``: every denoiser parameter.
"""

from __future__ import annotations

import torch

from safediff.erasers.esd import is_trained
from safediff.errors import SafediffError

TEXT_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3")
DENOISER_COMPONENTS = ("unet", "transformer")
GROUPS = {
    "text_encoder": "CLIP text-encoder transformer layers and final layer norm",
    "text_encoder_all": "every text-encoder parameter",
    "xattn": "denoiser text-image attention (UNet attn2; MM-DiT attn)",
    "kv": "denoiser text key/value projections",
    "noxattn": "denoiser without text attention, time embedding, output head",
    "full": "every denoiser parameter",
}
_DENOISER_VARIANTS = {"xattn": "x", "kv": "x-strict", "noxattn": "u"}


def check_group(group: str, owner: str) -> str:
    """``group`` if it is a known group; else one SafediffError line naming the accepted ones."""
    if group not in GROUPS:
        raise SafediffError(f"{owner}: unknown module '{group}'; accepted: {', '.join(GROUPS)}")
    return group


def is_text_group(group: str) -> bool:
    return group.startswith("text_encoder")


def in_group(group: str, name: str) -> bool:
    """Whether the edit name ``name`` (``unet.…``, ``transformer.…``, ``text_encoder.…``) belongs to ``group``."""
    component, _, rest = name.partition(".")
    if is_text_group(group):
        if component not in TEXT_COMPONENTS:
            return False
        rest = rest.removeprefix("text_model.")  # CLIPTextModelWithProjection nests it; CLIPTextModel may not
        return group == "text_encoder_all" or rest.startswith(("encoder.layers.", "final_layer_norm."))
    if component not in DENOISER_COMPONENTS:
        return False
    return group == "full" or is_trained(_DENOISER_VARIANTS[group], name)


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


def all_weights(model) -> torch.nn.ModuleList:
    """Every weight module of ``model`` (denoiser, text encoders, VAE): what ``training.trainable`` freezes around
    the trained group, so no other parameter collects gradients."""
    return torch.nn.ModuleList(model.weight_modules())


def denoiser_names(model, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The denoiser entries of an edit-name dict, keyed by the denoiser's own names (what ``denoiser_output``
    substitutes)."""
    prefix = model.adapter.denoiser_component + "."
    return {n.removeprefix(prefix): t for n, t in params.items() if n.startswith(prefix)}
