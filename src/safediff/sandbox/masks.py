"""Exact concept masks on the sandbox: images of a value's object, rendered by the world, and where that object is.

``sandbox_mask_provider(concepts)`` is the mask provider erasers that train inside the concept's region take (MACE's
``masks`` field; ``safediff.erasers.attention_maps`` describes the protocol). For a value of one axis it renders
``n`` one-object scenes (``world.random_object`` with that value, the other attributes and the placement drawn from
``seed``; no mark) and masks each image with the object's silhouette (``geometry.coverage`` of its solid shape, at
least half a pixel covered): the ground truth a segmenter would approximate. Images are resized (bilinear; masks
nearest) when the model's sampling size differs from the world's 64x64.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from safediff.concepts import Concept
from safediff.errors import SafediffError
from safediff.erasers.attention_maps import MaskedImages
from safediff.sandbox.geometry import coverage
from safediff.sandbox.values import AXES, VALUES, axis_of
from safediff.sandbox.world import IMAGE_SIZE, Scene, random_object, render

SOURCE = "sandbox world: the rendered object's exact silhouette"


def silhouette(obj) -> np.ndarray:
    """Bool [IMAGE_SIZE, IMAGE_SIZE]: the pixels at least half covered by the object's solid shape."""
    a, (top, left) = coverage(obj.shape, "solid", obj.size, obj.cx, obj.cy, IMAGE_SIZE)
    out = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    out[top:top + a.shape[0], left:left + a.shape[1]] = a >= 0.5
    return out


def render_value(value: str, n: int, seed: int, height: int = IMAGE_SIZE, width: int = IMAGE_SIZE) -> MaskedImages:
    """``n`` rendered images of one object carrying ``value`` and their silhouette masks."""
    axis = axis_of(value)
    rng = np.random.default_rng([seed, 23, VALUES.index(value)])
    objects = [random_object(rng, **{axis: value}) for _ in range(n)]
    pixels = torch.from_numpy(np.stack([render(Scene((o,), False)) for o in objects])).permute(0, 3, 1, 2)
    pixels = pixels.float() / 255.0
    masks = torch.from_numpy(np.stack([silhouette(o) for o in objects]))[:, None]
    if (height, width) != (IMAGE_SIZE, IMAGE_SIZE):
        pixels = F.interpolate(pixels, size=(height, width), mode="bilinear", antialias=True).clamp(0, 1)
        masks = F.interpolate(masks.float(), size=(height, width), mode="nearest") > 0.5
    return MaskedImages(pixels, masks, SOURCE)


class SandboxMasks:
    """``provider(concept, n, seed, height, width) -> MaskedImages`` for sandbox values."""

    source = SOURCE

    def __call__(self, concept: Concept, n: int, seed: int, height: int, width: int) -> MaskedImages:
        if concept.name not in VALUES:
            raise SafediffError(f"the sandbox renders its values only ({', '.join(VALUES)}); got {concept.name!r}")
        return render_value(concept.name, n, seed, height, width)


def sandbox_mask_provider(concepts: list[Concept]) -> SandboxMasks:
    """The exact mask provider for sandbox concepts; SafediffError for any other concept."""
    other = [c.name for c in concepts if c.category not in AXES or c.name not in VALUES]
    if other:
        raise SafediffError(f"the sandbox mask provider renders sandbox values only; got {', '.join(other)}")
    return SandboxMasks()
