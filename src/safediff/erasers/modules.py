"""Which parameters a training eraser updates: named groups over the UNet and the text encoder(s), by edit name.

Edit names carry their component (``unet.…``, ``text_encoder.…``, ``text_encoder_2.…``; ``safediff.edits``). Groups:

- ``text_encoder``: every transformer layer and the final layer norm of every text encoder (AdvUnlearn's
  ``text_encoder_full``: the token and position embeddings stay; SDXL: both encoders);
- ``text_encoder_all``: every parameter of every text encoder, embeddings included (DES's reference);
- ``xattn``: the UNet's cross-attention blocks ``attn2`` (ESD-x); ``kv``: ``attn2.to_k``/``to_v`` only;
- ``noxattn``: the UNet without ``attn2``, the time/added embeddings and the output head (ESD-u, ESD's ``noxattn``);
- ``full``: every UNet parameter.
"""

from __future__ import annotations

import torch

from safediff.erasers.esd import is_trained
from safediff.errors import SafediffError

TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")
GROUPS = {
    "text_encoder": "text-encoder transformer layers and final layer norm",
    "text_encoder_all": "every text-encoder parameter",
    "xattn": "UNet cross-attention (attn2)",
    "kv": "UNet attn2.to_k / to_v",
    "noxattn": "UNet without attn2, time embedding, output head",
    "full": "every UNet parameter",
}
_UNET_VARIANTS = {"xattn": "x", "kv": "x-strict", "noxattn": "u"}


def check_group(group: str, owner: str) -> str:
    """``group`` if it is a known group; else one SafediffError line naming the accepted ones."""
    if group not in GROUPS:
        raise SafediffError(f"{owner}: unknown module '{group}'; accepted: {', '.join(GROUPS)}")
    return group


def in_group(group: str, name: str) -> bool:
    """Whether the edit name ``name`` (``unet.…``, ``text_encoder.…``) belongs to ``group``."""
    component, _, rest = name.partition(".")
    if group.startswith("text_encoder"):
        if component not in TEXT_COMPONENTS:
            return False
        rest = rest.removeprefix("text_model.")  # CLIPTextModelWithProjection nests it; CLIPTextModel may not
        return group == "text_encoder_all" or rest.startswith(("encoder.", "final_layer_norm."))
    if component != "unet":
        return False
    return group == "full" or is_trained(_UNET_VARIANTS[group], rest)


def is_text_group(group: str) -> bool:
    return group.startswith("text_encoder")


def group_parameters(model, group: str) -> dict[str, torch.nn.Parameter]:
    """Edit name -> the live parameter, for every parameter of ``model`` in ``group``."""
    components = TEXT_COMPONENTS if is_text_group(group) else ("unet",)
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
    """Every weight module of ``model`` (UNet, text encoders, VAE): what ``training.trainable`` freezes around the
    trained group, so no other parameter collects gradients."""
    return torch.nn.ModuleList(model.weight_modules())


def unet_names(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The UNet entries of an edit-name dict, keyed by the UNet's own names (what ``denoiser_output`` substitutes)."""
    return {n.removeprefix("unet."): t for n, t in params.items() if n.startswith("unet.")}
