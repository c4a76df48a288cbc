"""Captioned images to fine-tune on, from one of three sources, as latents the UNet reads.

Methods that fine-tune a model on images (the relearning attack, FreezeAsGuard, Geom-Erasing, backdoor injection)
name a *source* and never ask which world they run in:

- ``world``: exact renders of the sandbox world (``safediff.sandbox.data``): images of a concept's value, captioned
  with the words of all its attributes, or batches of the training distribution with their training captions; a
  concept that is not a sandbox value is refused there, in one line;
- ``base``: images a model generates (``draw(prompts, seeds)``, by default ``sampling.generate`` with the model's
  sampler defaults), captioned with the prompts that made them; their final latents are used as they are;
- ``folder``: the images of a folder (png, jpg, jpeg, webp; sorted by name), resized to the model's size and
  captioned with the prompts given, in turn.

Every random draw (which renders, which seeds) comes from the caller's ``torch.Generator``. Pixels go to latents
through the VAE's posterior mean (``attacks.objectives.image_latents``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from safediff.concepts import Concept
from safediff.errors import SafediffError

SOURCES = ("world", "base", "folder")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class ImageSet:
    """``latents`` [N, C, h, w] (x₀ as the UNet reads it), their ``captions`` and ``pixels`` [N, 3, H, W] in [0, 1]."""

    latents: torch.Tensor
    captions: list[str]
    pixels: torch.Tensor
    source: str

    def __len__(self) -> int:
        return len(self.captions)


def check_source(source: str, folder: str, owner: str) -> None:
    """One line for an unknown source, or a folder source without a folder."""
    if source not in SOURCES:
        raise SafediffError(f"{owner}: unknown image source '{source}'; accepted: {', '.join(SOURCES)}")
    if source == "folder" and not folder:
        raise SafediffError(f"{owner}: source=folder needs images=FOLDER")


def numpy_rng(generator: torch.Generator) -> np.random.Generator:
    """A NumPy generator seeded from ``generator`` (so renders follow the caller's seed)."""
    return np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator)))


def folder_images(folder: str, height: int, width: int) -> torch.Tensor:
    """Images in ``folder`` -> [N, 3, H, W] in [0, 1], resized to ``height`` x ``width``."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) \
        if Path(folder).is_dir() else []
    if not files:
        raise SafediffError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in '{folder}'; give a folder of images")
    arrays = [np.asarray(Image.open(p).convert("RGB").resize((width, height), Image.BICUBIC), dtype=np.float32)
              for p in files]
    return torch.from_numpy(np.stack(arrays) / 255.0).permute(0, 3, 1, 2).float()


def _resized(images: np.ndarray, height: int, width: int) -> torch.Tensor:
    """uint8 [N, h, w, 3] -> float [N, 3, height, width] in [0, 1] (antialiased bilinear)."""
    x = torch.from_numpy(images.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    if x.shape[-2:] != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0, 1)


def _from_pixels(model, pixels: torch.Tensor, captions: list[str], source: str) -> ImageSet:
    from safediff.attacks.objectives import image_latents

    return ImageSet(image_latents(model, pixels), captions, pixels, source)


def _generated(model, prompts: list[str], n: int, generator: torch.Generator, draw: Callable | None) -> ImageSet:
    from safediff.sampling import generate

    if not prompts:
        raise SafediffError("source=base needs at least one prompt to generate images from")
    chosen = [prompts[i % len(prompts)] for i in range(n)]
    seeds = torch.randint(2**31 - 1, (n,), generator=generator).tolist()
    with torch.no_grad():
        out = draw(chosen, seeds) if draw is not None else generate(model, chosen, seeds, progress=False)
    return ImageSet(out.latents.detach(), chosen, out.pixels.detach(), "base")


def _folder(model, folder: str, n: int, prompts: list[str], height: int, width: int) -> ImageSet:
    if not prompts:
        raise SafediffError("source=folder needs at least one prompt to caption the images with")
    pixels = folder_images(folder, height, width)[:n]
    return _from_pixels(model, pixels, [prompts[i % len(prompts)] for i in range(len(pixels))], "folder")


def concept_images(model, concept: Concept, n: int, generator: torch.Generator, source: str, *,
                   prompts: list[str], folder: str = "", draw: Callable | None = None,
                   size: tuple[int, int] | None = None) -> ImageSet:
    """``n`` captioned images of ``concept``: world renders of its value, images ``draw`` (or the model) generates
    from ``prompts``, or a folder's images captioned with ``prompts``. ``size``: (height, width), default the
    model's."""
    height, width = size or (int(model.defaults["height"]), int(model.defaults["width"]))
    check_source(source, folder, "image source")
    if source == "world":
        from safediff.sandbox.data import value_renders

        images, captions = value_renders(concept.name, n, numpy_rng(generator))
        return _from_pixels(model, _resized(images, height, width), captions, "world")
    if source == "base":
        return _generated(model, prompts, n, generator, draw)
    return _folder(model, folder, n, prompts, height, width)


def training_images(model, n: int, generator: torch.Generator, source: str, *, prompts: list[str],
                    folder: str = "", draw: Callable | None = None) -> ImageSet:
    """``n`` captioned images of the data a model is fine-tuned on: the sandbox world's training distribution, images
    the model generates from ``prompts``, or a folder's images captioned with ``prompts``."""
    height, width = int(model.defaults["height"]), int(model.defaults["width"])
    check_source(source, folder, "image source")
    if source == "world":
        from safediff.sandbox.data import training_renders

        images, captions = training_renders(n, numpy_rng(generator))
        return _from_pixels(model, _resized(images, height, width), captions, "world")
    if source == "base":
        return _generated(model, prompts, n, generator, draw)
    return _folder(model, folder, n, prompts, height, width)


def shared_images(model, concepts: list[Concept], n: int, generator: torch.Generator, source: str,
                  folder: str = "", size: tuple[int, int] | None = None) -> ImageSet:
    """``n`` images shared among ``concepts`` (the first ones get the remainder; at most one concept per image), each
    concept's generated or folder images captioned with its word in the contexts erasers are told
    (``erasers.prompts.contexts``)."""
    from safediff.erasers.prompts import contexts

    if not concepts:
        raise SafediffError("no concept to draw images of")
    concepts = concepts[:n]
    counts = [n // len(concepts) + (1 if i < n % len(concepts) else 0) for i in range(len(concepts))]
    sets = [concept_images(model, c, k, generator, source, prompts=contexts(c, c.keywords[0], expand=True),
                           folder=folder, size=size) for c, k in zip(concepts, counts)]
    return ImageSet(torch.cat([s.latents for s in sets]), [c for s in sets for c in s.captions],
                    torch.cat([s.pixels for s in sets]), source)
