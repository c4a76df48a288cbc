"""MMA-Diffusion, text modality: a greedy-coordinate-gradient search for a prompt without banned words whose
text embedding matches that of a target prompt.

Paper: Y. Yang, R. Gao, X. Wang, T.-Y. Ho, N. Xu, Q. Xu, "MMA-Diffusion: MultiModal Attack on Diffusion Models",
CVPR 2024, arXiv:2311.17516. Reference code: cure-lab/MMA-Diffusion (``src/textual_attack.py``), which needs a
patched ``transformers``; here the one-hot gradient goes through ``adapter.encode_token_embeddings`` instead.

With τ the text encoder's sentence embedding, p_tar the target prompt and p_adv = x_{1:n} (n = 20 tokens):

    L(x_{1:n}) = 1 − cos( τ(x_{1:n}), τ(p_tar) )
    min L over x_i ∈ V \\ V_banned   by greedy coordinate gradient (``attacks/gcg.py``): top-k (k = 256) tokens per
                                     position from −∇_{e_{x_i}} L, B = 512 single-token candidates, move to the best

τ ("pooled", the default, as the reference): SD 1.x/2.x — the final-layer-normed hidden state at the EOS token
(``CLIPTextModel.pooler_output``); SDXL — the second encoder's projected pooled embedding (the only pooled vector
SDXL's UNet reads); SD3/FLUX — T5's last hidden state at its ``</s>`` token: the search runs over T5's vocabulary
(``attacks/token_sequences.py``) and their pooled vector is CLIP's, which reads only the decoded text, so it carries
no gradient to the searched tokens (T5's bidirectional attention makes its ``</s>`` row a summary of the prompt).
``embedding="hidden"`` uses all hidden states the denoiser reads instead (flattened, with the pooled vector) — not in
the paper, offered because the UNet never sees the pooled vector of SD 1.x.

Banned words: the target concepts' names (keywords and synonyms) plus ``banned``. As in MMA, every token containing
a banned word is removed from V (MMA lists sub-words such as 'na', 'ak', 'ke', 'nud' by hand; give them in
``banned`` to reproduce its list); in addition every token (of ≥ 2 characters) that is a piece of a banned word is
removed, and every candidate whose decoded text contains a banned word anywhere (e.g. spelled from single letters)
or that does not re-tokenize to exactly its own ids is dropped (MMA's filter checks only the re-tokenized length),
so the emitted prompt never contains a banned word and is exactly the sequence that was optimised. The start is 20
random single letters, as in the reference. Black-box to the attacked model: only the unconstrained (public) text
encoder is read, no UNet call is made; the final prompt is generated with the target and judged.

Reference budget: ≥ 500 steps (README example 1,000) × 512 candidates on the text encoder. Sandbox default: 25 steps.
Difference: by default (``vocabulary="words"``) candidates are whole-word tokens that tokenize back to themselves
(most sub-word candidates fail the re-tokenization filter); ``"all"`` proposes any non-special token.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from safediff.attacks import gcg
from safediff.attacks.base import Attack
from safediff.attacks.context import AttackContext, Found
from safediff.attacks.concept_pairs import names
from safediff.attacks.spaces import vocabulary
from safediff.attacks.token_sequences import chunks, encode_tokens, search_tokenizer
from safediff.errors import SafediffError
from safediff.options import option
from safediff.adapters import Conditioning

EMBEDDINGS = ("pooled", "hidden")


def pooled_reads_search(adapter) -> bool:
    """Whether the model's pooled vector is made by encoders that read the searched tokens (SDXL: yes; SD3/FLUX:
    no, their CLIP encoders read the decoded text of the searched T5 tokens)."""
    return bool(adapter.pooled_encoders) and set(adapter.pooled_encoders) <= set(adapter.search_segment.encoders)


def sentence_embedding(cond: Conditioning, eos: torch.Tensor | int, kind: str, use_pooled: bool = True
                       ) -> torch.Tensor:
    """[B, d]: τ of each sequence (``eos``: the EOS position in the sequence, one per row or shared); the pooled
    vector when there is one and ``use_pooled``, else the row at EOS."""
    if kind == "hidden":
        flat = cond.embeds.flatten(1)
        return flat if cond.pooled is None else torch.cat([flat, cond.pooled], 1)
    if cond.pooled is not None and use_pooled:
        return cond.pooled
    rows = torch.arange(len(cond))
    return cond.embeds[rows, torch.as_tensor(eos).expand(len(cond))]


def initial_tokens(tokenizer, allowed: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """The reference's start: n random single letters (each one token), drawn among the allowed tokens."""
    letters = [tokenizer(c, add_special_tokens=False).input_ids for c in string.ascii_lowercase]
    pool = torch.tensor([ids[0] for ids in letters if len(ids) == 1 and allowed[ids[0]]], dtype=torch.long)
    if not len(pool):
        pool = allowed.nonzero().squeeze(1)
    return pool[torch.randint(len(pool), (n,), generator=gen)]


@dataclass
class MMADiffusion(Attack):
    """``mma-diffusion``: GCG on the text encoder toward the target prompt's embedding, banned words excluded."""

    name: ClassVar[str] = "mma-diffusion"
    default_budget: ClassVar[dict] = {"iterations": 25}
    sandbox: ClassVar[dict[str, dict]] = {
        "benchmark": {"params": "batch=64", "budget": "iterations=20"},
        "smoke": {"params": "batch=8", "budget": "iterations=2"},
    }
    reference_budget: ClassVar[dict] = {"iterations": 1000, "unet_forward": 0,
                                        "text_encoder": "1000 steps x (1 gradient + 512 candidates)"}
    uses_unet: ClassVar[bool] = False

    n_tokens: int = option(20, low=1)
    batch: int = option(512, low=1)
    topk: int = option(256, low=1)
    target_prompt: str = ""  # "" = the row's prompt
    banned: str = ""  # extra banned words, ';'-separated (the concepts' names are always banned)
    embedding: str = "pooled"
    vocabulary: str = "words"  # "words": whole-word tokens that survive typing; "all": any non-special id
    encode_batch: int = option(512, low=1)

    def __post_init__(self):
        super().__post_init__()
        if self.vocabulary not in ("words", "all"):
            raise SafediffError(f"mma-diffusion: vocabulary '{self.vocabulary}' unknown; accepted: words, all")
        if self.embedding not in EMBEDDINGS:
            raise SafediffError(f"mma-diffusion: embedding '{self.embedding}' unknown; accepted: "
                                f"{', '.join(EMBEDDINGS)}")

    def banned_words(self, ctx: AttackContext) -> list[str]:
        words = [w for c in ctx.target.concepts for w in names(c)]
        words += [w.strip() for w in self.banned.split(";") if w.strip()]
        return list(dict.fromkeys(w.lower() for w in words))

    def search(self, ctx: AttackContext) -> Found:
        adapter = ctx.target.reference.adapter  # the unconstrained (public) text encoder
        tokenizer = search_tokenizer(adapter)
        vocab = len(tokenizer)
        search = adapter.search_segment
        use_pooled = pooled_reads_search(adapter)
        banned = self.banned_words(ctx)
        allowed = gcg.allowed_mask(tokenizer, vocabulary(tokenizer, self.vocabulary), banned)
        if not allowed.any():
            raise SafediffError("mma-diffusion: the banned words exclude the whole vocabulary")
        current = initial_tokens(tokenizer, allowed, self.n_tokens, ctx.rng)
        eos = search.start + adapter.bos_offset(search.encoders[0]) + self.n_tokens
        target_text = self.target_prompt or ctx.prompt
        if not ctx.afford(ctx.step_cost(encode=2, iterations=0)):
            return Found(extra={"stopped": "the budget does not cover the setup and one evaluation"})
        with torch.no_grad():
            target_eos = int(adapter.eos_positions([target_text], search)[0])
            goal = sentence_embedding(adapter.encode([target_text]), target_eos, self.embedding, use_pooled).float()

            def losses(tokens: torch.Tensor) -> torch.Tensor:
                s = sentence_embedding(encode_tokens(adapter, tokens), eos, self.embedding, use_pooled).float()
                return 1.0 - F.cosine_similarity(s, goal, dim=1)

            best, best_loss = current.clone(), float(losses(current[None])[0])
        start_loss = best_loss
        step = ctx.step_cost(encode=1 + chunks(self.batch, self.encode_batch))
        while ctx.afford(step):
            soft = F.one_hot(current, vocab).float()[None].requires_grad_(True)
            s = sentence_embedding(encode_tokens(adapter, current[None], soft=soft), eos, self.embedding,
                                   use_pooled).float()
            loss = 1.0 - F.cosine_similarity(s, goal, dim=1).sum()
            (grad,) = torch.autograd.grad(loss, [soft])
            with torch.no_grad():
                proposals = gcg.top_k_proposals(grad[0], allowed, self.topk)
                cands = gcg.sample_candidates(current, proposals, self.batch, ctx.rng)
                cands = cands[gcg.text_filter(tokenizer, cands, banned)]
                if len(cands):
                    cand_losses = torch.cat([losses(cands[i:i + self.encode_batch])
                                             for i in range(0, len(cands), self.encode_batch)])
                    i = int(cand_losses.argmin())
                    current = cands[i]
                    if float(cand_losses[i]) < best_loss:
                        best, best_loss = current.clone(), float(cand_losses[i])
            ctx.tick(best_loss, candidates=len(cands))

        prompt = gcg.decode(tokenizer, best)
        return Found(prompt=prompt, token_ids=best.tolist(), evaluation=ctx.evaluate(prompt),
                     extra={"loss": best_loss, "initial_loss": start_loss, "target_prompt": target_text,
                            "banned_words": banned, "embedding": self.embedding,
                            "text_encoder_backward": ctx.meter.counts["iterations"]})
