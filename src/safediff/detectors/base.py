"""Detector contract: images -> per-label scores in [0, 1] and a verdict at a recorded threshold."""

from __future__ import annotations

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
        s = self.scores(images)
        idx = [self.labels.index(label) for label in self.flag_labels]
        return (s[:, idx] >= self.threshold).any(dim=1)

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
