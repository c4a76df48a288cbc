"""SafeGen: text-agnostic removal of a concept's visual representations (Li, Yang, Deng, Yan, Chen, Ji, Xu, "SafeGen:
Mitigating Sexually Explicit Content Generation in Text-to-Image Models", ACM CCS 2024, arXiv 2404.06666; reference
code LetterLiGo/SafeGen_CCS2024, ``examples/text_to_image/train_text_to_image_adjust_sal.py``).

Only the UNet's self-attention layers (every ``attn1`` parameter) are tuned, on image triplets and with the empty
prompt (the text plays no part: whatever prompt reaches the model, the concept's visual representation is gone).
A concept image x_c (latent z_c) is to be denoised as its mosaic x_m (z_m), and clean images x_b (z_b) as themselves.
With one timestep t per triplet, noises ε (shared by the concept image and its mosaic) and ε_b, and
x_t = √ᾱ_t z + √(1−ᾱ_t) ε:

    L_m = ‖ε_θ(x_t^c, ∅, t) − (ε + z_c − z_m)‖²       (``mosaic_target="reference"``; v-prediction: v(z_c − z_m, ε))
    L_p = ‖ε_θ(x_t^b, ∅, t) − ε_b‖²
    L   = 0.1 L_m + 0.9 L_p                             (the reference's ``weight_tune`` / ``weight_preserve``)

The reference's mosaic target is ε shifted by z_c − z_m ("nudity + noise − (nudity − mosaic + noise) = mosaic" in
its comment); ``mosaic_target="exact"`` offers the prediction whose denoised estimate is the mosaic itself,
ε' = (x_t^c − √ᾱ_t z_m)/√(1−ᾱ_t) (v-prediction: the matching velocity). The default is the reference's; we could not
read the paper's equation here. AdamW (lr 1e-5, weight decay 0.01), constant learning rate, gradients clipped to norm
1, 1000 steps of 5 triplets (the reference's batch 1 with 5 accumulation steps, as one batch).

Mosaic: every ``mosaic_block`` x ``mosaic_block`` cell of the image (at the model's resolution) replaced by its mean
colour, exactly (cells at the right and bottom edges may be smaller).

Images. Concept images: ``images=FOLDER`` (on a real model: the concept's images; the reference uses 100 nude
photos), or the concepts' exemplars (``Concept.exemplars``: on the sandbox, scenes the world renders with the value).
Without either, the fit is refused. Clean images: ``clean_images=FOLDER``, else the concepts' exemplars without any
of them (the sandbox's scenes without the values), else the original model's samples of the preserve prompts (the
concepts' preserve lists or ``preserve``); without any of these the fit is refused. Latents are the VAE encoder's
mean, computed once (the reference draws a posterior sample each step); the reference's EMA of the weights and its
random crops/flips are not reproduced.

UNet models only (``archs``): the method rests on layers that see the image and never the text, the UNet's
``attn1``. An MM-DiT has none: image and text tokens share one joint attention (SD3.5's extra image self-attention
sits in blocks whose joint attention reads the prompt too), so tuning it is no longer text-agnostic; SD3/FLUX are
refused in one line.

Several concepts at once: yes; the concept images of all of them form one pool (the method is text-agnostic).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from safediff.adapters import Conditioning
from safediff.adapters.roles import denoiser_names, has_role
from safediff.erasers.base import Eraser
from safediff.imagesets import encode_images, folder_arrays, resized, trajectory_latents
from safediff.erasers.prompts import GENERIC_TEMPLATES, as_concept
from safediff.erasers.training import fit_denoiser, loss_summary
from safediff.concepts import fill_context
from safediff.errors import SafediffError
from safediff.exemplars import exemplar_images, has_exemplars
from safediff.options import option
from safediff.sampling import Trajectories, denoiser_output

logger = logging.getLogger("safediff")

MOSAIC_TARGETS = ("reference", "exact")


def mosaic(images: np.ndarray, block: int) -> np.ndarray:
    """uint8 [N, H, W, 3]: each ``block`` x ``block`` cell (edge cells smaller) replaced by its mean colour, rounded."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double()
    h, w = x.shape[-2:]
    means = F.avg_pool2d(x, block, stride=block, ceil_mode=True, count_include_pad=False)
    out = means.repeat_interleave(block, dim=2).repeat_interleave(block, dim=3)[..., :h, :w]
    return out.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def digest(pixels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()


def mosaic_target(scheduler, kind: str, x_t: torch.Tensor, z_c: torch.Tensor, z_m: torch.Tensor, eps: torch.Tensor,
                  t: torch.Tensor) -> torch.Tensor:
    """The output the concept's noisy latent x_t is trained towards (see the module docstring); ``scheduler``: a
    DDPM-family one (its ᾱ_t and prediction type)."""
    v_prediction = scheduler.config.prediction_type == "v_prediction"
    if kind == "reference":
        return scheduler.get_velocity(z_c - z_m, eps, t) if v_prediction else eps + z_c - z_m
    abar = scheduler.alphas_cumprod.to(x_t.device)[t].view(-1, 1, 1, 1).to(x_t.dtype)
    eps_m = (x_t - abar.sqrt() * z_m) / (1 - abar).sqrt()
    return scheduler.get_velocity(z_m, eps_m, t) if v_prediction else eps_m


@dataclass
class SafeGen(Eraser):
    """SafeGen (see the module docstring)."""

    name: ClassVar[str] = "safegen"
    archs: ClassVar[tuple[str, ...]] = ("sd1", "sd2", "sdxl")
    archs_reason: ClassVar[str] = ("SafeGen tunes vision-only self-attention (attn1), which SD3/FLUX lack: their "
                                   "image tokens attend jointly with the text; use esd-u or concept-ablation there")
    paper: ClassVar[str] = ("Li et al., SafeGen: Mitigating Sexually Explicit Content Generation in Text-to-Image "
                            "Models, ACM CCS 2024 (arXiv 2404.06666)")
    # benchmark: 200 steps of 4 triplets (~0.3 s each on the 4.3M-parameter sandbox UNet at 16x16 latents on one CPU
    # core, measured on its architecture with random weights; 8 UNet rows, self-attention trained), about a
    # CPU-minute; 64 rendered concept and clean scenes, 8-pixel mosaic cells (8x8 cells on the 64-pixel image);
    # lr 1e-4 (1000 steps at 1e-5 are for SD-1.4 on a GPU)
    sandbox: ClassVar[dict[str, dict]] = {
        "benchmark": {"iterations": 200, "lr": 1e-4, "batch": 4, "n_images": 64, "mosaic_block": 8},
        "demo": {"iterations": 60, "lr": 1e-4, "batch": 4, "n_images": 32, "mosaic_block": 8},
        "smoke": {"iterations": 2, "lr": 1e-3, "batch": 2, "n_images": 2, "mosaic_block": 8}}
    zero_strength: ClassVar[dict] = {"lr": 0.0}

    iterations: int = option(1000, low=1, help="optimizer steps")
    lr: float = option(1e-5, low=0.0, help="learning rate")
    batch: int = option(5, low=1, help="triplets per step (reference: 1 x 5 accumulation steps)")
    weight_mosaic: float = option(0.1, low=0.0, help="weight of the concept -> mosaic term")
    weight_preserve: float = option(0.9, low=0.0, help="weight of the clean-image term")
    mosaic_target: str = option("reference", help="'reference' (ε + z_c − z_m) or 'exact' (denoises to the mosaic)")
    mosaic_block: int = option(16, low=1, help="mosaic cell size in pixels")
    weight_decay: float = option(0.01, low=0.0, help="AdamW weight decay")
    max_grad_norm: float = option(1.0, low=0.0, help="gradient clipping norm")
    n_images: int = option(100, low=1, help="concept images (and clean images) used")
    images: str | None = option(None, help="folder of the concept's images (None: the concepts' exemplars)")
    clean_images: str | None = option(None, help="folder of clean images (None: exemplars without the concepts)")
    seed: int = 0
    checkpoint: str | None = option(None, hyperparameter=False)  # safetensors path (resume)
    checkpoint_every: int = option(100, low=1, hyperparameter=False)

    def __post_init__(self):
        super().__post_init__()
        if self.mosaic_target not in MOSAIC_TARGETS:
            raise SafediffError(f"safegen: mosaic_target must be one of {', '.join(MOSAIC_TARGETS)}, "
                                f"got {self.mosaic_target!r}")
        self.losses: list[float] = []

    def touches(self, name: str) -> bool:
        return name.startswith("unet.") and has_role(name, "image_self_attention")  # UNet only

    def concept_pixels(self, model, concepts) -> tuple[np.ndarray, str]:
        if self.images:
            return folder_arrays(self.images, self.n_images), "folder"
        if has_exemplars(concepts):
            return exemplar_images(concepts, self.n_images, int(self.seed), present=True), "exemplars"
        raise SafediffError("safegen learns from images of the concept: give images=FOLDER (their mosaics are "
                            f"computed); none are known for {', '.join(c.name for c in concepts)}")

    def clean_latents(self, model, concepts, preserve) -> tuple[torch.Tensor, dict]:
        if self.clean_images:
            pixels = folder_arrays(self.clean_images, self.n_images)
            return encode_images(model, pixels), {"source": "folder", "sha256": digest(pixels)}
        if has_exemplars(concepts):
            pixels = exemplar_images(concepts, self.n_images, int(self.seed), present=False)
            return encode_images(model, pixels), {"source": "exemplars"}
        items = list(dict.fromkeys(p for c in concepts for p in c.preserve)) if preserve is None else \
            [p for p in preserve if p.strip()]
        prompts = [fill_context(t, item) for item in items for t in (as_concept(item).contexts or GENERIC_TEMPLATES)]
        if not prompts:
            raise SafediffError("safegen keeps clean images as they are: give clean_images=FOLDER or preserve prompts")
        chosen = [prompts[i % len(prompts)] for i in range(self.n_images)]
        seeds = [int(self.seed) * 1_000_003 + i for i in range(self.n_images)]
        return trajectory_latents(model, chosen, seeds), {"source": "generated", "examples": chosen[:8]}

    def compute(self, model, concepts, preserve, guide, progress):
        if guide is not None:
            logger.warning("SafeGen maps images to their mosaics; the guide is ignored")
        pixels, source = self.concept_pixels(model, concepts)
        pixels = resized(pixels, int(model.defaults["height"]), int(model.defaults["width"]))
        z_c = encode_images(model, pixels)
        z_m = encode_images(model, mosaic(pixels, self.mosaic_block))
        z_b, clean = self.clean_latents(model, concepts, preserve)
        with torch.no_grad():
            uncond = model.adapter.encode_negative(None, 1)
        scheduler = Trajectories(model).scheduler
        adapter, T = model.adapter, model.adapter.train_timesteps
        named = dict(model.denoiser.named_parameters())
        params = {n: named[n] for n in denoiser_names(model, "image_self_attention")}
        g = torch.Generator(device="cpu").manual_seed(int(self.seed))
        e = self

        def step(_: int):
            i = torch.randint(len(z_c), (e.batch,), generator=g)
            j = torch.randint(len(z_b), (e.batch,), generator=g)
            t = torch.randint(T, (e.batch,), generator=g)
            eps = torch.randn(z_c[i].shape, generator=g, dtype=z_c.dtype).to(z_c.device)
            eps_b = torch.randn(z_b[j].shape, generator=g, dtype=z_b.dtype).to(z_b.device)
            t = t.to(z_c.device)
            x_c, x_b = adapter.noised(z_c[i], eps, t), adapter.noised(z_b[j], eps_b, t)
            with torch.no_grad():
                target_m = mosaic_target(scheduler, e.mosaic_target, x_c, z_c[i], z_m[i], eps, t)
                target_b = adapter.training_target(z_b[j], eps_b, t)
            pred = denoiser_output(model, torch.cat([x_c, x_b]), torch.cat([t, t]),
                                   Conditioning.cat([uncond] * (2 * e.batch)))
            loss = e.weight_mosaic * F.mse_loss(pred[:e.batch], target_m) + \
                e.weight_preserve * F.mse_loss(pred[e.batch:], target_b)
            return loss, {}

        def optimizer():
            return torch.optim.AdamW(list(params.values()), lr=e.lr, weight_decay=e.weight_decay)

        record = {"concept_images": source, "concept_sha256": digest(pixels), "clean": clean}
        new, state, resumed_at = fit_denoiser(self, model, params, optimizer, step, {"training": g}, record,
                                              progress, max_grad_norm=self.max_grad_norm)
        self.losses = list(state.losses)
        info = {**record, "concept_images_n": len(z_c), "clean_images_n": len(z_b), "trained_tensors": len(params),
                "resumed_at_iteration": resumed_at, **loss_summary(state.losses)}
        return new, info
