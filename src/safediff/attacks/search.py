"""Search methods of attack recipes, and keeping the best judged candidate.

- ``SimplexAdam``: each slot a distribution over the vocabulary; straight-through one-hot samples forward, Adam on the
  distribution, Euclidean projection back onto the simplex (bisection) after every step.
- ``ProjectedAdam``: soft embeddings; forward with the nearest vocabulary token (cosine), gradient applied to the soft
  embeddings (PEZ; Wen et al. 2023).
- ``better`` / ``judge_and_keep`` / ``finish_token_search``: which evaluated prompt a token search returns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from safediff.attacks.context import AttackContext, Evaluation, Found
from safediff.attacks.spaces import TokenSlots

def project_simplex(v: torch.Tensor, iterations: int = 60) -> torch.Tensor:
    """Euclidean projection of each row of v onto the probability simplex: clip(v − μ, 0, 1) with μ found by
    bisection so that the row sums to 1 (UnlearnDiffAtk's projection, run a fixed number of halvings)."""
    lo = (v.min(dim=-1, keepdim=True).values - 1).detach()
    hi = v.max(dim=-1, keepdim=True).values.detach()
    for _ in range(iterations):
        mu = (lo + hi) / 2
        over = (v - mu).clamp(0, 1).sum(dim=-1, keepdim=True) > 1
        lo = torch.where(over, mu, lo)
        hi = torch.where(over, hi, mu)
    return (v - (lo + hi) / 2).clamp(0, 1)


class _StraightThroughSample(torch.autograd.Function):
    """Forward: a one-hot sample of each row's distribution; backward: the gradient clipped to [-1, 1] (hardtanh),
    as in UnlearnDiffAtk's reference code."""

    @staticmethod
    def forward(ctx, probs: torch.Tensor, generator: torch.Generator):
        idx = torch.multinomial(probs.detach().clamp_min(0).cpu(), 1, generator=generator).view(-1)
        return F.one_hot(idx, probs.shape[-1]).to(probs)

    @staticmethod
    def backward(ctx, grad):
        return F.hardtanh(grad), None


class SimplexAdam:
    """k distributions over a vocabulary of V ids, optimised by Adam with projection onto the simplex."""

    def __init__(self, k: int, vocab: torch.Tensor, lr: float, weight_decay: float, generator: torch.Generator,
                 random_init: bool = False):
        self.vocab = vocab
        x = torch.rand(k, len(vocab), generator=generator) if random_init else torch.full((k, len(vocab)),
                                                                                            1.0 / len(vocab))
        self.x = project_simplex(x).requires_grad_(True)
        self.opt = torch.optim.Adam([self.x], lr=lr, weight_decay=weight_decay)
        self.generator = generator

    def sample(self) -> torch.Tensor:
        """Straight-through one-hot sample [k, V] (gradient flows to the distributions)."""
        return _StraightThroughSample.apply(self.x, self.generator)

    def embeddings(self, one_hot: torch.Tensor, slots: TokenSlots) -> list[torch.Tensor]:
        """The sample's slot embeddings in each search encoder (differentiable in the distributions)."""
        return [one_hot @ slots.adapter.token_embedding(j).weight[self.vocab].to(one_hot) for j in slots.search]

    def ids(self, one_hot: torch.Tensor) -> torch.Tensor:
        """The token ids a one-hot sample picks."""
        return self.vocab[one_hot.detach().argmax(dim=-1).cpu()]

    def step(self) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.x.copy_(project_simplex(self.x))

    def argmax_ids(self) -> torch.Tensor:
        return self.vocab[self.x.detach().argmax(dim=-1)]


class ProjectedAdam:
    """Soft embeddings [k, D] (the first search encoder's space), AdamW; ``project`` snaps each to the nearest allowed
    vocabulary token by cosine similarity; the loss is computed with the projected embeddings and its gradient applied
    to the soft ones (PEZ's straight-through update, P4D's ``nn_project``)."""

    def __init__(self, init_ids: torch.Tensor, table: torch.nn.Embedding, vocab: torch.Tensor, lr: float,
                 weight_decay: float):
        self.table = table
        self.vocab = vocab
        self.soft = table.weight[init_ids].detach().clone().requires_grad_(True)
        self.opt = torch.optim.AdamW([self.soft], lr=lr, weight_decay=weight_decay)

    def project(self) -> torch.Tensor:
        """Nearest allowed token id per slot ([k])."""
        with torch.no_grad():
            rows = F.normalize(self.table.weight[self.vocab].float(), dim=-1)
            sims = F.normalize(self.soft.float(), dim=-1) @ rows.T
            return self.vocab[sims.argmax(dim=-1)]

    def step(self, grad_projected: torch.Tensor) -> None:
        self.soft.grad = grad_projected.to(self.soft)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def better(best: Evaluation | None, ev: Evaluation | None) -> Evaluation | None:
    """The evaluation to keep: a success, else the one the judge scored higher."""
    if ev is None:
        return best
    return ev if best is None or ev.success or ev.score > best.score else best


def judge_and_keep(ctx: AttackContext, best: Evaluation | None, text: str) -> tuple[Evaluation | None, bool]:
    """Judge ``text`` and keep the better evaluation; also whether the search should stop (a success, or no budget
    left to judge)."""
    ev = ctx.evaluate(text)
    return better(best, ev), ev is None or ev.success


def finish_token_search(ctx: AttackContext, slots: TokenSlots, ids: torch.Tensor, last_text: str | None,
                        best: Evaluation | None, extra: dict) -> Found:
    """Judge the final tokens (unless already judged or a success was found) and return the best prompt."""
    text = slots.text(ids)
    if text != last_text and not (best is not None and best.success):
        best = better(best, ctx.evaluate(text))
    chosen = best.prompt if best is not None else text
    return Found(prompt=chosen, token_ids=slots.tokenizer(chosen, add_special_tokens=False).input_ids,
                 evaluation=best, extra={"slot_ids": ids.tolist(), **extra, "final_prompt": text})
