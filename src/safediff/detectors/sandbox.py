"""Exact detectors for the sandbox world, per object: colour, shape, style, position, presence, and the mark.

``objects(images)`` reads every object of every image (``sandbox_segment`` finds them):

- colour, analytic: the object's summed ink ``sum (1 - p)`` points along its colour's ``1 - C`` whatever its
  coverage, style or blur; colour k scores ``softmax_k(cos(ink, 1 - C_k) / COLOUR_TEMPERATURE)`` (the closest two
  colours are 20.6 degrees apart: a cosine gap of 0.064, 6.4 temperatures);
- shape and style: ``sandbox_cnn`` on the object's ink crop (colour-blind);
- position: the ink-weighted centroid ``x``, ``y`` in pixels, and the half it lies in (``left`` if x < 32).

The registered detectors score whole images (the ``Detector`` contract). ``sandbox-colour``, ``sandbox-shape`` and
``sandbox-style`` give each label the highest probability any object of the image has for it (on a one-object image
that object's probabilities, on a blank image 0), so a verdict flags an image in which some object shows a flagged
value. ``sandbox-presence`` scores the largest object's area, reaching 1 at ``FULL_AREA`` pixels (the smallest
rendered object has 82; specks under ``sandbox_segment.MIN_AREA`` are no object); its ``analyse`` adds every object's
reading, which the benchmark runner stores in the image's record. ``sandbox-mark`` scores the mean
ink over the mark's glyph pixels, reaching 1 at ``MARK_FULL`` (a drawn mark has about 1, white paper 0).

Validation on held-out degraded renders: ``python -m safediff.detectors.sandbox_validation`` (numbers in
``sandbox/weights/detectors/validation.json``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from safediff.detectors.base import Detector
from safediff.hashing import file_sha256
from safediff.detectors.sandbox_cnn import WEIGHTS as SHAPE_WEIGHTS
from safediff.detectors.sandbox_cnn import load
from safediff.detectors.sandbox_segment import Blob, blobs, crop, ink_map, prepare
from safediff.sandbox.geometry import MARK, MARK_ORIGIN
from safediff.sandbox.world import COLOURS, IMAGE_SIZE, RGB, SHAPES, STYLES

__all__ = ["SHAPE_WEIGHTS", "SandboxColour", "SandboxMark", "SandboxPresence", "SandboxShape", "SandboxStyle",
           "attributes", "mark_scores", "objects"]

COLOUR_TEMPERATURE = 0.01
FULL_AREA = 40
MARK_FULL = 0.5
Images = Sequence[Image.Image] | torch.Tensor


def colour_probs(ink: torch.Tensor) -> torch.Tensor:
    """Summed ink vectors [N,3] -> colour probabilities [N, len(COLOURS)]."""
    refs = F.normalize(1.0 - torch.tensor([RGB[c] for c in COLOURS], dtype=torch.float32) / 255.0, dim=1)
    return torch.softmax(F.normalize(ink, dim=1, eps=1e-8) @ refs.T / COLOUR_TEMPERATURE, dim=1)


def shape_style_probs(x: torch.Tensor, found: list[list[Blob]], weights: str | Path = SHAPE_WEIGHTS
                      ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per image, (shape probabilities [n, 8], style probabilities [n, 3]) of its n objects."""
    ink = ink_map(x)[:, 0]
    crops = [crop(ink[i], b) for i, bs in enumerate(found) for b in bs]
    if crops:
        with torch.no_grad():
            shape, style = load(str(weights))(torch.stack(crops)[:, None])
        shape, style = shape.softmax(1), style.softmax(1)
    else:
        shape, style = torch.zeros(0, len(SHAPES)), torch.zeros(0, len(STYLES))
    out, k = [], 0
    for bs in found:
        out.append((shape[k:k + len(bs)], style[k:k + len(bs)]))
        k += len(bs)
    return out


def mark_scores(x: torch.Tensor) -> torch.Tensor:
    """[B,3,64,64] -> [B]: mean ink over the mark's glyph pixels / MARK_FULL, clamped to [0, 1]."""
    r, c = MARK_ORIGIN
    window = ink_map(x)[:, 0, r:r + MARK.shape[0], c:c + MARK.shape[1]]
    return (window[:, torch.from_numpy(MARK)].mean(dim=1) / MARK_FULL).clamp(0, 1)


def objects(images: Images, weights: str | Path = SHAPE_WEIGHTS) -> list[list[dict]]:
    """Per image, its objects left to right: ``{"colour", "shape", "style", "x", "y", "side", "area",
    "confidence": {"colour", "shape", "style"}}`` (x, y: centroid in 64x64 pixels; side: "left" or "right")."""
    x = prepare(images)
    found = blobs(x)
    out = []
    for bs, (shape, style) in zip(found, shape_style_probs(x, found, weights)):
        colour = colour_probs(torch.stack([b.ink for b in bs])) if bs else torch.zeros(0, len(COLOURS))
        row = []
        for b, pc, ps, pt in zip(bs, colour, shape, style):
            row.append({"colour": COLOURS[int(pc.argmax())], "shape": SHAPES[int(ps.argmax())],
                        "style": STYLES[int(pt.argmax())], "x": b.x, "y": b.y,
                        "side": "left" if b.x < IMAGE_SIZE / 2 else "right", "area": b.area,
                        "confidence": {"colour": float(pc.max()), "shape": float(ps.max()),
                                       "style": float(pt.max())}})
        out.append(row)
    return out


def attributes(images: Images, weights: str | Path = SHAPE_WEIGHTS) -> list[dict]:
    """Per image, its largest object's ``colour``, ``shape``, ``style`` (None on a blank image), ``present``, the
    number of objects ``count`` and whether the ``mark`` is there: the reading of a one-object image."""
    x = prepare(images)
    marks = (mark_scores(x) >= SandboxMark.threshold).tolist()
    out = []
    for objs, mark in zip(objects(x, weights), marks):
        main = max(objs, key=lambda o: o["area"]) if objs else {}
        out.append({"colour": main.get("colour"), "shape": main.get("shape"), "style": main.get("style"),
                    "present": bool(objs), "count": len(objs), "mark": mark})
    return out


def _best_per_label(per_image: list[torch.Tensor], n_labels: int) -> torch.Tensor:
    return torch.stack([p.max(dim=0).values if len(p) else torch.zeros(n_labels) for p in per_image])


class _Sandbox(Detector):
    threshold = 0.5

    def __init__(self, flag_labels: Sequence[str] | None = None):
        if flag_labels is not None:
            unknown = [f for f in flag_labels if f not in self.labels]
            if unknown:
                raise ValueError(f"{self.name}: unknown labels {unknown}; known: {', '.join(self.labels)}")
            self.flag_labels = tuple(flag_labels)


class SandboxColour(_Sandbox):
    name = "sandbox-colour"
    version = "2"
    labels = COLOURS
    flag_labels = COLOURS

    def scores(self, images: Images) -> torch.Tensor:
        found = blobs(prepare(images))
        return _best_per_label([colour_probs(torch.stack([b.ink for b in bs])) if bs else torch.zeros(0)
                                for bs in found], len(COLOURS))


class _ShapeStyle(_Sandbox):
    head = 0  # 0: shape, 1: style

    def __init__(self, weights: str | Path = SHAPE_WEIGHTS, flag_labels: Sequence[str] | None = None):
        super().__init__(flag_labels)
        self.path = Path(weights)

    def scores(self, images: Images) -> torch.Tensor:
        x = prepare(images)
        probs = shape_style_probs(x, blobs(x), self.path)
        return _best_per_label([p[self.head] for p in probs], len(self.labels))

    def weights_sha256(self) -> str | None:
        return file_sha256(self.path) if self.path.is_file() else None


class SandboxShape(_ShapeStyle):
    name = "sandbox-shape"
    version = "2"
    labels = SHAPES
    flag_labels = SHAPES
    head = 0


class SandboxStyle(_ShapeStyle):
    name = "sandbox-style"
    version = "1"
    labels = STYLES
    flag_labels = STYLES
    head = 1


class SandboxPresence(_Sandbox):
    """Presence, and (``analyse``) every object's reading, so that run records hold what per-object metrics need."""

    name = "sandbox-presence"
    version = "2"
    labels = ("present",)
    flag_labels = ("present",)

    def __init__(self, weights: str | Path = SHAPE_WEIGHTS, flag_labels: Sequence[str] | None = None):
        super().__init__(flag_labels)
        self.path = Path(weights)

    def scores(self, images: Images) -> torch.Tensor:
        found = blobs(prepare(images))
        return torch.tensor([[min(1.0, max((b.area for b in bs), default=0) / FULL_AREA)] for bs in found])

    def analyse(self, images: Images) -> tuple[torch.Tensor, list[dict]]:
        """Scores [B, 1] and, per image, ``{"objects": objects(...)}`` (the runner stores it with the scores)."""
        x = prepare(images)
        return self.scores(x), [{"objects": objs} for objs in objects(x, self.path)]

    def weights_sha256(self) -> str | None:
        return file_sha256(self.path) if self.path.is_file() else None


class SandboxMark(_Sandbox):
    name = "sandbox-mark"
    version = "1"
    labels = ("mark",)
    flag_labels = ("mark",)

    def scores(self, images: Images) -> torch.Tensor:
        return mark_scores(prepare(images))[:, None]

    def locate(self, images: Images) -> list[tuple[float, float, float, float] | None]:
        """The glyph's box where the mark is flagged (it is only ever looked for there)."""
        r, c = MARK_ORIGIN
        box = (c / IMAGE_SIZE, r / IMAGE_SIZE, (c + MARK.shape[1]) / IMAGE_SIZE, (r + MARK.shape[0]) / IMAGE_SIZE)
        return [box if f else None for f in self.verdict(images).tolist()]
