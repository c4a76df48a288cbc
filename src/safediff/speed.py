"""The sampler's fast path: lower precision, channels-last, SDPA attention, and compiled / CUDA-graph denoiser calls.

``optimize(model, ...)`` changes how the denoiser runs, never what it computes (up to floating-point rounding):
- ``dtype``: fp16 / bf16 weights (the VAE decodes in fp32 when its config asks, as diffusers does);
- ``channels_last``: NHWC memory format for the convolutions (helps on GPUs with tensor cores);
- ``sdpa``: PyTorch's fused scaled-dot-product attention processors (diffusers' default on torch ≥ 2; the SD3/FLUX
  transformers' joint-attention processors always use it);
- ``compile``: ``torch.compile`` of the denoiser forward; ``"reduce-overhead"`` also captures CUDA graphs, which pays
  off because small batches are launch-bound. Shapes must then stay static: one batch size per guard.
Off by default; on CPU only ``channels_last`` and ``sdpa`` are worth it.
"""

from __future__ import annotations

import torch

from safediff.errors import SafediffError
from safediff.models import Model

COMPILE_MODES = (None, "default", "reduce-overhead")


def optimize(model: Model, *, dtype: torch.dtype | None = None, channels_last: bool = False, sdpa: bool = True,
             compile: str | None = None) -> Model:
    if compile not in COMPILE_MODES:
        raise SafediffError(f"unknown compile mode '{compile}'; accepted: none, default, reduce-overhead "
                            "(max-autotune is not offered: it did not finish compiling an SD-1.5 UNet in 7 minutes)")
    denoiser = model.denoiser
    if dtype is not None:
        model.pipe.to(dtype=dtype)
    if sdpa:
        model.adapter.use_sdpa_attention()
    if channels_last:
        denoiser.to(memory_format=torch.channels_last)
    if compile is not None:
        denoiser.forward = torch.compile(denoiser.forward, mode=compile, fullgraph=False, dynamic=False)
    return model
