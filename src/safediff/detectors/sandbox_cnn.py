"""The sandbox's shape and style reader: a small CNN on one object's ink crop, and how it is trained.

Input: ``sandbox_segment.crop``, a 40x40 window of the object's ink map (colour-blind by construction: ``1 - min_c p``,
scaled so the object's ink reaches 1, any other object removed), centred on the object. Output: logits over the 8
shapes and over the 3 styles (two heads on one trunk: three conv stages 16/32/64 channels with 2x2 pooling, then a
64-unit layer; 126 k parameters).

Training (``train``): crops of the objects of scenes from the training distribution (one or two objects, every
colour, shape, style, size and position, the mark sometimes), rendered and degraded as ``sandbox_renders`` says
(blur up to 1.2 px, noise up to 0.08), each step a fresh batch drawn from ``(seed, 1, step)``; Adam 3e-3 with cosine
decay, cross-entropy on both heads. Held-out accuracy is measured on crops from ``(seed, 2)``, a stream no step
draws, and written with the weights' sha256 to ``shape_style_cnn.json`` next to ``shape_style_cnn.safetensors``.

    python -m safediff.detectors.sandbox_cnn --out src/safediff/sandbox/weights/detectors --seed 0 --steps 600
"""

from __future__ import annotations

import json
import os
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from safediff.hashing import file_sha256
from safediff.detectors.sandbox_renders import degraded_batch, match
from safediff.detectors.sandbox_segment import CROP, blobs, crop, ink_map
from safediff.errors import SafediffError
from safediff.sandbox.world import SHAPES, STYLES

WEIGHTS = Path(__file__).resolve().parents[1] / "sandbox" / "weights" / "detectors" / "shape_style_cnn.safetensors"
RETRAIN = "retrain them with `python -m safediff.detectors.sandbox_cnn --out DIR` or reinstall safediff"


class ShapeStyleCNN(torch.nn.Module):
    """Ink crops [N,1,40,40] -> (shape logits [N,8], style logits [N,3])."""

    def __init__(self):
        super().__init__()
        self.convs = torch.nn.ModuleList([torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.Conv2d(16, 32, 3, padding=1),
                                          torch.nn.Conv2d(32, 64, 3, padding=1)])
        self.hidden = torch.nn.Linear(64 * (CROP // 8) ** 2, 64)
        self.shape = torch.nn.Linear(64, len(SHAPES))
        self.style = torch.nn.Linear(64, len(STYLES))

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = crops
        for conv in self.convs:
            h = F.max_pool2d(F.relu(conv(h)), 2)
        h = F.relu(self.hidden(h.flatten(1)))
        return self.shape(h), self.style(h)


@lru_cache(maxsize=4)
def load(path: str) -> ShapeStyleCNN:
    """The network in a weights file (cached); SafediffError if it is missing or unreadable."""
    p = Path(path)
    if not p.is_file():
        raise SafediffError(f"sandbox shape/style CNN weights not found at {p}; {RETRAIN}")
    try:
        net = ShapeStyleCNN()
        net.load_state_dict(load_file(str(p)))
    except Exception as e:  # a corrupt file or other tensors
        raise SafediffError(f"sandbox shape/style CNN weights at {p} are unreadable ({e}); {RETRAIN}") from None
    return net.eval()


def labelled_crops(rng: np.random.Generator, n_scenes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The objects of ``n_scenes`` degraded renders -> (crops [N,1,40,40], shape labels [N], style labels [N]); an
    object the segmentation misses is left out (the validation counts those as errors)."""
    x, scenes = degraded_batch(rng, n_scenes, p_blank=0.0)
    ink = ink_map(x)[:, 0]
    crops, shapes, styles = [], [], []
    for i, (scene, found) in enumerate(zip(scenes, blobs(x))):
        for obj, k in match(scene, [(b.x, b.y) for b in found]):
            if k is not None:
                crops.append(crop(ink[i], found[k]))
                shapes.append(SHAPES.index(obj.shape))
                styles.append(STYLES.index(obj.style))
    return torch.stack(crops)[:, None], torch.tensor(shapes), torch.tensor(styles)


def train(out: str | Path, seed: int = 0, steps: int = 600, scenes: int = 64, held_out: int = 2000) -> dict:
    """Train from ``seed``; write the weights and their record into ``out``; return the record."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    net = ShapeStyleCNN()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    start = time.monotonic()
    for step in range(steps):
        crops, shape, style = labelled_crops(np.random.default_rng([seed, 1, step]), scenes)
        shape_logits, style_logits = net(crops)
        loss = F.cross_entropy(shape_logits, shape) + F.cross_entropy(style_logits, style)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    crops, shape, style = labelled_crops(np.random.default_rng([seed, 2]), held_out)
    with torch.no_grad():
        shape_logits, style_logits = net(crops)
    path = out / WEIGHTS.name
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    record = {
        "command": f"python -m safediff.detectors.sandbox_cnn --out {out} --seed {seed} --steps {steps}",
        "seed": seed, "steps": steps, "scenes_per_step": scenes, "seconds": round(time.monotonic() - start, 1),
        "held_out_scenes": held_out, "held_out_objects": len(shape),
        "held_out_accuracy": {"shape": float((shape_logits.argmax(1) == shape).float().mean()),
                              "style": float((style_logits.argmax(1) == style).float().mean())},
        "held_out": "objects of scenes drawn from rng [seed, 2], blur sigma 0-1.2 px, noise std 0-0.08",
        "parameters": sum(p.numel() for p in net.parameters()),
        "sha256": file_sha256(path),
    }
    (out / WEIGHTS.with_suffix(".json").name).write_text(json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Train the sandbox shape/style CNN.")
    ap.add_argument("--out", default=str(WEIGHTS.parent))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(json.dumps(train(a.out, a.seed, a.steps), indent=2))
