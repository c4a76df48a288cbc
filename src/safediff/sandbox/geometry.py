"""Shapes, styles and the mark of the sandbox world as exact geometry, rasterised with anti-aliased coverage.

A shape of size ``h`` (the half-width of its bounding box, in pixels) is a union of *primitives* centred on the
origin (y grows downwards, as in images): discs and simple polygons. Each shape fits in the square ``[-h, h]^2``:

=========  ==========================================================================================
circle     disc of radius h
square     axis-aligned square of half-side 0.85 h (about the circle's area)
triangle   upright: apex (0, -h), base corners (+-h, h)
diamond    rhombus with vertices (0, +-h) and (+-0.75 h, 0)
star       five points at radius h (one straight up), inner vertices at radius 0.5 h (a fat star, so its
           outline keeps a hole)
cross      12-gon: two bars of half-width 0.38 h reaching +-0.95 h
heart      two discs on the upper edges of a square turned 45 degrees (the classic construction)
arrow      7-gon pointing up: head with apex (0, -h) and base y = 0.1 h of half-width h, shaft of half-width 0.4 h
=========  ==========================================================================================

Styles are defined on the silhouette ``S`` and its inward offset ``S_w`` (every point at least ``w`` inside ``S``;
for a polygon the mitred offset of its edges, for a disc the disc of radius ``r - w``, for a union the union of the
offsets, which equals the offset of the union for the unions used here because their seams lie deeper than ``w``):

- ``solid``: ink on ``S``;
- ``outlined``: ink on the band ``S \\ S_w`` with ``w = OUTLINE * h`` (2.1 px at the smallest size, 3.6 px at the
  largest), white inside;
- ``striped``: the same band plus horizontal stripes inside: ink where ``round(y / 4)`` is even, ``y`` the height
  above or below the object's centre. The stripes are 4-pixel bands with a period of 8 px (two cells of the VAE's
  4x4-pixel latent grid); one is centred on the object, so even the smallest striped object shows a stripe where it
  is widest and never looks outlined.

Coverage: each pixel is sampled on a ``SUPERSAMPLE x SUPERSAMPLE`` grid of sub-pixel centres and the ink fraction is
its coverage ``a``; the rendered pixel is ``(1 - a) * white + a * colour``. Only the object's bounding box is sampled.

The mark (the world's unprompted concept) is an 8x8 black glyph, a 2-pixel square frame around a 2x2 dot, with its
top-left pixel at ``MARK_ORIGIN``; objects are kept out of the ``MARK_ZONE`` square that contains it with a margin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from safediff.sandbox.values import SHAPES, STYLES

SUPERSAMPLE = 4
OUTLINE = 0.21  # outline band width as a fraction of the size h
STRIPE = 4  # stripe band height in pixels (period 2 * STRIPE)

MARK = np.array([[c == "#" for c in row] for row in (
    "########",
    "########",
    "##....##",
    "##.##.##",
    "##.##.##",
    "##....##",
    "########",
    "########",
)])
MARK_ORIGIN = (52, 52)  # (row, column) of the glyph's top-left pixel in a 64x64 image
MARK_ZONE = 46  # objects stay out of the square [MARK_ZONE, size)^2 (the glyph with a 6-pixel margin)


@dataclass(frozen=True)
class Disc:
    cx: float
    cy: float
    r: float

    def inset(self, w: float) -> Disc:
        return Disc(self.cx, self.cy, self.r - w)

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        if self.r <= 0:
            return np.zeros(np.broadcast(x, y).shape, dtype=bool)
        return (x - self.cx) ** 2 + (y - self.cy) ** 2 <= self.r * self.r


@dataclass(frozen=True)
class Polygon:
    vertices: tuple[tuple[float, float], ...]

    def inset(self, w: float) -> Polygon:
        """The mitred inward offset: every edge moved ``w`` inwards, vertices where neighbouring edges meet."""
        v = np.asarray(self.vertices, dtype=np.float64)
        e = np.roll(v, -1, axis=0) - v
        area2 = float(np.sum(v[:, 0] * np.roll(v[:, 1], -1) - np.roll(v[:, 0], -1) * v[:, 1]))
        n = np.stack([-e[:, 1], e[:, 0]], axis=1) * (1.0 if area2 > 0 else -1.0)
        n /= np.linalg.norm(n, axis=1, keepdims=True)
        c = np.sum(n * v, axis=1) + w  # offset edge i: n_i . p = c_i
        out = []
        for i in range(len(v)):
            a = np.stack([n[i - 1], n[i]])
            out.append(tuple(np.linalg.solve(a, [c[i - 1], c[i]])))
        return Polygon(tuple(out))

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Even-odd rule: a ray to the right crosses the boundary an odd number of times."""
        inside = np.zeros(np.broadcast(x, y).shape, dtype=bool)
        v = self.vertices
        for (x1, y1), (x2, y2) in zip(v, v[1:] + v[:1]):
            if y1 == y2:
                continue
            crosses = (y1 > y) != (y2 > y)
            inside ^= crosses & (x < x1 + (y - y1) * ((x2 - x1) / (y2 - y1)))
        return inside


Primitive = Disc | Polygon


def _regular(points: int, radius: float, start: float = -90.0) -> list[tuple[float, float]]:
    return [(radius * math.cos(math.radians(start + 360.0 * k / points)),
             radius * math.sin(math.radians(start + 360.0 * k / points))) for k in range(points)]


def _star(h: float) -> Polygon:
    tips = _regular(5, h)
    inner = _regular(5, 0.5 * h, start=-90.0 + 36.0)
    return Polygon(tuple(p for pair in zip(tips, inner) for p in pair))


def _cross(h: float) -> Polygon:
    a, r = 0.38 * h, 0.95 * h
    return Polygon(((-a, -r), (a, -r), (a, -a), (r, -a), (r, a), (a, a), (a, r), (-a, r), (-a, a), (-r, a),
                    (-r, -a), (-a, -a)))


def _heart(h: float) -> tuple[Primitive, ...]:
    d = 2 * h / (1 + math.sqrt(2))  # the turned square's half-diagonal; the heart is then exactly 2h wide
    bottom = d * (1.5 + 1 / math.sqrt(2)) / 2  # centres the heart vertically
    top = (0.0, bottom - 2 * d)
    left, right = (-d, bottom - d), (d, bottom - d)
    r = d / math.sqrt(2)
    lobes = tuple(Disc((top[0] + p[0]) / 2, (top[1] + p[1]) / 2, r) for p in (left, right))
    return (*lobes, Polygon(((0.0, bottom), right, top, left)))


def _arrow(h: float) -> Polygon:
    b, s = 0.1 * h, 0.4 * h
    return Polygon(((0.0, -h), (h, b), (s, b), (s, h), (-s, h), (-s, b), (-h, b)))


def silhouette(shape: str, h: float) -> tuple[Primitive, ...]:
    """The primitives whose union is ``shape`` at size ``h``, centred on the origin."""
    if shape == "circle":
        return (Disc(0.0, 0.0, h),)
    if shape == "square":
        s = 0.85 * h
        return (Polygon(((-s, -s), (s, -s), (s, s), (-s, s))),)
    if shape == "triangle":
        return (Polygon(((0.0, -h), (h, h), (-h, h))),)
    if shape == "diamond":
        return (Polygon(((0.0, -h), (0.75 * h, 0.0), (0.0, h), (-0.75 * h, 0.0))),)
    if shape == "star":
        return (_star(h),)
    if shape == "cross":
        return (_cross(h),)
    if shape == "heart":
        return _heart(h)
    if shape == "arrow":
        return (_arrow(h),)
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def _union(parts: tuple[Primitive, ...], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    out = parts[0].contains(x, y)
    for p in parts[1:]:
        out |= p.contains(x, y)
    return out


def ink_mask(shape: str, style: str, h: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Where the object puts ink, at points ``(x, y)`` relative to its centre."""
    parts = silhouette(shape, h)
    inside = _union(parts, x, y)
    if style == "solid":
        return inside
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; known: {', '.join(STYLES)}")
    band = inside & ~_union(tuple(p.inset(OUTLINE * h) for p in parts), x, y)
    if style == "outlined":
        return band
    return band | (inside & (np.floor(y / STRIPE + 0.5) % 2 == 0))


def coverage(shape: str, style: str, h: float, cx: float, cy: float, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Anti-aliased coverage of one object: (``[rows, cols]`` float32 in [0, 1], (top, left) of that box in the
    ``size x size`` image). The box is the object's pixel bounding box clipped to the image."""
    top, left = max(0, math.floor(cy - h) - 1), max(0, math.floor(cx - h) - 1)
    bottom, right = min(size, math.ceil(cy + h) + 1), min(size, math.ceil(cx + h) + 1)
    sub = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    rows = (np.arange(top, bottom)[:, None] + sub[None, :]).reshape(-1)
    cols = (np.arange(left, right)[:, None] + sub[None, :]).reshape(-1)
    y, x = rows[:, None] - cy, cols[None, :] - cx
    mask = ink_mask(shape, style, h, x, y)
    cover = mask.reshape(bottom - top, SUPERSAMPLE, right - left, SUPERSAMPLE).mean(axis=(1, 3))
    return cover.astype(np.float32), (top, left)
