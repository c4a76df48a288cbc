"""Per-architecture adapters (see ``safediff.adapters.base`` for the contract) and the one place that picks one.

- ``unet``: SD 1.x/2.x and SDXL (UNet, DDPM-family schedules); the sandbox is an SD 1.x-format model;
- ``sd3``: SD3 / SD3.5; ``flux``: FLUX.1 dev / schnell (MM-DiT, flow matching; shared parts in ``flow``);
- ``roles``: which parameter plays which part (text K/V, joint attention, ...), by name, for every architecture.
"""

from __future__ import annotations

from safediff.adapters.base import Adapter, DenoiserCall
from safediff.adapters.conditioning import Conditioning, Segment, substituted_token_embeddings
from safediff.errors import SafediffError

SUPPORTED = ("StableDiffusionPipeline (SD 1.x/2.x, the sandbox), StableDiffusionXLPipeline (SDXL), "
             "StableDiffusion3Pipeline (SD3/SD3.5) and FluxPipeline (FLUX.1 dev/schnell)")
PIPELINE_CLASSES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusionPipelineSafe",
                    "StableDiffusion3Pipeline", "FluxPipeline")


def adapter_for(pipe, cache_text: bool = False) -> Adapter:
    """The adapter of a diffusers pipeline; ``cache_text`` (SD3/FLUX) reuses encodings of identical token batches."""
    from safediff.adapters.flux import FluxAdapter
    from safediff.adapters.sd3 import SD3Adapter
    from safediff.adapters.unet import SD1Adapter, SD2Adapter, SDXLAdapter

    name = type(pipe).__name__
    if name == "StableDiffusionXLPipeline":
        return SDXLAdapter(pipe)
    if name in ("StableDiffusionPipeline", "StableDiffusionPipelineSafe"):
        return SD2Adapter(pipe) if pipe.unet.config.cross_attention_dim == 1024 else SD1Adapter(pipe)
    if name == "StableDiffusion3Pipeline":
        return SD3Adapter(pipe, cache_text)
    if name == "FluxPipeline":
        return FluxAdapter(pipe, cache_text)
    raise SafediffError(f"unsupported architecture {name}; supported: {SUPPORTED}")


def require_arch(kind: str, name: str, archs: tuple[str, ...], reason: str, adapter: Adapter) -> None:
    """Refuse, in one line, a method that declares the architectures it runs on (``archs``: ``Adapter.arch`` values;
    empty: every one) when ``adapter`` is not among them; ``reason`` says why and what to use instead."""
    if archs and adapter.arch not in archs:
        raise SafediffError(f"{kind} {name} runs on {'/'.join(archs)} models, not {adapter.arch}: {reason}")


__all__ = ["Adapter", "Conditioning", "DenoiserCall", "PIPELINE_CLASSES", "SUPPORTED", "Segment", "adapter_for",
           "require_arch", "substituted_token_embeddings"]
