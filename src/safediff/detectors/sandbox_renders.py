"""Degraded sandbox renders with their exact truth: what the sandbox detectors are trained and validated on.

A test scene is a scene of the training distribution (``world.random_scene``: one or two objects, the mark on a
quarter of them) or, with probability ``p_blank``, a blank one (no object, the mark or not). Each rendered image is
blurred with a Gaussian of standard deviation uniform in ``BLUR`` pixels (none below 0.1) and given pixel noise of
standard deviation uniform in ``NOISE``, then clamped to [0, 1]: harder than a faithful VAE reconstruction. Each
object's true position is its coverage-weighted centroid, computed from the exact geometry.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from safediff.sandbox.geometry import coverage
from safediff.sandbox.world import IMAGE_SIZE, P_MARK, Object, Scene, random_scene, render

BLUR = (0.0, 1.2)
NOISE = (0.0, 0.08)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = torch.arange(-3, 4, dtype=torch.float32)
    k = torch.exp(-(r ** 2) / (2 * sigma ** 2))
    k = (k / k.sum()).view(1, 1, 1, 7).repeat(3, 1, 1, 1)
    x = F.conv2d(F.pad(x, (3, 3, 0, 0), mode="replicate"), k, groups=3)
    return F.conv2d(F.pad(x, (0, 0, 3, 3), mode="replicate"), k.transpose(2, 3), groups=3)


def degrade(images: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """uint8 [N,H,W,3] -> float [N,3,H,W] in [0,1], each image blurred and noised by its own random amount."""
    x = torch.from_numpy(images.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    sigma = rng.uniform(*BLUR, size=len(x))
    std = rng.uniform(*NOISE, size=len(x)).astype(np.float32)
    x = torch.cat([_blur(x[i:i + 1], s) if s > 0.1 else x[i:i + 1] for i, s in enumerate(sigma)])
    noise = torch.from_numpy(rng.normal(size=x.shape).astype(np.float32)) * torch.from_numpy(std).view(-1, 1, 1, 1)
    return (x + noise).clamp(0, 1)


def detector_scenes(rng: np.random.Generator, n: int, p_blank: float = 0.1) -> list[Scene]:
    """n scenes: the training distribution, or blank (the mark with its usual share) with probability ``p_blank``."""
    return [Scene((), bool(rng.random() < P_MARK)) if rng.random() < p_blank else random_scene(rng)
            for _ in range(n)]


def degraded_batch(rng: np.random.Generator, n: int, p_blank: float = 0.1) -> tuple[torch.Tensor, list[Scene]]:
    """n test scenes rendered and degraded -> ([n,3,64,64] in [0,1], scenes)."""
    scenes = detector_scenes(rng, n, p_blank)
    return degrade(np.stack([render(s) for s in scenes]), rng), scenes


def true_centroid(o: Object) -> tuple[float, float]:
    """The object's coverage-weighted centroid (x, y) in pixels, from its exact geometry."""
    a, (top, left) = coverage(o.shape, o.style, o.size, o.cx, o.cy, IMAGE_SIZE)
    rows = np.arange(top, top + a.shape[0]) + 0.5
    cols = np.arange(left, left + a.shape[1]) + 0.5
    total = float(a.sum())
    return float((a.sum(axis=0) * cols).sum()) / total, float((a.sum(axis=1) * rows).sum()) / total


def match(scene: Scene, points: list[tuple[float, float]], radius: float = 6.0) -> list[tuple[Object, int | None]]:
    """Pair each object of ``scene`` with the index of the detected centroid (x, y) nearest its true centroid, within
    ``radius`` pixels, each used once; None where none is near."""
    pairs, free = [], list(range(len(points)))
    for o in scene.objects:
        tx, ty = true_centroid(o)
        dist = [((points[k][0] - tx) ** 2 + (points[k][1] - ty) ** 2) ** 0.5 for k in free]
        best = int(np.argmin(dist)) if dist else -1
        pairs.append((o, free.pop(best) if best >= 0 and dist[best] <= radius else None))
    return pairs
