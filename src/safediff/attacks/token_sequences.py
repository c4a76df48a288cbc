"""Token-id sequences as text-encoder inputs: ``[BOS] x_1..x_K [EOS] pad...`` for every encoder of a model.

Searches over token ids (Ring-A-Bell's genomes, MMA's GCG) encode whole populations in batched forward passes
through ``adapter.encode_token_embeddings``; slots can carry soft rows (one-hot @ W, for token gradients) instead
of looked-up embeddings.

Two vocabularies (SD3: CLIP + T5; FLUX: CLIP + T5). The searched ids belong to the vocabulary of the adapter's
``search_segment`` (T5 on SD3/FLUX, CLIP on SD 1.x/2.x and SDXL, whose two CLIPs share one): the encoders of that
segment read them directly (soft rows included); every other encoder reads the *decoded text* of the ids, tokenized
its own way, exactly as it would read the prompt once typed. Gradients reach the searched tokens through the
search encoders only. A sequence without a BOS token (T5) is ``x_1..x_K </s> pad...``.
"""

from __future__ import annotations

import math

import torch

from safediff.adapters import Conditioning
from safediff.attacks.gcg import decode
from safediff.errors import SafediffError


def search_tokenizer(adapter):
    """The tokenizer whose ids a token search holds."""
    return adapter.tokenizers[adapter.search_segment.encoders[0]]


def padded_ids(adapter, k: int, tokens: torch.Tensor) -> torch.Tensor:
    """[P, K] ids of tokenizer k -> [P, window(k)]: its BOS (if any), the K tokens, EOS, then its pad."""
    tok, length, bos = adapter.tokenizers[k], adapter.window(k), adapter.bos_offset(k)
    p, n = tokens.shape
    if n + bos + 1 > length:
        raise SafediffError(f"{n} tokens do not fit the text encoder's {length}-token window")
    ids = torch.full((p, length), tok.pad_token_id, dtype=torch.long)
    if bos:
        ids[:, 0] = tok.bos_token_id
    ids[:, bos:bos + n] = tokens
    ids[:, bos + n] = tok.eos_token_id
    return ids


def sequence_ids(adapter, tokens: torch.Tensor) -> list[torch.Tensor]:
    """[P, K] searched ids -> per tokenizer [P, window]: the ids themselves for the search encoders, the decoded
    text's own tokenization for the others."""
    search = adapter.search_segment.encoders
    texts = None
    out = []
    for k in range(len(adapter.tokenizers)):
        if k in search:
            out.append(padded_ids(adapter, k, tokens))
        else:
            if texts is None:
                texts = [decode(search_tokenizer(adapter), row) for row in tokens]
            out.append(adapter.tokenize(texts, k))
    return out


def encode_tokens(adapter, tokens: torch.Tensor, soft: torch.Tensor | None = None) -> Conditioning:
    """Conditioning of the sequences ``tokens`` [P, K]; with ``soft`` [P, K, |V|] the K slots' embeddings in the
    search encoders are ``soft @ W`` (differentiable) instead of rows of W."""
    ids = sequence_ids(adapter, tokens)
    search = adapter.search_segment.encoders
    embeds = []
    for k in range(len(adapter.text_encoders)):
        table = adapter.token_embedding(k).weight
        e = table[ids[k].to(table.device)]
        if soft is not None and k in search:
            bos, n = adapter.bos_offset(k), tokens.shape[1]
            e = torch.cat([e[:, :bos], soft.to(table.dtype) @ table, e[:, bos + n:]], dim=1)
        embeds.append(e)
    return adapter.encode_token_embeddings(ids, embeds)


def encode_in_chunks(adapter, tokens: torch.Tensor, chunk: int) -> Conditioning:
    """``encode_tokens`` over ``tokens`` [P, K] in forward passes of at most ``chunk`` sequences."""
    return Conditioning.cat([encode_tokens(adapter, tokens[i:i + chunk]) for i in range(0, len(tokens), chunk)])


def chunks(n: int, chunk: int) -> int:
    """Forward passes needed to encode n sequences in chunks."""
    return math.ceil(n / chunk)
