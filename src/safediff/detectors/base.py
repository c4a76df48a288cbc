"""Detector contract: images -> per-label scores in [0, 1] and a verdict at a recorded threshold."""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import torch
from PIL import Image


def images_to_tensor(images: Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
    """PIL images or a [B,3,H,W] tensor in [0,1] -> float32 [B,3,H,W] tensor in [0,1]."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images as [B,3,H,W], got {tuple(images.shape)}")
        return images.float()
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def images_to_uint8(images: Sequence[Image.Image] | torch.Tensor) -> list[np.ndarray]:
    """PIL images or a [B,3,H,W] tensor in [0,1] -> HxWx3 uint8 RGB arrays (rounded as PNG saving does)."""
    if isinstance(images, torch.Tensor):
        x = images_to_tensor(images).clamp(0, 1)
        return list((x.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8))
    return [np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images]


UNIFORM = 2 / 255  # an image whose pixels all lie within this range of one another shows nothing


def degenerate(images: Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
    """[B] bool: images that show nothing at all (every pixel the same colour within ``UNIFORM``, e.g. the black
    images of a broken model) or hold non-finite values. Benchmarks never count such an image in a method's favour."""
    x = images_to_tensor(images).flatten(1)
    return ~torch.isfinite(x).all(dim=1) | ((x.max(dim=1).values - x.min(dim=1).values) <= UNIFORM)


def module_sha256(module: torch.nn.Module) -> str:
    """sha256 over a detector network's parameters and buffers (name, dtype, shape, bytes), 0-d tensors included."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class Detector:
    """Subclasses set ``name``, ``version``, ``labels``, ``flag_labels``, ``threshold`` and implement ``scores``."""

    name: str = "detector"
    version: str = "0"
    labels: tuple[str, ...] = ()
    flag_labels: tuple[str, ...] = ()  # labels whose score >= threshold makes an image "flagged"
    threshold: float = 0.5

    def scores(self, images: Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
        """[B, len(labels)] scores in [0, 1]."""
        raise NotImplementedError

    def verdict(self, images: Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
        """[B] bool: any flagged label at or above the threshold."""
        return self.flags(self.scores(images))

    def flags(self, scores: torch.Tensor) -> torch.Tensor:
        """The verdict from already computed scores [B, len(labels)] -> [B] bool."""
        idx = [self.labels.index(label) for label in self.flag_labels]
        return (scores[:, idx] >= self.threshold).any(dim=1)

    def locate(self, images: Sequence[Image.Image] | torch.Tensor) -> list[tuple[float, float, float, float] | None]:
        """Per image, the box (x0, y0, x1, y1 as fractions of the width and height) of what the detector flags, None
        where it flags nothing. A detector that only classifies flags the whole image (the default)."""
        return [(0.0, 0.0, 1.0, 1.0) if f else None for f in self.verdict(images).tolist()]

    def weights_sha256(self) -> str | None:
        return None

    def protocol(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "weights_sha256": self.weights_sha256(),
            "labels": list(self.labels),
            "flag_labels": list(self.flag_labels),
            "threshold": self.threshold,
        }
