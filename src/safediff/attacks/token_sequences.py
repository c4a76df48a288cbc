"""Token-id sequences as text-encoder inputs: ``[BOS] x_1..x_K [EOS] pad...`` for every encoder of a model.

Searches over token ids (Ring-A-Bell's genomes, MMA's GCG) encode whole populations in batched forward passes
through ``adapter.encode_token_embeddings``; slots can carry soft rows (one-hot @ W, for token gradients) instead
of looked-up embeddings. Every tokenizer of the model must share one vocabulary (true of SD 1.x/2.x and SDXL).
"""

from __future__ import annotations

import math

import torch

from safediff.errors import SafediffError
from safediff.adapters import Conditioning


def check_shared_vocabulary(adapter) -> int:
    sizes = {len(t) for t in adapter.tokenizers}
    if len(sizes) != 1:
        raise SafediffError(f"token search needs one vocabulary for all text encoders, got sizes {sorted(sizes)}")
    return sizes.pop()


def sequence_ids(adapter, tokens: torch.Tensor) -> list[torch.Tensor]:
    """[P, K] token ids -> per tokenizer [P, max_length]: BOS, the K tokens, EOS, then that tokenizer's pad."""
    out = []
    for tok in adapter.tokenizers:
        p, k = tokens.shape
        if k + 2 > tok.model_max_length:
            raise SafediffError(f"{k} tokens do not fit the text encoder's {tok.model_max_length}-token window")
        ids = torch.full((p, tok.model_max_length), tok.pad_token_id, dtype=torch.long)
        ids[:, 0] = tok.bos_token_id
        ids[:, 1:k + 1] = tokens
        ids[:, k + 1] = tok.eos_token_id
        out.append(ids)
    return out


def encode_tokens(adapter, tokens: torch.Tensor, soft: torch.Tensor | None = None) -> Conditioning:
    """Conditioning of the sequences ``tokens`` [P, K]; with ``soft`` [P, K, |V|] the K slots' embeddings are
    ``soft @ W`` (differentiable) instead of rows of W."""
    ids = sequence_ids(adapter, tokens)
    embeds = []
    for k, te in enumerate(adapter.text_encoders):
        table = adapter.token_embedding(k).weight
        e = table[ids[k].to(table.device)]
        if soft is not None:
            slots = soft.to(table.dtype) @ table
            e = torch.cat([e[:, :1], slots, e[:, tokens.shape[1] + 1:]], dim=1)
        embeds.append(e)
    return adapter.encode_token_embeddings(ids, embeds)


def encode_in_chunks(adapter, tokens: torch.Tensor, chunk: int) -> Conditioning:
    """``encode_tokens`` over ``tokens`` [P, K] in forward passes of at most ``chunk`` sequences."""
    return Conditioning.cat([encode_tokens(adapter, tokens[i:i + chunk]) for i in range(0, len(tokens), chunk)])


def chunks(n: int, chunk: int) -> int:
    """Forward passes needed to encode n sequences in chunks."""
    return math.ceil(n / chunk)

