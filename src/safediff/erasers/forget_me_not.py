"""Forget-Me-Not (Zhang, Wang, Xu, Wang, Shi, "Forget-Me-Not: Learning to Forget in Text-to-Image Diffusion Models",
arXiv 2303.17591, 2023; reference code SHI-Labs/Forget-Me-Not, ``src/train_attn.py``).

Attention re-steering: the model is fine-tuned so that its cross-attention no longer attends to the concept's tokens.
For images x_0 of the concept with prompts p naming it, x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε (t ~ U{0..T−1}), and A^l the
cross-attention probabilities of layer l (softmax over the text positions, every head and query position) under p:

    L = ‖ (A^l[b, h, q, k])_{l, b, h, q, k ∈ K_b} ‖_2        (the Frobenius norm of all of them together)

(the paper: minimise the L2 norm of the attention maps of the concept's tokens; the reference: the norm of every
layer's masked attention probabilities concatenated, the same quantity; nothing else enters the loss).

K_b: the positions of the concept's tokens in prompt b (every occurrence of the keyword's tokens) and, with
``use_pooler`` (the reference config's default), the prompt's first end-of-text token. AdamW (lr 2e-6, weight
decay 0.01), gradients clipped to norm 1, batch 1, 35 steps, every UNet weight (``parameters="unet"``, the reference
config's ``only_optimize_ca: false``) or the cross-attention only (``"cross-attn"``: every ``attn2`` parameter).

Choices and deviations:
- The paper's optional textual-inversion warm-up (``use_ti`` in the reference: learning new tokens for the concept
  from its images first, then re-steering attention away from them) is not run: the concept's own keyword tokens are
  the ones re-steered, as the reference with ``use_ti: false`` (its shipped ``configs/attn.yaml`` sets ``true``).
  Say so when comparing with the paper's numbers.
- Images: a folder of the concept's images (``images=``, the paper's setting, paired with the prompts in turn), or by
  default (data-free) the original model's own samples of the prompts (the model's default DDIM steps and guidance;
  the sampler's latents, not decoded and re-encoded). Prompts: the concept's contexts with the keyword (the reference
  uses "a photo of {}" / "a photo in the style of {}"; those are the generic templates here when a concept has none).
- ``use_pooler`` marks the first end-of-text token only; the reference marks every position holding the end-of-text
  id, which is the first one on its SD-2.x tokenizer but every padding position on SD-1.x tokenizers (they pad with
  it). Each sample's attention rows are matched with its own positions (the reference tiles them in head-major order,
  which differs only for batches above 1; its batch is 1).
- Attention probabilities are recorded by a processor that wraps diffusers' ``AttnProcessor`` on every ``attn2``
  for the duration of the fit (the model's processors are restored afterwards).

UNet models only (``archs``): the loss reads the attention maps of ``attn2``, where image queries attend over the
text-encoder tokens alone. SD3/FLUX have no such layer (joint attention over image and text tokens, whose text keys
are a block-by-block transformed text stream), so the method's quantity is not defined there; they are refused in
one line.

Several concepts at once: yes (the reference's ``multi_concept``): every concept's prompts and images in one pool.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

from safediff.adapters.roles import in_group
from safediff.erasers.base import Eraser
from safediff.erasers.modules import denoiser_group
from safediff.imagesets import latents_from
from safediff.erasers.prompts import GENERIC_TEMPLATES, WordFinder
from safediff.erasers.training import fit_denoiser, loss_summary
from safediff.concepts import fill_context
from safediff.errors import SafediffError
from safediff.options import option
from safediff.sampling import denoiser_output

logger = logging.getLogger("safediff")

PARAMETER_GROUPS = {"unet": "full", "cross-attn": "xattn"}  # option values -> ``adapters.roles`` groups


class RecordingProcessor:
    """diffusers' ``AttnProcessor`` whose attention probabilities are handed to ``sink`` as they are computed."""

    def __init__(self, sink):
        from diffusers.models.attention_processor import AttnProcessor

        self.inner, self.sink = AttnProcessor(), sink

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        scores = attn.get_attention_scores

        def recorded(query, key, mask=None):
            probs = scores(query, key, mask)
            self.sink(probs, attn.heads)
            return probs

        attn.get_attention_scores = recorded  # an instance attribute shadowing the method for this call only
        try:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        finally:
            del attn.get_attention_scores


@contextlib.contextmanager
def recorded_cross_attention(unet, sink):
    """Every ``attn2`` hands its attention probabilities [B·heads, Q, L] and head count to ``sink`` while active; the
    UNet's processors are restored on exit."""
    original = dict(unet.attn_processors)
    recording = RecordingProcessor(sink)
    unet.set_attn_processor({k: recording if k.endswith("attn2.processor") else v for k, v in original.items()})
    try:
        yield
    finally:
        unet.set_attn_processor(original)


def concept_positions(tokenizer, prompts: list[str], words: list[str], eos: torch.Tensor, max_length: int,
                      use_pooler: bool) -> torch.Tensor:
    """Bool [B, L]: prompt b's positions of ``words[b]``'s tokens (every occurrence) and, with ``use_pooler``, its first
    end-of-text token."""
    finder = WordFinder(tokenizer)
    mask = torch.zeros(len(prompts), max_length, dtype=torch.bool)
    for b, (prompt, word) in enumerate(zip(prompts, words)):
        enc = tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True)
        word_ids = finder.ids(word)
        starts = finder.occurrences(enc.input_ids, sum(enc.attention_mask), word_ids)
        if not starts:
            raise SafediffError(f"forget-me-not: {word!r} is not among the tokens of {prompt!r}")
        for s in starts:
            mask[b, s:s + len(word_ids)] = True
        if use_pooler:
            mask[b, int(eos[b])] = True
    return mask


def attention_norm(records: list[tuple[torch.Tensor, int]], mask: torch.Tensor) -> torch.Tensor:
    """‖A[b, h, q, k] for every recorded layer, k ∈ K_b‖_2: each layer's rows (b·heads + h) against sample b's
    positions."""
    total = 0.0
    for probs, heads in records:
        rows = mask.to(probs.device).repeat_interleave(heads, dim=0)  # [B·heads, L]
        total = total + (probs.pow(2) * rows[:, None, :]).sum()
    return torch.sqrt(total)


@dataclass
class ForgetMeNot(Eraser):
    """Forget-Me-Not attention re-steering (see the module docstring)."""

    name: ClassVar[str] = "forget-me-not"
    archs: ClassVar[tuple[str, ...]] = ("sd1", "sd2", "sdxl")
    archs_reason: ClassVar[str] = ("its loss is the UNet cross-attention (attn2) maps of the concept's tokens; "
                                   "SD3/FLUX have joint attention instead; use concept-ablation or esd-x there")
    paper: ClassVar[str] = ("Zhang et al., Forget-Me-Not: Learning to Forget in Text-to-Image Diffusion Models, "
                            "arXiv 2303.17591, 2023")
    # benchmark: 100 steps of batch 2 (~0.2 s each on the 4.3M-parameter sandbox UNet at 16x16 latents on one CPU
    # core, measured on its architecture with random weights) after sampling 32 images at 10 DDIM steps (the step
    # count of ESD's benchmark x_t draws; ~2 s): well under a CPU-minute; lr 1e-4 because 35 steps at 2e-6 leave the
    # sandbox model as it was
    sandbox: ClassVar[dict[str, dict]] = {
        "benchmark": {"iterations": 100, "lr": 1e-4, "batch": 2, "n_images": 32, "image_steps": 10},
        "demo": {"iterations": 40, "lr": 1e-4, "batch": 2, "n_images": 16},
        "smoke": {"iterations": 2, "lr": 1e-3, "batch": 1, "n_images": 2}}
    zero_strength: ClassVar[dict] = {"lr": 0.0}

    parameters: str = option("unet", help="'unet' (every weight, the reference config) or 'cross-attn' (attn2)")
    use_pooler: bool = option(True, help="also re-steer the first end-of-text token (reference config: true)")
    iterations: int = option(35, low=1, help="optimizer steps")
    lr: float = option(2e-6, low=0.0, help="learning rate")
    batch: int = option(1, low=1, help="images per step")
    weight_decay: float = option(0.01, low=0.0, help="AdamW weight decay")
    max_grad_norm: float = option(1.0, low=0.0, help="gradient clipping norm")
    n_images: int = option(10, low=1, help="concept images (generated, or the first ones of the folder)")
    images: str | None = option(None, help="folder of the concept's images (None: generated by the model)")
    image_steps: int | None = option(None, low=1, help="DDIM steps of generated images (None: the model's)")
    seed: int = 0
    checkpoint: str | None = option(None, hyperparameter=False)  # safetensors path (resume)
    checkpoint_every: int = option(50, low=1, hyperparameter=False)

    def __post_init__(self):
        super().__post_init__()
        if self.parameters not in PARAMETER_GROUPS:
            raise SafediffError(f"forget-me-not: parameters must be one of {', '.join(PARAMETER_GROUPS)}, "
                                f"got {self.parameters!r}")
        self.losses: list[float] = []

    def touches(self, name: str) -> bool:
        return name.startswith("unet.") and in_group(PARAMETER_GROUPS[self.parameters], name)  # UNet only

    def compute(self, model, concepts, preserve, guide, progress):
        if preserve is not None or guide is not None:
            logger.warning("Forget-Me-Not uses neither preserve prompts nor a guide; they are ignored")
        items = [(fill_context(t, w), w) for c in concepts for w in c.keywords if w.strip()
                 for t in (c.contexts or GENERIC_TEMPLATES)]
        if not items:
            raise SafediffError("no concept keywords to forget; give at least one concept with a keyword")
        items = list(dict.fromkeys(items))
        g = torch.Generator(device="cpu").manual_seed(int(self.seed))
        x0, source = latents_from(model, self.images, [p for p, _ in items], self.n_images, g, self.image_steps)
        prompt_of = [i % len(items) for i in range(len(x0))]
        prompts = [p for p, _ in items]
        with torch.no_grad():
            conds = model.adapter.encode(prompts)
        eos = model.adapter.eos_positions(prompts)
        mask = concept_positions(model.adapter.tokenizers[0], prompts, [w for _, w in items], eos,
                                 conds.embeds.shape[1], self.use_pooler)
        adapter, T = model.adapter, model.adapter.train_timesteps
        params = denoiser_group(model, PARAMETER_GROUPS[self.parameters])
        records: list[tuple[torch.Tensor, int]] = []
        e = self

        def step(_: int):
            idx = torch.randint(len(x0), (e.batch,), generator=g)
            t = torch.randint(T, (e.batch,), generator=g)
            eps = torch.randn(x0[idx].shape, generator=g, dtype=x0.dtype).to(x0.device)
            rows = torch.tensor([prompt_of[i] for i in idx.tolist()])
            records.clear()
            t = t.to(x0.device)
            denoiser_output(model, adapter.noised(x0[idx], eps, t), t, conds[rows])
            loss = attention_norm(records, mask[rows])
            records.clear()
            return loss, {}

        def optimizer():
            return torch.optim.AdamW(list(params.values()), lr=e.lr, weight_decay=e.weight_decay)

        with recorded_cross_attention(model.denoiser, lambda probs, heads: records.append((probs, heads))):
            new, state, resumed_at = fit_denoiser(self, model, params, optimizer, step, {"training": g},
                                                  {"items": items, **source}, progress,
                                                  max_grad_norm=self.max_grad_norm)
        self.losses = list(state.losses)
        info = {"prompts": len(items), "examples": prompts[:12], "images": source, "trained_tensors": len(params),
                "resumed_at_iteration": resumed_at, **loss_summary(state.losses)}
        return new, info
