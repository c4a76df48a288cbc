"""Exact renders of the sandbox world as training data: images of one value, and batches of the training distribution.

What methods that fine-tune on images read when their image source is ``world`` (``safediff.imagesets``):

- ``value_renders(value, n, rng)``: ``n`` one-object scenes carrying ``value`` (the other two attributes drawn
  uniformly, placed as in training, never the mark), each captioned by a plain template that names all three of its
  attributes by their words ("a striped red circle"): exact images of the value, as a user who collected k pictures of
  it would have them;
- ``training_renders(n, rng)``: ``n`` scenes of the training distribution (one or two objects, the mark on
  ``world.P_MARK`` of them, never captioned) with their training captions (``captions.caption``).
"""

from __future__ import annotations

import numpy as np

from safediff.errors import SafediffError
from safediff.sandbox.captions import PLAIN_TEMPLATES, fill
from safediff.sandbox.values import VALUES, axis_of
from safediff.sandbox.world import Scene, random_object, render, sample_batch


def value_renders(value: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """``n`` renders of a lone object with ``value`` -> (uint8 [n, 64, 64, 3], captions)."""
    try:
        axis = axis_of(value)
    except ValueError:
        raise SafediffError(f"the world image source renders sandbox values ({', '.join(VALUES)}); {value!r} is not "
                            "one (use source=base or a folder of images)") from None
    images, captions = [], []
    for _ in range(n):
        obj = random_object(rng, **{axis: value})
        images.append(render(Scene((obj,), mark=False)))
        template = PLAIN_TEMPLATES[rng.integers(len(PLAIN_TEMPLATES))]
        captions.append(fill(template, colour=obj.colour, shape=obj.shape, style=obj.style))
    return np.stack(images), captions


def training_renders(n: int, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """``n`` scenes of the training distribution with their captions -> (uint8 [n, 64, 64, 3], captions)."""
    images, captions, _ = sample_batch(rng, n)
    return images, captions
