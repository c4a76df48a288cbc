"""Greedy coordinate gradient over discrete tokens (Zou et al. 2023, as used by MMA-Diffusion, Yang et al., CVPR 2024).

Plain functions: a vocabulary constraint (banned sub-words), the top-k token proposals from the gradient of the loss
with respect to each position's one-hot vector, candidate sampling, and the text filter that keeps only candidates
whose decoded text (i) re-tokenizes to the same ids and (ii) contains no banned word.

One GCG step, for the adversarial ids x_{1:n} and loss L:
    G = ∇_{e_{x_i}} L  ∈ R^{n×|V|}  (gradient w.r.t. the one-hot rows; = ∇_{E_i} L · Wᵀ for the embedding matrix W)
    X_i = top-k(−G_i) over allowed tokens, for every position i
    B candidates: candidate b changes position i_b = ⌊b·n/B⌋ to a token drawn uniformly from X_{i_b}
    x ← the candidate of least loss (evaluated exactly, without gradients)
"""

from __future__ import annotations

import torch


def banned_tokens(tokenizer, ids: torch.Tensor, banned_words: list[str], min_piece: int = 2) -> torch.Tensor:
    """Bool [len(ids)]: which of ``ids`` MMA's rule removes — tokens containing a banned word, and tokens of at
    least ``min_piece`` characters that are a piece of one (banning "naked" also bans "na", "ak", "ke")."""
    words = [w.strip().lower() for w in banned_words if w.strip()]
    texts = [tokenizer.decode([int(i)]).strip().lower() for i in ids]
    return torch.tensor([any(w in t for w in words) or (len(t) >= min_piece and any(t in w for w in words))
                         for t in texts], dtype=torch.bool)


def allowed_mask(tokenizer, vocab: torch.Tensor, banned_words: list[str]) -> torch.Tensor:
    """Bool [|V|]: the ids of ``vocab`` (e.g. ``parts.vocabulary``) that the banned words leave."""
    mask = torch.zeros(len(tokenizer), dtype=torch.bool)
    mask[vocab[~banned_tokens(tokenizer, vocab, banned_words)]] = True
    return mask


def top_k_proposals(grad: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    """[n, k] token ids with the most negative one-hot gradient at each position, among allowed tokens."""
    scores = (-grad.float()).masked_fill(~allowed.to(grad.device), float("-inf"))
    return scores.topk(min(k, int(allowed.sum())), dim=1).indices


def sample_candidates(current: torch.Tensor, proposals: torch.Tensor, batch: int, gen: torch.Generator
                      ) -> torch.Tensor:
    """[batch, n]: copies of ``current`` [n], candidate b with position ⌊b·n/batch⌋ set to a random proposal."""
    n, k = proposals.shape
    pos = (torch.arange(batch) * n) // batch
    pick = torch.randint(k, (batch,), generator=gen)
    cands = current.unsqueeze(0).repeat(batch, 1)
    cands[torch.arange(batch), pos] = proposals.cpu()[pos, pick]
    return cands


def decode(tokenizer, ids: torch.Tensor) -> str:
    return tokenizer.decode(ids.tolist(), skip_special_tokens=True).strip()


def contains_banned(text: str, banned_words: list[str]) -> bool:
    low = text.lower()
    return any(w.strip().lower() in low for w in banned_words if w.strip())


def text_filter(tokenizer, cands: torch.Tensor, banned_words: list[str]) -> torch.Tensor:
    """Bool [B]: candidates whose decoded text re-tokenizes to the same ids and names no banned word."""
    keep = torch.zeros(len(cands), dtype=torch.bool)
    for b, ids in enumerate(cands):
        text = decode(tokenizer, ids)
        if contains_banned(text, banned_words):
            continue
        again = tokenizer(text, add_special_tokens=False).input_ids
        keep[b] = again == ids.tolist()
    return keep
