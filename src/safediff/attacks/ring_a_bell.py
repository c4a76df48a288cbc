"""Ring-A-Bell: model-agnostic red-teaming by concept extraction and a genetic prompt search.

Paper: Y.-L. Tsai, C.-Y. Hsu, C. Xie, C.-H. Lin, J.-Y. Chen, B. Li, P.-Y. Chen, C.-M. Yu, C.-Y. Huang, "Ring-A-Bell!
How Reliable are Concept Removal Methods for Diffusion Models?", ICLR 2024, arXiv:2310.10012. Reference code:
chiayi-hsu/Ring-A-Bell (``Get_Concept_Vector.ipynb``, ``InversePrompt.ipynb``).

With f the text encoder (the conditioning the UNet reads: all L×D hidden states; SDXL adds the pooled vector) and
N pairs of prompts with (P_i^c) and without (P_i) the concept:

    ĉ  = (1/N) Σ_i [ f(P_i^c) − f(P_i) ]                        (concept extraction)
    P̃* = argmin_{P̃ ∈ V^K} ‖ f(P̃) − (f(P) + η ĉ) ‖²₂            (prompt discovery, squared L2 over all of f)

The argmin is a genetic search (``attacks/genetic.py``) over K token ids of the search vocabulary (CLIP's; T5's on
SD3/FLUX, whose CLIP encoders read the decoded text: ``attacks/token_sequences.py``): population 200, truncation
selection of the best half, single-point crossover (rate 0.5), one-token mutation (rate 0.25), K = 16, η = 3 (the
notebook's nudity setting; the shipped violence files use η ≈ 5 with K = 38/77). The whole population is encoded in
batched text-encoder calls. The search is black-box with respect to the attacked model: it reads only the
*unconstrained* text encoder (the target's reference model; the public encoder in the paper) and makes **no UNet
call**; the final prompt (the decoded "token soup") is the only thing generated with the target and judged.

Reference budget: 3,000 generations × ~200 encodings (all on the text encoder). The sandbox default stops after
80 generations (about a minute per prompt on the sandbox, 1 CPU thread). Difference from the reference: by default
(``vocabulary="words"``) genes are whole-word tokens whose decoded text tokenizes back to the same id, while the
notebook draws any non-special id (``"all"``). The attack's output is text, and a sequence of arbitrary sub-word ids
usually re-tokenizes to other ids once decoded, so the prompt that is judged would not be the one that was
optimised; with whole words it is (``fitness_text`` in the result is the loss of the decoded prompt as actually
encoded, ``fitness`` that of the searched ids).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from safediff.attacks import genetic
from safediff.attacks.base import Attack
from safediff.attacks.context import AttackContext, Found
from safediff.attacks.concept_pairs import concept_pairs
from safediff.attacks.gcg import decode
from safediff.attacks.objectives import embedding_distance
from safediff.attacks.spaces import vocabulary
from safediff.attacks.token_sequences import chunks, encode_in_chunks, search_tokenizer
from safediff.errors import SafediffError
from safediff.options import option
from safediff.adapters import Conditioning


def concept_vector(adapter, pairs: list[tuple[str, str]], chunk: int) -> Conditioning:
    """ĉ = mean_i f(P_i^c) − f(P_i), as conditioning-shaped tensors [1, L, D] (+ [1, P])."""
    with_c = Conditioning.cat([adapter.encode([a for a, _ in pairs[i:i + chunk]]) for i in range(0, len(pairs), chunk)])
    without = Conditioning.cat([adapter.encode([b for _, b in pairs[i:i + chunk]]) for i in range(0, len(pairs),
                                                                                                 chunk)])
    pooled = None if with_c.pooled is None else (with_c.pooled - without.pooled).mean(0, keepdim=True)
    return Conditioning((with_c.embeds - without.embeds).mean(0, keepdim=True), pooled)


@dataclass
class RingABell(Attack):
    """``ring-a-bell``: genetic search for a token prompt whose encoding is f(P) + η ĉ (text encoder only)."""

    name: ClassVar[str] = "ring-a-bell"
    default_budget: ClassVar[dict] = {"iterations": 80}
    sandbox: ClassVar[dict[str, dict]] = {
        "benchmark": {"params": "population=50", "budget": "iterations=40"},
        "demo": {"budget": "iterations=20"},
        "smoke": {"budget": "iterations=2"},
    }
    reference_budget: ClassVar[dict] = {"iterations": 3000, "unet_forward": 0,
                                        "text_encoder": "3000 generations x ~200 sequences"}
    uses_unet: ClassVar[bool] = False

    eta: float = 3.0
    length: int = option(16, low=1)
    population: int = option(200, low=2)
    generations: int = option(3000, low=1)
    mutation_rate: float = option(0.25, low=0.0, high=1.0)
    crossover_rate: float = option(0.5, low=0.0, high=1.0)
    pairs: str = ""  # CSV of (with, without) prompts; "" = the concept's built-in pairs
    encode_batch: int = option(256, low=1)
    vocabulary: str = "words"  # "words": whole-word tokens that survive typing; "all": any non-special id

    def __post_init__(self):
        super().__post_init__()
        if self.vocabulary not in ("words", "all"):
            raise SafediffError(f"ring-a-bell: vocabulary '{self.vocabulary}' unknown; accepted: words, all")

    @torch.no_grad()
    def search(self, ctx: AttackContext) -> Found:
        adapter = ctx.target.reference.adapter  # the unconstrained (public) text encoder
        pairs = concept_pairs(ctx.target.concepts, self.pairs or None)
        setup = ctx.step_cost(encode=2 * chunks(len(pairs), self.encode_batch) + 1, iterations=0)
        if not ctx.afford(setup):
            return Found(extra={"stopped": "the budget does not cover the concept vector and one evaluation"})
        c = concept_vector(adapter, pairs, self.encode_batch)
        base = adapter.encode([ctx.prompt])
        target = Conditioning(base.embeds + self.eta * c.embeds,
                              None if base.pooled is None else base.pooled + self.eta * c.pooled)

        tokenizer = search_tokenizer(adapter)
        allowed = vocabulary(tokenizer, self.vocabulary)
        state = genetic.start(allowed, self.population, self.length, ctx.rng)

        def fitness(population: torch.Tensor) -> torch.Tensor:
            return embedding_distance(encode_in_chunks(adapter, population, self.encode_batch), target)

        while state.generation < self.generations:
            # one more encoding is kept for re-encoding the final text (``fitness_text``)
            if not ctx.afford(ctx.step_cost(encode=chunks(len(state.population), self.encode_batch) + 1)):
                break
            genetic.step(state, fitness, population=self.population, mutation_rate=self.mutation_rate,
                         crossover_rate=self.crossover_rate, allowed=allowed, gen=ctx.rng)
            ctx.tick(state.best_loss, population=len(state.population))
        if state.generation == 0:
            return Found(extra={"stopped": "the budget does not cover one generation and one evaluation"})

        prompt = decode(tokenizer, state.best)
        fitness_text = float(embedding_distance(adapter.encode([prompt]), target)[0])
        return Found(prompt=prompt, token_ids=state.best.tolist(), evaluation=ctx.evaluate(prompt),
                     extra={"fitness": state.best_loss, "fitness_text": fitness_text,
                            "fitness_unmodified_prompt": float(embedding_distance(base, target)[0]),
                            "generations": state.generation, "concept_pairs": len(pairs)})
