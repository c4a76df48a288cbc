"""Objectives of attack recipes (scalar tensors, differentiable in the conditioning), and the target image.

- ``denoising_error``: ‖ε − ε_θ*(x_t, t, c)‖² on a target image's noised latent x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε; for
  flow-matching models (SD3, FLUX) ‖(ε − x₀) − v_θ*(x_σ, t, c)‖² with x_σ = (1 − σ) x₀ + σ ε, σ = t/1000: the
  forward process and the training target are the adapter's (``noised``, ``training_target``).
- ``noise_matching``: ‖ε_θ*(x_t, t, c*) − ε_θ(x_t, t, c)‖² between the target and the unconstrained reference.
- ``embedding_distance``: ‖E(c*) − e‖² between an encoding and a fixed target encoding (text-encoder-only attacks).
- ``target_image_latents``: x₀ of an image of the concept (given, or drawn by the unconstrained model), as setup.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from safediff.adapters import Conditioning
from safediff.errors import SafediffError


def denoising_error(target, cond: Conditioning, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                    prompts: list[str] | None = None, guided: bool | None = None) -> torch.Tensor:
    """UnlearnDiffAtk's objective: MSE(ε, ε_θ*(x_t, t, c)) with ε_θ* the target's prediction (through its guard)."""
    x_t = target.model.adapter.noised(x0, noise, t)
    pred = target.noise(x_t, t, cond, prompts=prompts, guided=guided)
    return F.mse_loss(pred.float(), target.model.adapter.training_target(x0, noise, t).float())


def noise_matching(target, cond_adv: Conditioning, cond_ref: Conditioning, x0: torch.Tensor, t: torch.Tensor,
                   noise: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
    """P4D's objective: MSE(ε_θ*(z_t, t, P*), ε_θ(z_t, t, P)); the reference side carries no gradient."""
    z_t = target.model.adapter.noised(x0, noise, t)
    with torch.no_grad():
        ref = target.reference_noise(z_t, t, cond_ref)
    return F.mse_loss(target.noise(z_t, t, cond_adv, prompts=prompts).float(), ref.float())


def repeat_conditioning(cond: Conditioning, n: int) -> Conditioning:
    """[1, ...] conditioning -> [n, ...] (differentiable)."""
    return Conditioning(cond.embeds.expand(n, -1, -1), None if cond.pooled is None else cond.pooled.expand(n, -1))


def embedding_distance(cond: Conditioning, goal: Conditioning) -> torch.Tensor:
    """Squared L2 distance between encodings (per sample, summed over tokens and dims); [B]."""
    d = (cond.embeds.float() - goal.embeds.float()).pow(2).flatten(1).sum(1)
    if cond.pooled is not None and goal.pooled is not None:
        d = d + (cond.pooled.float() - goal.pooled.float()).pow(2).sum(1)
    return d


def uniform_timesteps(n: int, total: int = 1000) -> list[int]:
    """UnlearnDiffAtk's schedule: n timesteps spaced total//n apart from total//n//2 (50 -> 10, 30, ..., 990)."""
    if n <= 0 or n > total:
        raise SafediffError(f"timesteps must be in 1..{total}, got {n}")
    step = total // n
    return list(range(step // 2, total, step))[:n]


def target_image_latents(ctx) -> tuple[torch.Tensor, dict]:
    """x₀ of an image of the concept, as unmetered setup: the row's ``image`` file if given, else the unconstrained
    reference model's image of the prompt at the row's seed (no edits, no guard). Also returns whether the judge
    flags that image (an attack that matches a concept-free image cannot bring the concept back)."""
    from PIL import Image

    from safediff.detectors.base import images_to_tensor
    from safediff.imagesets import image_latents

    target = ctx.target
    with ctx.unmetered("target_image"), torch.no_grad():
        if ctx.row.get("image"):
            try:
                image = Image.open(ctx.row["image"]).convert("RGB").resize((target.width, target.height))
            except OSError as e:
                raise SafediffError(f"target image '{ctx.row['image']}' could not be read: {e}") from None
            pixels = images_to_tensor([image])
            x0 = image_latents(target.model, pixels)
            source = ctx.row["image"]
        else:
            out = target.generate([ctx.prompt], [ctx.seed], model=target.reference)
            pixels, x0, source = out.pixels, out.latents, "reference model"
        score = float(ctx.judge.score(pixels)[0])
    return x0.detach(), {"source": source, "judge_score": round(score, 6),
                         "judge_success": score >= ctx.judge.threshold}
