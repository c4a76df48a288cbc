"""Training images of the erasers that learn from images (Concept Ablation, Forget-Me-Not, TICoE, SafeGen), as latents.

Three sources, one form (latents x_0 the UNet's forward process starts from):

- ``generated_latents``: the model's own samples for prompts: DDIM (η = 0) from each seed's Gaussian noise, with
  classifier-free guidance, at the model's size; the final latents are kept (no decode/encode round trip);
- ``folder_images`` + ``encode_images``: PNG/JPEG files of a folder, resized to the model's size (bilinear),
  encoded with the model's VAE (the posterior mean, times the scaling factor; SDXL-style ``latents_mean/std``
  applied as ``sampling.decode`` undoes them);
- ``safediff.exemplars.exemplar_images`` + ``encode_images``: images a concept preset names (the sandbox's renders).

And the forward process the trainers share: ``noised`` (q(x_t | x_0) = √ᾱ_t x_0 + √(1−ᾱ_t) ε) and
``prediction_target`` (what the denoiser should output for it: ε, or v = √ᾱ_t ε − √(1−ᾱ_t) x_0 for v-prediction).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from safediff.errors import SafediffError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@torch.no_grad()
def generated_latents(model, prompts: list[str], seeds: list[int], steps: int | None = None,
                      guidance: float | None = None, batch: int = 16) -> torch.Tensor:
    """[N, C, h, w]: one sample of the model (as it is now) per (prompt, seed)."""
    from safediff.sampling import cfg_session, ddim_scheduler, denoise, initial_noise

    d = model.defaults
    steps = int(steps or d["steps"])
    guidance = float(d["guidance"] if guidance is None else guidance)
    height, width = int(d["height"]), int(d["width"])
    out = []
    for s in range(0, len(prompts), batch):
        part, part_seeds = prompts[s:s + batch], seeds[s:s + batch]
        scheduler = ddim_scheduler(model, steps)
        noise, _ = initial_noise(model, part_seeds, height, width)
        session = cfg_session(model, model.adapter.encode(part), model.adapter.encode_negative(None, len(part)),
                              guidance, scheduler, height, width)
        out.append(denoise(session, scheduler, noise * scheduler.init_noise_sigma, kwargs={"eta": 0.0}))
    return torch.cat(out)


def folder_images(folder: str | Path, n: int | None = None) -> np.ndarray:
    """uint8 [N, H, W, 3]: the images of ``folder`` (sorted by name; the first ``n``), as RGB at the first one's
    size. SafediffError for a missing folder or one without images."""
    path = Path(folder)
    if not path.is_dir():
        raise SafediffError(f"image folder '{folder}' does not exist")
    files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if not files:
        raise SafediffError(f"image folder '{folder}' holds no images ({', '.join(IMAGE_SUFFIXES)})")
    files = files[:n] if n else files
    images = []
    for f in files:
        with Image.open(f) as im:
            rgb = im.convert("RGB")
            images.append(np.asarray(rgb.resize(images[0].shape[1::-1], Image.BILINEAR) if images else rgb))
    return np.stack(images)


def resized(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [N, height, width, 3] (bilinear; unchanged when already that size)."""
    if images.shape[1:3] == (height, width):
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((width, height), Image.BILINEAR)) for im in images])


@torch.no_grad()
def encode_images(model, images: np.ndarray, batch: int = 16) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> latents [N, C, h, w] at the model's default size (VAE posterior mean, scaled)."""
    vae = model.vae
    cfg = vae.config
    images = resized(images, int(model.defaults["height"]), int(model.defaults["width"]))
    out = []
    for s in range(0, len(images), batch):
        x = torch.from_numpy(images[s:s + batch]).permute(0, 3, 1, 2).to(vae.device, vae.dtype) / 127.5 - 1.0
        z = vae.encode(x).latent_dist.mean
        if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
            mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1).to(z)
            std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1).to(z)
            z = (z - mean) * cfg.scaling_factor / std
        else:
            z = z * cfg.scaling_factor
        out.append(z.to(model.dtype))
    return torch.cat(out)


def image_latents(model, folder: str | None, prompts: list[str], seeds: list[int],
                  steps: int | None = None) -> tuple[torch.Tensor, dict]:
    """x_0 [N, C, h, w] and where they came from: the first ``len(prompts)`` images of ``folder`` (recorded with
    their sha256), or without a folder the model's samples of ``prompts[i]`` with ``seeds[i]``."""
    if folder:
        pixels = folder_images(folder, len(prompts))
        return encode_images(model, pixels), {"source": "folder", "images": len(pixels),
                                              "images_sha256": hashlib.sha256(pixels.tobytes()).hexdigest()}
    return generated_latents(model, prompts, seeds, steps), {"source": "generated", "images": len(prompts)}


def noised(scheduler, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε (one timestep per sample)."""
    return scheduler.add_noise(x0, eps, t.to(x0.device))


def prediction_target(scheduler, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the denoiser is trained to output for x_t = noised(x0, eps, t): ε, or v for v-prediction models."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return eps
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, eps, t.to(x0.device))
    raise SafediffError(f"prediction type {kind!r} is not supported by image-based erasers (epsilon, v_prediction)")
