"""Cross-attention probabilities read during a UNet call, and concept masks drawn from them.

``cross_attention(unet, sink)`` adds a forward pre-hook to every text cross-attention block (``attn2``) for the
duration of a ``with`` block; each call's attention probabilities ``softmax(q kᵀ / √d)`` ([B·heads, N, L]: query
pixels N, text tokens L) are recomputed from the block's own projections (so weights substituted by
``sampling.denoiser_output(params=...)`` are used, and gradients flow) and handed to ``sink(block, probs)``. Nothing
the UNet computes is changed; the hooks are removed on exit.

Masks: an image's *concept mask* is where the concept is drawn. MACE trains inside it. Where a mask provider knows
the truth (the sandbox renders the concept's object: ``safediff.sandbox.masks``) it is exact; for any other model
``attention_masks`` generates the images and thresholds the mean cross-attention map of the concept's tokens
(DAAM-style: Tang et al. 2023), in place of the reference's Grounded-SAM. A segmenter (e.g. Grounded-SAM) plugs in
as a provider with the same signature: ``provider(concept, n, seed, height, width) -> MaskedImages``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

MASK_SOURCE = "cross-attention maps of the concept's tokens (mean over layers, heads and steps, / max, > threshold)"


@dataclass
class MaskedImages:
    """Images of a concept and where it is drawn in each."""

    pixels: torch.Tensor  # [n, 3, H, W] in [0, 1]
    masks: torch.Tensor  # [n, 1, H, W] bool
    source: str  # how the masks were made (recorded in the edit)


def cross_attention_probs(attn, hidden_states: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """[B·heads, N, L]: the attention probabilities ``attn`` (a diffusers ``Attention``) computes for these inputs."""
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    if attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    query = attn.head_to_batch_dim(attn.to_q(hidden_states))
    key = attn.head_to_batch_dim(attn.to_k(context))
    return attn.get_attention_scores(query, key, None)


@contextlib.contextmanager
def cross_attention(unet, sink: Callable[[torch.nn.Module, torch.Tensor], None]):
    """While active, ``sink(block, probs)`` receives every ``attn2`` call's attention probabilities."""
    def hook(module, args, kwargs):
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        if context is not None:
            sink(module, cross_attention_probs(module, args[0] if args else kwargs["hidden_states"], context))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True)
               for name, m in unet.named_modules() if name.endswith("attn2")]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def grid(n_pixels: int, height: int, width: int) -> tuple[int, int]:
    """(h, w) of a layer's query grid with ``n_pixels`` cells on a ``height`` x ``width`` latent (same aspect)."""
    h = round(math.sqrt(n_pixels * height / width))
    return h, n_pixels // h


def resized_mask(mask: torch.Tensor, n_pixels: int, height: int, width: int) -> torch.Tensor:
    """[B, N] bool: an image mask [B, 1, H, W] on a layer's query grid (nearest, as the reference)."""
    h, w = grid(n_pixels, height, width)
    return F.interpolate(mask.float(), size=(h, w), mode="nearest").flatten(1) > 0.5


@torch.no_grad()
def attention_masks(model, prompts: list[str], positions: list[list[int]], seeds: list[int],
                    threshold: float) -> MaskedImages:
    """Generate one image per prompt (its seed) and mask it where the mean cross-attention map of its ``positions``
    (the concept's token positions) exceeds ``threshold`` times its maximum."""
    from safediff.sampling import generate, latent_shape

    height, width = int(model.defaults["height"]), int(model.defaults["width"])
    _, lh, lw = latent_shape(model, height, width)
    pixels, masks = [], []
    for prompt, pos, seed in zip(prompts, positions, seeds):
        total = torch.zeros(lh, lw, dtype=torch.float64)

        def sink(block, probs, pos=pos):
            prompt_rows = probs[-block.heads:, :, pos].sum(-1).mean(0)  # the prompt's branch is the batch's last
            h, w = grid(prompt_rows.shape[0], lh, lw)
            up = F.interpolate(prompt_rows.reshape(1, 1, h, w).float(), size=(lh, lw), mode="bilinear")
            total.add_(up[0, 0].double().cpu())

        with cross_attention(model.unet, sink):
            image = generate(model, [prompt], [seed], progress=False).pixels
        mask = total / total.max().clamp_min(torch.finfo(torch.float64).tiny) > threshold
        pixels.append(image.cpu())
        masks.append(F.interpolate(mask[None, None].float(), size=(height, width), mode="nearest") > 0.5)
    return MaskedImages(torch.cat(pixels), torch.cat(masks), f"{MASK_SOURCE}, threshold {threshold:g}")
