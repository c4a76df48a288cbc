"""Geom-Erasing: remove an *implicit* concept (one the model draws unprompted: a watermark, a QR code, the sandbox's
corner mark) by teaching it a name with a place, then generating with that name and place as the negative prompt.

Paper: Z. Liu, K. Chen, Y. Zhang, J. Han, L. Hong, H. Xu, Z. Li, D.-Y. Yeung, J. T. Kwok, "Implicit Concept Removal
of Diffusion Models" (Geom-Erasing), ECCV 2024, arXiv:2310.05873. No public code was found; this implements the
paper's description, with the choices below stated.

An implicit concept cannot be erased by its word: the model never learned to tie it to one. Geom-Erasing gives it a
word and a place. A detector D finds the concept in the fine-tuning images and its box b = (x₀, y₀, x₁, y₁); the
box is written with location tokens on a grid of ``bins`` per side (Pix2Seq / GeoDiffusion's discretisation: one
token per coordinate, ⌊x₀·bins⌋, ⌊y₀·bins⌋, ⌈x₁·bins⌉−1, ⌈y₁·bins⌉−1), and every caption of an image where D finds the
concept is extended with "<word> <L_x0> <L_y0> <L_x1> <L_y1>" (a classifier without boxes flags the whole image).
The model is fine-tuned on the extended captions with the denoising loss (``safediff.finetune``):

    min_{θ, e_L}  E_{(x₀, c⁺), t, ε} ‖ ε − ε_θ(√ᾱ_t x₀ + √(1−ᾱ_t) ε, t, E(c⁺; e_L)) ‖²

over the location tokens' embeddings e_L and the denoiser weights θ in ``modules`` (by default the attention where image
and text meet, ``adapters.roles`` ``text_attention``: a UNet's cross-attention ``attn2``, an MM-DiT's joint attention on
SD3/FLUX.1, where the rule carries over unchanged with the flow-matching loss of ``safediff.finetune``), so that the
concept is explained by its words where it appears and no longer by the plain caption. Generation then uses the concept
with its most frequent places as the negative prompt n (up to ``max_places``, comma-separated):
ε̃ = ε(x_t, n) + s (ε(x_t, c) − ε(x_t, n)).

Choices where the paper leaves room (no code): the location tokens are existing single-character tokens that the
captions never use (``location_tokens``; by default the first ``bins`` of ``~ ^ | ` @ # $ % & * + = < > [ ] { } _`` that
are one token in every tokenizer of the model, CLIP's and T5's alike) whose embedding rows are learned, instead of new
vocabulary entries, so the edit keeps every tensor's shape (the edit holds each whole token-embedding table); the
negative prompt is declared in the edit (``info.negative_prompt``) and used by the sampler whenever no other negative
prompt is given (``Model.negative_prompt``), so ``--model SPEC+EDIT`` generates as the method intends;
``negative=false`` leaves it out. The concept's detector is ``detector`` (default: the concept's judge); images are the
model's fine-tuning data: the sandbox world's training distribution (``source=world``: the mark on a quarter of them,
never captioned), the model's own images of ``prompts`` (``base``) or a folder captioned with ``prompts`` (``folder``).
One implicit concept per fit (multi-concept: no).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import torch

from safediff.adapters.roles import in_group
from safediff.erasers.base import Eraser
from safediff.erasers.training import loss_summary
from safediff.errors import SafediffError
from safediff.erasers.modules import denoiser_group
from safediff.finetune import TokenRows, Trainable, diffusion_loss, select
from safediff.imagesets import check_source, training_images
from safediff.options import option

LOCATION_CANDIDATES = tuple("~^|`@#$%&*+=<>[]{}_")
# the token-embedding table: CLIP's; T5's, whose ``shared.weight`` is tied to ``encoder.embed_tokens.weight``
TABLE_SUFFIXES = ("embeddings.token_embedding.weight", "shared.weight", "encoder.embed_tokens.weight")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def box_bins(box: tuple[float, float, float, float], bins: int) -> tuple[int, int, int, int]:
    """(x₀, y₀, x₁, y₁) in [0, 1] -> the grid cells of its first and last pixel rows/columns."""
    x0, y0, x1, y1 = box
    first = lambda v: min(bins - 1, max(0, math.floor(v * bins)))  # noqa: E731
    last = lambda v: min(bins - 1, max(0, math.ceil(v * bins) - 1))  # noqa: E731
    return first(x0), first(y0), last(x1), last(y1)


def location_tokens(adapter, bins: int, given: tuple[str, ...]) -> tuple[list[str], list[list[int]]]:
    """``bins`` strings that are one token in every tokenizer, and their ids per tokenizer."""
    pool = given or LOCATION_CANDIDATES
    chosen, ids = [], []
    for s in pool:
        per = [tok(s, add_special_tokens=False).input_ids for tok in adapter.tokenizers]
        if all(len(p) == 1 for p in per):
            chosen.append(s)
            ids.append([p[0] for p in per])
        elif given:
            raise SafediffError(f"geom-erasing: location token {s!r} is not one token in this model's tokenizer")
        if len(chosen) == bins:
            return chosen, [list(col) for col in zip(*ids)]
    raise SafediffError(f"geom-erasing: only {len(chosen)} single-token location strings for {bins} bins; lower bins "
                        "or give location_tokens=A;B;...")


@dataclass
class GeomErasing(Eraser):
    name: ClassVar[str] = "geom-erasing"
    paper: ClassVar[str] = ("Liu, Chen, Zhang, Han, Hong, Xu, Li, Yeung, Kwok, Implicit Concept Removal of Diffusion "
                            "Models (Geom-Erasing), ECCV 2024 (arXiv 2310.05873)")
    # sandbox: the world's training distribution, a few CPU minutes on the 4.3 M-parameter UNet (untuned)
    sandbox: ClassVar[dict[str, dict]] = {
        "benchmark": {"source": "world", "n_images": 256, "iterations": 400, "batch": 8, "lr": 1e-4,
                      "token_lr": 1e-3},
        "demo": {"source": "world", "n_images": 64, "iterations": 60, "batch": 8, "lr": 1e-4, "token_lr": 1e-3},
        "smoke": {"source": "world", "n_images": 4, "iterations": 2, "batch": 2, "lr": 1e-4, "token_lr": 1e-3},
    }
    zero_strength: ClassVar[dict] = {"lr": 0.0, "token_lr": 0.0, "negative": False}

    detector: str = option("", help="detector spec that finds the concept (default: the concept's judge)")
    bins: int = option(8, low=1, high=len(LOCATION_CANDIDATES), help="location bins per side")
    location_tokens: tuple[str, ...] = option((), help="strings used as location tokens (default: chosen)")
    source: str = option("base", help="fine-tuning images: world, base (the model's own), folder")
    images: str = option("", help="folder of images (source=folder)")
    prompts: tuple[str, ...] = option((), help="prompts of base/folder images (default: the preserve items)")
    n_images: int = option(200, low=1, help="fine-tuning images")
    modules: tuple[str, ...] = option((), help="parts of denoiser parameter names fine-tuned (none: the attention "
                                               "where image and text meet)")
    iterations: int = option(1000, low=1, help="AdamW steps")
    lr: float = option(1e-5, low=0.0, help="learning rate of the UNet weights")
    token_lr: float = option(5e-3, low=0.0, help="learning rate of the location tokens' embeddings")
    batch: int = option(4, low=1, help="images per step")
    max_places: int = option(3, low=1, help="places of the concept in the negative prompt")
    negative: bool = option(True, help="declare the negative prompt the edit generates with")
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        check_source(self.source, self.images, "geom-erasing")

    def touches(self, name: str) -> bool:
        component, _, rest = name.partition(".")
        if component in TEXT_ENCODERS:
            return rest.endswith(TABLE_SUFFIXES)
        if component not in ("unet", "transformer"):
            return False
        return any(p in name for p in self.modules) if self.modules else in_group("xattn", name)

    def compute(self, model, concepts, preserve, guide, progress):
        from safediff.detectors import build_detector

        if len(concepts) != 1:
            raise SafediffError(f"geom-erasing removes one implicit concept per fit, got {len(concepts)}")
        concept = concepts[0]
        spec = self.detector or concept.judge
        if not spec:
            raise SafediffError(f"geom-erasing needs a detector that finds '{concept.name}' (detector=NAME, e.g. "
                                "sandbox-mark)")
        detector = build_detector(spec)
        g = torch.Generator(device="cpu").manual_seed(int(self.seed))
        prompts = list(self.prompts) or [p for p in (preserve if preserve is not None else concept.preserve)]
        with torch.no_grad():
            data = training_images(model, self.n_images, g, self.source, prompts=prompts, folder=self.images)
            boxes = detector.locate(data.pixels)
        words, ids = location_tokens(model.adapter, self.bins, self.location_tokens)
        phrases = [None if b is None else " ".join([concept.keywords[0], *(words[i] for i in box_bins(b, self.bins))])
                   for b in boxes]
        captions = [c if p is None else f"{c} {p}".strip() for c, p in zip(data.captions, phrases)]
        names = self._trained(model)
        with torch.enable_grad():
            unet, rows = Trainable(model, names, "full", g), TokenRows(model, ids)
            opt = torch.optim.AdamW([{"params": unet.parameters(), "lr": self.lr},
                                     {"params": rows.parameters(), "lr": self.token_lr}])
            losses = []
            for _ in range(self.iterations):
                idx = torch.randint(len(captions), (self.batch,), generator=g)
                loss = diffusion_loss(model, data.latents[idx], rows.encode([captions[i] for i in idx]), g,
                                      unet.params())
                opt.zero_grad(set_to_none=True)
                loss.backward(inputs=[*unet.parameters(), *rows.parameters()])
                opt.step()
                losses.append(float(loss.detach()))
        places = Counter(p for p in phrases if p is not None)
        negative = ", ".join(p for p, _ in places.most_common(self.max_places)) if self.negative and places else None
        info = {"negative_prompt": negative, "detector": spec, "location_tokens": words, "bins": self.bins,
                "images": len(captions), "flagged": sum(p is not None for p in phrases), "source": data.source,
                "places": dict(places.most_common()), "trained_tensors": len(names), **loss_summary(losses)}
        return {**unet.tensors(), **rows.tensors()}, info

    def _trained(self, model) -> list[str]:
        """Denoiser parameter names fine-tuned: those matching ``modules``, or the ``xattn`` group."""
        if self.modules:
            return select(model, "full", self.modules)
        return list(denoiser_group(model, "xattn"))
