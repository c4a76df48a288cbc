"""Sandbox images -> objects: the ink map, its connected components, and what is measured on each.

Images of any size are first resized to the world's 64x64 (bilinear, antialiased). A pixel ``p`` of an object of
colour ``C`` with coverage ``a`` is ``(1 - a) * white + a * C``; its *ink map* ``1 - min_c p`` is 0 on white and
``a * (1 - min_c C)`` on the object (0.5 to 1 at full coverage, whatever the colour). Object pixels are those whose ink
exceeds ``INK_THRESHOLD``, outside the mark's corner (``geometry.MARK_ZONE``, where no object is ever drawn).

Object pixels are grouped into 8-connected components after a one-pixel dilation (so a gap of up to two pixels, e.g.
in a blurred outline, does not split an object; two objects of a scene are at least four pixels apart). Components
under ``MIN_AREA`` pixels (noise specks; the smallest rendered object has 82) are dropped. Each remaining ``Blob``
records its pixels, area, bounding box, summed ink vector ``sum (1 - p)`` (whose direction is the colour's ink
direction ``1 - C``) and ink-weighted centroid (over its pixels dilated by one, so anti-aliased edges count).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from safediff.detectors.base import images_to_tensor
from safediff.sandbox.geometry import MARK_ZONE
from safediff.sandbox.world import IMAGE_SIZE

INK_THRESHOLD = 0.25
MIN_AREA = 12
CROP = 40  # side of the window the shape/style CNN reads, centred on an object (the largest object spans 36 px)


@dataclass(frozen=True)
class Blob:
    pixels: torch.Tensor  # [H, W] bool: the object's pixels
    area: int
    x: float  # ink-weighted centroid, in pixels (0 = left edge of the image)
    y: float
    box: tuple[int, int, int, int]  # top, left, bottom, right (exclusive)
    ink: torch.Tensor  # [3]: summed ink 1 - p over the object's pixels


def prepare(images: Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
    """PIL images or a [B,3,H,W] tensor in [0,1] -> float32 [B,3,64,64] in [0,1]."""
    x = images_to_tensor(images)
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0, 1)


def ink_map(x: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] in [0,1] -> [B,1,H,W]: 1 - min over channels."""
    return 1.0 - x.min(dim=1, keepdim=True).values


def object_mask(x: torch.Tensor) -> torch.Tensor:
    """[B,3,64,64] -> [B,64,64] bool: pixels with ink above the threshold, outside the mark's corner."""
    mask = ink_map(x)[:, 0] > INK_THRESHOLD
    mask[:, MARK_ZONE:, MARK_ZONE:] = False
    return mask


def _dilate(mask: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(mask.float().unsqueeze(1), 3, stride=1, padding=1)[:, 0] > 0


def label(mask: torch.Tensor) -> torch.Tensor:
    """[B,H,W] bool -> [B,H,W] int64: 0 off the mask, one id per 8-connected component of the dilated mask (the
    largest pixel index in it plus one), restricted to the mask's pixels."""
    grown = _dilate(mask)
    b, h, w = mask.shape
    ids = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, h, w).expand(b, h, w)
    lab = torch.where(grown, ids, torch.zeros(()))
    while True:  # spread the largest id through each component; ends after its geodesic diameter
        nxt = F.max_pool2d(lab.unsqueeze(1), 3, stride=1, padding=1)[:, 0] * grown
        if torch.equal(nxt, lab):
            break
        lab = nxt
    return (lab * mask).long()


def blobs(x: torch.Tensor) -> list[list[Blob]]:
    """[B,3,64,64] in [0,1] -> per image, its objects ordered left to right."""
    ink = 1.0 - x
    weight = ink_map(x)[:, 0]
    labels = label(object_mask(x))
    centres = torch.arange(IMAGE_SIZE, dtype=torch.float32) + 0.5  # of the pixel rows and columns
    out: list[list[Blob]] = []
    for i in range(x.shape[0]):
        found = []
        for lab in labels[i].unique().tolist():
            if lab == 0:
                continue
            pixels = labels[i] == lab
            area = int(pixels.sum())
            if area < MIN_AREA:
                continue
            w = weight[i] * _dilate(pixels[None])[0]
            total = float(w.sum())
            rows_any, cols_any = pixels.any(dim=1).nonzero()[:, 0], pixels.any(dim=0).nonzero()[:, 0]
            found.append(Blob(
                pixels=pixels, area=area,
                x=float((w.sum(dim=0) * centres).sum()) / total, y=float((w.sum(dim=1) * centres).sum()) / total,
                box=(int(rows_any[0]), int(cols_any[0]), int(rows_any[-1]) + 1, int(cols_any[-1]) + 1),
                ink=(ink[i] * pixels).sum(dim=(1, 2))))
        out.append(sorted(found, key=lambda blob: blob.x))
    return out


def crop(x_ink: torch.Tensor, blob: Blob) -> torch.Tensor:
    """One object's ink map ([H,W], the image's) -> [CROP, CROP]: the object alone (its pixels dilated by one, so
    anti-aliased edges stay and any other object goes), scaled so its ink reaches 1, centred on its bounding box."""
    ink = x_ink * _dilate(blob.pixels[None])[0]
    ink = ink / torch.quantile(x_ink[blob.pixels], 0.9).clamp(min=1e-3)
    top, left, bottom, right = blob.box
    r0, c0 = (top + bottom) // 2 - CROP // 2, (left + right) // 2 - CROP // 2
    padded = F.pad(ink, (CROP, CROP, CROP, CROP))
    return padded[r0 + CROP:r0 + 2 * CROP, c0 + CROP:c0 + 2 * CROP].clamp(0, 1)
