"""A text-sensitive tiny model and paired, fixed-probe estimates of the white-box attacks' objectives.

A random tiny UNet barely reads its text (token choice moves the denoising error by ~1e-4 while one noise draw moves
it by ~1e-1), so the recipes' objectives are tested on a copy whose cross-attention keys/values are scaled up.
Objectives are compared on the SAME probe draws (t, ε), so differences come from the tokens alone.
"""

from __future__ import annotations

import torch

from safediff.attacks.objectives import denoising_error, noise_matching
from safediff.attacks.spaces import TokenSlots, vocabulary


def text_sensitive(model, gain: float = 30.0):
    with torch.no_grad():
        for _, linear in model.adapter.text_kv():
            linear.weight.mul_(gain)
    return model


@torch.no_grad()
def denoising_probe(target, prompt: str, x0, slot_ids, k: int, t: int, layout: str = "prefix", n: int = 16) -> float:
    slots = TokenSlots(target.model, prompt, k, layout)
    ids = torch.as_tensor(slot_ids)
    cond = slots.encode(slots.embeddings_of(ids), ids)
    g = torch.Generator().manual_seed(123)
    losses = [denoising_error(target, cond, x0, torch.tensor([t]), torch.randn(x0.shape, generator=g)).item()
              for _ in range(n)]
    return sum(losses) / n


@torch.no_grad()
def matching_probe(target, prompt: str, x0, slot_ids, layout: str, n: int = 32) -> float:
    slots = TokenSlots(target.model, prompt, len(slot_ids), layout)
    ids = torch.as_tensor(slot_ids)
    cond = slots.encode(slots.embeddings_of(ids), ids)
    ref = target.reference.adapter.encode([prompt])
    g = torch.Generator().manual_seed(123)
    total = 0.0
    for _ in range(n):
        t = torch.randint(0, 1000, (1,), generator=g)
        total += noise_matching(target, cond, ref, x0, t, torch.randn(x0.shape, generator=g)).item()
    return total / n


def random_slot_ids(model, k: int, n: int, seed: int = 0) -> list[list[int]]:
    vocab = vocabulary(model.adapter.tokenizers[0], "words")
    g = torch.Generator().manual_seed(seed)
    return [vocab[torch.randint(len(vocab), (k,), generator=g)].tolist() for _ in range(n)]
