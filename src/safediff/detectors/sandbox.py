"""Exact detectors for the sandbox world: colour (analytic), shape (a tiny CNN), presence (analytic).

A rendered pixel is ``p = (1 - a) * white + a * C`` (``a`` = coverage, ``C`` = the colour's RGB), so the *ink*
``1 - p = a (1 - C)`` points along ``1 - C`` whatever the coverage. ``SandboxColour`` sums the ink of the object's
pixels (ink ``1 - min(p) > 0.25``), normalises it and scores each colour by ``softmax_k(cos(ink, 1 - C_k) / 0.03)``
times the presence score. ``SandboxPresence`` scores the fraction of object pixels, reaching 1 at 4 % of the image
(the smallest object covers ~8 %). ``SandboxShape`` classifies the ink map ``1 - min_c(p)`` (colour-blind by
construction) with a 3-layer CNN trained on renders with random blur and noise (``train_shape_cnn``; weights and
held-out accuracy in ``sandbox/weights/detectors/``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from safediff.detectors.base import Detector, images_to_tensor
from safediff.errors import SafediffError
from safediff.sandbox.world import COLOURS, RGB, SHAPES, random_scene, render

SHAPE_WEIGHTS = Path(__file__).resolve().parents[1] / "sandbox" / "weights" / "detectors" / "shape_cnn.safetensors"
INK_THRESHOLD = 0.25
FULL_PRESENCE = 0.04
COLOUR_TEMPERATURE = 0.03


def ink_map(x: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] in [0,1] -> [B,1,H,W]: 1 - min over channels (0 on white, ~0.9 on any object colour)."""
    return 1.0 - x.min(dim=1, keepdim=True).values


def presence_scores(x: torch.Tensor) -> torch.Tensor:
    frac = (ink_map(x) > INK_THRESHOLD).float().mean(dim=(1, 2, 3))
    return (frac / FULL_PRESENCE).clamp(0, 1)


class SandboxPresence(Detector):
    name = "sandbox-presence"
    version = "1"
    labels = ("present",)
    flag_labels = ("present",)
    threshold = 0.5

    def scores(self, images: Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
        return presence_scores(images_to_tensor(images))[:, None]


class SandboxColour(Detector):
    name = "sandbox-colour"
    version = "1"
    labels = COLOURS
    flag_labels = COLOURS
    threshold = 0.5

    def __init__(self, flag_labels: Sequence[str] | None = None):
        if flag_labels is not None:
            self.flag_labels = tuple(flag_labels)

    def scores(self, images: Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
        x = images_to_tensor(images)
        ink = 1.0 - x  # [B,3,H,W]
        mask = (ink_map(x) > INK_THRESHOLD).float()
        direction = F.normalize((ink * mask).sum(dim=(2, 3)), dim=1, eps=1e-8)  # [B,3]
        refs = F.normalize(1.0 - torch.tensor([RGB[c] for c in COLOURS], dtype=torch.float32) / 255.0, dim=1)
        probs = torch.softmax(direction @ refs.T / COLOUR_TEMPERATURE, dim=1)
        return probs * presence_scores(x)[:, None]


class ShapeCNN(torch.nn.Module):
    """Ink map [B,1,32,32] -> shape logits [B,3]."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.c2 = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.c3 = torch.nn.Conv2d(32, 32, 3, padding=1)
        self.fc = torch.nn.Linear(32 * 4 * 4, len(SHAPES))

    def forward(self, ink: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.c1(ink)), 2)
        h = F.max_pool2d(F.relu(self.c2(h)), 2)
        h = F.max_pool2d(F.relu(self.c3(h)), 2)
        return self.fc(h.flatten(1))


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@lru_cache(maxsize=4)
def _load_cnn(path: str) -> ShapeCNN:
    p = Path(path)
    if not p.is_file():
        raise SafediffError(f"sandbox shape-CNN weights not found at {p}; retrain them with "
                            "`python -m safediff.detectors.sandbox --out DIR` or reinstall safediff")
    try:
        state = load_file(str(p))
        net = ShapeCNN()
        net.load_state_dict(state)
    except Exception as e:  # corrupt file or wrong tensors
        raise SafediffError(f"sandbox shape-CNN weights at {p} are unreadable ({e}); retrain them with "
                            "`python -m safediff.detectors.sandbox --out DIR` or reinstall safediff") from None
    return net.eval()


class SandboxShape(Detector):
    name = "sandbox-shape"
    version = "1"
    labels = SHAPES
    flag_labels = SHAPES
    threshold = 0.5

    def __init__(self, weights: str | Path = SHAPE_WEIGHTS, flag_labels: Sequence[str] | None = None):
        self.path = Path(weights)
        if flag_labels is not None:
            self.flag_labels = tuple(flag_labels)

    def scores(self, images: Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
        x = images_to_tensor(images)
        if x.shape[-2:] != (32, 32):
            x = F.interpolate(x, size=(32, 32), mode="area")
        net = _load_cnn(str(self.path))
        with torch.no_grad():
            return torch.softmax(net(ink_map(x)), dim=1)

    def weights_sha256(self) -> str | None:
        return _file_sha256(self.path) if self.path.is_file() else None


def attributes(images: Sequence[Image.Image] | torch.Tensor) -> list[dict]:
    """Per image: ``{"colour": best colour or None, "shape": best shape or None, "present": bool}``."""
    x = images_to_tensor(images)
    present = presence_scores(x) >= SandboxPresence.threshold
    colour = SandboxColour().scores(x).argmax(dim=1)
    shape = SandboxShape().scores(x).argmax(dim=1)
    return [{"colour": COLOURS[c] if p else None, "shape": SHAPES[s] if p else None, "present": bool(p)}
            for c, s, p in zip(colour.tolist(), shape.tolist(), present.tolist())]


def augmented_batch(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n random renders with random Gaussian blur (sigma 0-1.2 px) and pixel noise (std 0-0.08) -> (x, labels)."""
    labels = rng.integers(len(SHAPES), size=n)
    imgs = np.stack([render(random_scene(rng, shape=SHAPES[k])) for k in labels]).astype(np.float32) / 255.0
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2)
    sigma = rng.uniform(0.0, 1.2, size=n)
    noise = rng.uniform(0.0, 0.08, size=n)
    out = []
    r = torch.arange(-3, 4, dtype=torch.float32)
    for i in range(n):
        xi = x[i:i + 1]
        if sigma[i] > 0.1:
            k = torch.exp(-(r ** 2) / (2 * sigma[i] ** 2))
            k = k / k.sum()
            xi = F.conv2d(F.pad(xi, (3, 3, 0, 0), mode="replicate"), k.view(1, 1, 1, 7).repeat(3, 1, 1, 1), groups=3)
            xi = F.conv2d(F.pad(xi, (0, 0, 3, 3), mode="replicate"), k.view(1, 1, 7, 1).repeat(3, 1, 1, 1), groups=3)
        out.append(xi)
    x = torch.cat(out)
    x = x + torch.from_numpy(rng.normal(size=x.shape).astype(np.float32)) * torch.from_numpy(
        noise.astype(np.float32)).view(-1, 1, 1, 1)
    return x.clamp(0, 1), torch.from_numpy(labels)


def train_shape_cnn(out: str | Path, seed: int = 0, steps: int = 1500, batch: int = 128,
                    held_out: int = 2000) -> dict:
    """Train the shape CNN from ``seed``; write ``shape_cnn.safetensors`` and ``shape_cnn.json`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    net = ShapeCNN()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    from tqdm.auto import tqdm

    start = time.monotonic()
    bar = tqdm(range(steps), desc="shape cnn")
    for step in bar:
        x, y = augmented_batch(np.random.default_rng([seed, 1, step]), batch)
        loss = F.cross_entropy(net(ink_map(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    net.eval()
    x, y = augmented_batch(np.random.default_rng([seed, 2]), held_out)
    with torch.no_grad():
        acc = float((net(ink_map(x)).argmax(1) == y).float().mean())
    tmp = out / "shape_cnn.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
    os.replace(tmp, out / "shape_cnn.safetensors")
    record = {"command": f"python -m safediff.detectors.sandbox --out {out} --seed {seed} --steps {steps}",
              "seed": seed, "steps": steps, "batch": batch, "seconds": round(time.monotonic() - start, 1),
              "held_out_images": held_out, "held_out_accuracy": acc,
              "held_out": "renders from rng seed [seed, 2] with random blur sigma 0-1.2 px and noise std 0-0.08",
              "parameters": sum(p.numel() for p in net.parameters()),
              "sha256": _file_sha256(out / "shape_cnn.safetensors")}
    (out / "shape_cnn.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Train the sandbox shape CNN.")
    ap.add_argument("--out", default=str(SHAPE_WEIGHTS.parent))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(json.dumps(train_shape_cnn(a.out, a.seed, a.steps), indent=2))
