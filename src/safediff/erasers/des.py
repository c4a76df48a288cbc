"""DES: text-encoder embedding sanitisation (NeurIPS 2025; reference code amoeba04/des, ``train_des.py``).

The text encoder E_θ alone is fine-tuned so that prompts of the concept land in a safe region of its output space
while safe prompts keep their embeddings; the UNet is untouched, so the defence costs nothing at inference and the
edited encoder plugs into any model that shares it. The paper's text was not available here: the update below is
the reference code's, in its symbols (every embedding flattened to one vector of L·D values, cos the cosine
similarity, E_o the encoder before training):

    d̂       = E_o(c) / ‖E_o(c)‖                             the concept direction (c: the concept's keywords)
    T(u)    = E_o(s*(u)) − σ d̂,  s*(u) = argmin_{s∈S} cos(E_o(u), E_o(s))   (the *least* similar safe embedding)
    L_safe  = [1 − cos(E_θ(s), E_o(s))] + [1 − cos(E_θ(s) + σ d̂, E_o(s))]  ("ConceptAug")
    L_unsafe= [1 − cos(E_θ(u), T(u))] + [1 − cos(E_θ(c), E_o(∅))]
    L       = λ L_safe + (1 − λ) L_unsafe                                  (AdamW, pairs (u, s) in batches)

u ranges over the unsafe prompts U (each keyword in the concept's contexts, ``erasers.prompts.prompt_pairs``), s
over the safe prompts S (the same prompts with the guide instead of the keyword, and every preserved concept in its
contexts); the shorter list is repeated to the longer one's length as in the reference, and the pairs are shuffled
every epoch. The codebook the reference searches (FAISS) is E_o(S). Several concepts: each unsafe prompt uses its
own concept's direction and the concept→∅ term is averaged over the concepts.

Defaults are the reference's: λ = 0.5, lr 1e-5, 10 epochs, batch 128, every text-encoder parameter trained
(``module="text_encoder_all"``, embeddings included). σ: the reference's absolute 100 is tied to SD-1.x's CLIP-L
conditioning (77 tokens × 768, flattened norm ≈ 2.4e2, ≈ 28 per token); here σ is ``concept_scale`` times the mean
flattened norm of the safe embeddings (default 0.4, i.e. the reference's 100 on SD-1.x), so it means the same on
the sandbox's 128-d encoder; ``concept_scale_absolute=100`` gives the reference's absolute value. On SDXL the
embedding is the adapter's conditioning (both encoders' penultimate states concatenated) and both encoders train.
SD3 / FLUX are refused (``archs``): their sequence is mostly (SD3) or entirely (FLUX) T5's, so the idea carries over
only by fine-tuning T5-XXL, which is out of this method's budget. Zero inference overhead: the edit is
``text_encoder.*`` tensors; ``safediff.edits.export_text_encoders`` writes the
edited encoder(s) as transformers folders. Runs checkpoint to ``checkpoint`` and resume bit-identically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from safediff.concepts import Concept
from safediff.erasers.base import Eraser
from safediff.adapters.roles import check_group, in_group
from safediff.erasers.modules import group_parameters
from safediff.erasers.prompts import words_of
from safediff.erasers.training_prompts import prompt_pairs, retain_prompts
from safediff.erasers.training import Fit, loss_summary, shuffled
from safediff.options import option


def flat(embeds: torch.Tensor) -> torch.Tensor:
    """[B, L, D] -> [B, L·D] (float32)."""
    return embeds.float().flatten(1)


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of 1 − cos(a_i, b_i), rows flattened."""
    return (1 - F.cosine_similarity(flat(a), flat(b), dim=-1)).mean()


def farthest(queries: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the least cosine-similar codebook row for each query ([Q, N] -> [Q])."""
    sims = F.normalize(flat(queries), dim=-1) @ F.normalize(flat(codebook), dim=-1).T
    return sims.argmin(dim=1)


@dataclass
class DES(Eraser):
    name: ClassVar[str] = "des"
    paper: ClassVar[str] = ("DES: text-encoder embedding sanitisation, NeurIPS 2025 (reference code amoeba04/des; "
                            "implemented from the code, the paper's text was not available)")
    # the sandbox's text encoder is 4 layers of 128-d: 10 epochs of its ~900 pairs (batch 128) at lr 1e-4 are
    # ~80 steps of text-encoder passes only, seconds on a CPU; to be re-tuned once the v2 sandbox model lands
    sandbox: ClassVar[dict[str, dict]] = {"benchmark": {"epochs": 10, "lr": 1e-4},
                                          "demo": {"epochs": 2, "lr": 1e-4},
                                          "smoke": {"epochs": 1, "lr": 1e-3, "batch": 8}}
    zero_strength: ClassVar[dict] = {"lr": 0.0}
    archs: ClassVar[tuple[str, ...]] = ("sd1", "sd2", "sdxl")
    archs_reason: ClassVar[str] = ("T5 carries the prompt's token sequence there (FLUX: all of it), so sanitising "
                                   "the embedding means fine-tuning T5-XXL (4.7 B parameters); use advunlearn (its "
                                   "CLIP encoders) or a denoiser eraser (uce, esd-x) on SD3/FLUX")

    module: str = option("text_encoder_all", help="trained parameters: text_encoder_all (reference), text_encoder")
    epochs: int = option(10, low=1, high=10_000, help="passes over the (unsafe, safe) pairs")
    batch: int = option(128, low=1, high=65_536, help="pairs per step")
    lr: float = option(1e-5, low=0.0, high=1.0, help="AdamW learning rate")
    weight_decay: float = option(0.01, low=0.0, high=1.0, help="AdamW weight decay (PyTorch's default, as the "
                                                                  "reference)")
    safe_weight: float = option(0.5, low=0.0, high=1.0, help="λ: weight of the safe terms, 1 − λ the unsafe ones")
    concept_scale: float = option(0.4, low=0.0, high=100.0, help="σ over the safe embeddings' mean flattened norm")
    concept_scale_absolute: float | None = option(None, low=0.0, help="σ itself (reference: 100 on SD-1.x)")
    seed: int = 0
    checkpoint: str | None = option(None, hyperparameter=False)
    checkpoint_every: int = option(50, low=1, hyperparameter=False)

    def __post_init__(self):
        super().__post_init__()
        check_group(self.module, "eraser des", trains="text")
        self.losses: list[float] = []

    def touches(self, name: str) -> bool:
        return in_group(self.module, name)

    def compute(self, model, concepts: list[Concept], preserve, guide, progress):
        run = DESRun(self, model, concepts, preserve, guide)
        params = group_parameters(model, self.module)
        frozen = {n: p.detach().clone() for n, p in params.items()}
        with Fit(self, model, params, {}, {"unsafe": run.unsafe, "safe": run.safe}, progress, frozen=frozen) as fit:
            state = fit.state
            fit.start(torch.optim.AdamW(list(params.values()), lr=self.lr, weight_decay=self.weight_decay))
            per_epoch = math.ceil(run.n_pairs / self.batch)
            fit.train(lambda it: run.step(it, per_epoch), self.epochs * per_epoch)
            new = fit.trained()
        self.losses, resumed_at = list(state.losses), fit.resumed_at
        info = {"module": self.module, "unsafe_prompts": len(run.unsafe), "safe_prompts": len(run.safe),
                "pairs": run.n_pairs, "steps": len(state.losses), "sigma": run.sigma,
                "examples": {"unsafe": run.unsafe[:6], "safe": run.safe[:6]}, "resumed_at_iteration": resumed_at,
                **loss_summary(state.losses)}
        return new, info


class DESRun:
    """One DES fit: the prompts, the frozen encoder's embeddings (codebook, targets, ∅) and the loss."""

    @torch.no_grad()
    def __init__(self, eraser: DES, model, concepts: list[Concept], preserve, guide):
        self.eraser, self.model = eraser, model
        adapter = model.adapter
        owner: list[int] = []
        self.unsafe, guided = [], []
        for k, concept in enumerate(concepts):
            pairs = prompt_pairs([concept], guide)
            self.unsafe += [p for p, _ in pairs]
            guided += [g for _, g in pairs]
            owner += [k] * len(pairs)
        self.safe = list(dict.fromkeys([*guided, *retain_prompts(concepts, preserve)]))
        self.concept_texts = [", ".join(w for w in words_of(c) if w.strip()) for c in concepts]
        codebook = self._encode(self.safe)
        self.safe_original = codebook
        norms = flat(codebook).norm(dim=-1)
        self.sigma = (float(eraser.concept_scale_absolute) if eraser.concept_scale_absolute is not None
                      else float(eraser.concept_scale * norms.mean()))
        directions = F.normalize(flat(self._encode(self.concept_texts)), dim=-1)  # [K, L·D]
        unsafe_original = self._encode(self.unsafe)
        targets = flat(codebook)[farthest(unsafe_original, codebook)] - self.sigma * directions[owner]
        self.unsafe_targets = targets
        self.unsafe_direction = directions[owner]
        self.uncond = flat(adapter.encode([""]).embeds)
        self.n_pairs = max(len(self.unsafe), len(self.safe))

    def _encode(self, prompts: list[str], batch: int = 256) -> torch.Tensor:
        enc = self.model.adapter.encode
        return torch.cat([enc(prompts[i:i + batch]).embeds for i in range(0, len(prompts), batch)])

    def pair_indices(self, iteration: int, per_epoch: int) -> list[int]:
        """Indices into the pair list for one step (each epoch a fresh order, ``training.shuffled``)."""
        epoch, start = divmod(iteration, per_epoch)
        order = shuffled(self.eraser.seed, epoch, self.n_pairs)
        return order[start * self.eraser.batch:(start + 1) * self.eraser.batch].tolist()

    def step(self, iteration: int, per_epoch: int) -> tuple[torch.Tensor, dict]:
        e = self.eraser
        idx = self.pair_indices(iteration, per_epoch)
        u = [i % len(self.unsafe) for i in idx]
        s = [i % len(self.safe) for i in idx]
        enc = self.model.adapter.encode
        current_safe = enc([self.safe[i] for i in s]).embeds
        current_unsafe = enc([self.unsafe[i] for i in u]).embeds
        current_concepts = enc(self.concept_texts).embeds
        original_safe = self.safe_original[s]
        direction = self.unsafe_direction[u]
        safe = cosine_distance(current_safe, original_safe) + \
            (1 - F.cosine_similarity(flat(current_safe) + self.sigma * direction, flat(original_safe))).mean()
        unsafe = cosine_distance(current_unsafe, self.unsafe_targets[u]) + \
            cosine_distance(current_concepts, self.uncond.expand(len(current_concepts), -1))
        loss = e.safe_weight * safe + (1 - e.safe_weight) * unsafe
        return loss, {"safe": f"{float(safe.detach()):.4g}", "unsafe": f"{float(unsafe.detach()):.4g}"}
