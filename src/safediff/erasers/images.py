"""Training images of the erasers that learn from images (Concept Ablation, Forget-Me-Not, TICoE, SafeGen), as latents.

Three sources, one form (latents x_0 the denoiser's forward process starts from):

- ``generated_latents``: the model's own samples for prompts from each seed's Gaussian noise, with classifier-free
  guidance, at the model's size, with the trajectory scheduler (``sampling.trajectory_scheduler``: DDIM with η = 0 on
  a UNet, the flow-matching Euler on SD3/FLUX); the final latents are kept (no decode/encode round trip);
- ``folder_images`` + ``encode_images``: PNG/JPEG files of a folder, resized to the model's size (bilinear),
  encoded with the model's VAE (the posterior mean, brought into the denoiser's latent space by
  ``adapter.from_vae``: the scaling factor, SDXL-style ``latents_mean/std``, SD3/FLUX's shift);
- ``safediff.exemplars.exemplar_images`` + ``encode_images``: images a concept preset names (the sandbox's renders).

The forward process the trainers share is the adapter's: ``adapter.noised`` (q(x_t | x_0): √ᾱ_t x_0 + √(1−ᾱ_t) ε on
a UNet, (1 − σ) x_0 + σ ε on SD3/FLUX) and ``adapter.training_target`` (ε, v, or the velocity ε − x_0).
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
    from safediff.sampling import cfg_session, denoise, initial_noise, step_kwargs, trajectory_scheduler

    d = model.defaults
    steps = int(steps or d["steps"])
    guidance = float(d["guidance"] if guidance is None else guidance)
    height, width = int(d["height"]), int(d["width"])
    out = []
    for s in range(0, len(prompts), batch):
        part, part_seeds = prompts[s:s + batch], seeds[s:s + batch]
        scheduler = trajectory_scheduler(model, steps, height, width)
        noise, _ = initial_noise(model, part_seeds, height, width)
        session = cfg_session(model, model.adapter.encode(part), model.adapter.encode_negative(None, len(part)),
                              guidance, scheduler, height, width)
        out.append(denoise(session, scheduler, model.adapter.initial_latents(scheduler, noise),
                           kwargs=step_kwargs(scheduler, None, 0.0)))
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
    """uint8 [N, H, W, 3] -> latents [N, C, h, w] at the model's default size (VAE posterior mean, in the
    denoiser's latent space)."""
    vae = model.vae
    images = resized(images, int(model.defaults["height"]), int(model.defaults["width"]))
    out = []
    for s in range(0, len(images), batch):
        x = torch.from_numpy(images[s:s + batch]).permute(0, 3, 1, 2).to(vae.device, vae.dtype) / 127.5 - 1.0
        out.append(model.adapter.from_vae(vae.encode(x).latent_dist.mean).to(model.dtype))
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
