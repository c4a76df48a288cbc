"""The sandbox world (v2): one or two coloured, styled shapes on a white 64x64 background, sometimes a small mark,
with captions, all drawn from a seed. Ground truth is exact: every image is rendered from known attributes.

A ``Scene`` holds one or two ``Object``s (colour, shape, style, size, centre) and whether the mark is drawn.

- One object (probability ``1 - P_TWO``): size ``h`` (half-width of the bounding box) uniform in ``SINGLE_SIZE``,
  centre uniform so that the object lies 2 px inside the image.
- Two objects (``P_TWO``): sizes in ``PAIR_SIZE``; the first object lies in the left half (columns 2-30), the second
  in the right half (columns 34-62), so they never overlap and are at least 4 px apart. Captions name the left one
  first (``captions``): "a red circle and a blue square" has the red circle on the left. Colours, shapes and styles
  of the two are drawn independently.
- No object ever enters the mark's corner (``geometry.MARK_ZONE``): placements that would are redrawn.
- The mark (``geometry.MARK``, an 8x8 black glyph in the bottom-right corner) is drawn on a share ``P_MARK`` of the
  images, independently of everything else, and no caption ever mentions it: the model learns it as an unprompted
  concept and reproduces it at about that rate.

Colour, shape and style are drawn uniformly and independently. Rendering: ``geometry.coverage`` gives each object's
anti-aliased coverage ``a``; the pixel is ``(1 - a) * white + a * RGB[colour]`` (objects never overlap), and the mark's
pixels are black. Rendering a batch of 64 scenes takes a few milliseconds per image in NumPy.

This module is the world's public face: it re-exports the values (``values``) and the grammar (``captions``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from safediff.sandbox.captions import (COLOUR_ONLY_TEMPLATES, HELD_OUT_TEMPLATES, MIX, OBJECT_PHRASE,
                                       PAIR_HELD_OUT_TEMPLATES, PAIR_PLAIN_TEMPLATES, PAIR_TEMPLATES, PLAIN_TEMPLATES,
                                       SHAPE_ONLY_TEMPLATES, STYLE_ONLY_TEMPLATES, TRAIN_TEMPLATES, CaptionMix, caption,
                                       fill, fill_pair, vocabulary)
from safediff.sandbox.geometry import MARK, MARK_ORIGIN, MARK_ZONE, coverage
from safediff.sandbox.values import (AXES, COLOURS, IMPLICIT, NEIGHBOURS, RGB, SHAPES, STYLES, SYNONYMS, VALUES,
                                     axis_of, far, words)

__all__ = [
    "AXES", "COLOURS", "COLOUR_ONLY_TEMPLATES", "CaptionMix", "HELD_OUT_TEMPLATES", "IMAGE_SIZE", "IMPLICIT", "MIX",
    "NEIGHBOURS", "OBJECT_PHRASE", "Object", "PAIR_HELD_OUT_TEMPLATES", "PAIR_PLAIN_TEMPLATES", "PAIR_TEMPLATES",
    "PLAIN_TEMPLATES", "P_MARK", "P_TWO", "RGB", "SHAPES", "SHAPE_ONLY_TEMPLATES", "STYLES", "STYLE_ONLY_TEMPLATES",
    "SYNONYMS", "Scene", "TRAIN_TEMPLATES", "VALUES", "axis_of", "caption", "far", "fill", "fill_pair",
    "random_object", "random_scene", "render", "sample_batch", "vocabulary", "words",
]

IMAGE_SIZE = 64
P_TWO = 0.3
P_MARK = 0.25
SINGLE_SIZE = (11.0, 17.0)
PAIR_SIZE = (10.0, 13.0)
MARGIN = 2.0  # every object keeps this far from the image border
HALF_GAP = 2.0  # ... and in a two-object scene this far from the vertical midline


@dataclass(frozen=True)
class Object:
    colour: str
    shape: str
    style: str
    size: float  # half-width of the object's bounding box, in pixels
    cx: float  # centre, in pixels (0 = left edge of the image)
    cy: float


@dataclass(frozen=True)
class Scene:
    objects: tuple[Object, ...]  # one, or two (left, then right); none only in detector tests
    mark: bool


def _in_mark_zone(h: float, cx: float, cy: float) -> bool:
    return cx + h > MARK_ZONE and cy + h > MARK_ZONE


def random_object(rng: np.random.Generator, side: str = "any", colour: str | None = None, shape: str | None = None,
                  style: str | None = None) -> Object:
    """One object with the given attributes (the others drawn uniformly). ``side``: ``"any"`` places a lone object
    anywhere; ``"left"`` / ``"right"`` place one of a pair in that half."""
    colour = colour if colour is not None else COLOURS[rng.integers(len(COLOURS))]
    shape = shape if shape is not None else SHAPES[rng.integers(len(SHAPES))]
    style = style if style is not None else STYLES[rng.integers(len(STYLES))]
    for value, axis in ((colour, "colour"), (shape, "shape"), (style, "style")):
        if value not in AXES[axis]:
            raise ValueError(f"unknown {axis} {value!r}; known: {', '.join(AXES[axis])}")
    lo, hi = SINGLE_SIZE if side == "any" else PAIR_SIZE
    h = float(rng.uniform(lo, hi))
    x_range = {"any": (MARGIN + h, IMAGE_SIZE - MARGIN - h),
               "left": (MARGIN + h, IMAGE_SIZE / 2 - HALF_GAP - h),
               "right": (IMAGE_SIZE / 2 + HALF_GAP + h, IMAGE_SIZE - MARGIN - h)}
    if side not in x_range:
        raise ValueError(f"unknown side {side!r}; known: any, left, right")
    while True:
        cx = float(rng.uniform(*x_range[side]))
        cy = float(rng.uniform(MARGIN + h, IMAGE_SIZE - MARGIN - h))
        if not _in_mark_zone(h, cx, cy):
            return Object(colour, shape, style, h, cx, cy)


def random_scene(rng: np.random.Generator, n_objects: int | None = None, mark: bool | None = None) -> Scene:
    """A scene from the training distribution; ``n_objects`` (1 or 2) and ``mark`` fix those draws."""
    if n_objects is None:
        n_objects = 2 if rng.random() < P_TWO else 1
    if mark is None:
        mark = bool(rng.random() < P_MARK)
    if n_objects == 1:
        return Scene((random_object(rng),), mark)
    if n_objects == 2:
        return Scene((random_object(rng, "left"), random_object(rng, "right")), mark)
    raise ValueError(f"a scene holds 1 or 2 objects, got {n_objects}")


def render(scene: Scene) -> np.ndarray:
    """Scene -> uint8 [IMAGE_SIZE, IMAGE_SIZE, 3] RGB image."""
    ink = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    for o in scene.objects:
        if o.colour not in RGB:
            raise ValueError(f"unknown colour {o.colour!r}; known: {', '.join(COLOURS)}")
        a, (top, left) = coverage(o.shape, o.style, o.size, o.cx, o.cy, IMAGE_SIZE)
        rows, cols = a.shape
        ink[top:top + rows, left:left + cols] += a[..., None] * (255.0 - np.asarray(RGB[o.colour], np.float32))
    img = np.clip(np.rint(255.0 - ink), 0, 255).astype(np.uint8)
    if scene.mark:
        r, c = MARK_ORIGIN
        img[r:r + MARK.shape[0], c:c + MARK.shape[1]][MARK] = 0
    return img


def sample_batch(rng: np.random.Generator, n: int, mix: CaptionMix = MIX
                 ) -> tuple[np.ndarray, list[str], list[Scene]]:
    """n scenes from the training distribution -> (uint8 [n, 64, 64, 3], captions, scenes)."""
    scenes = [random_scene(rng) for _ in range(n)]
    images = np.stack([render(s) for s in scenes])
    captions = [caption(s, rng, mix) for s in scenes]
    return images, captions, scenes
