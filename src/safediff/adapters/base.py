"""The adapter contract: everything that differs between architectures, behind one interface.

An adapter knows, for one architecture, (1) how prompts become conditioning (tokenizers, text encoders, which
positions of the sequence each encoder fills: ``segments``), (2) how to call the denoiser once (``denoiser_call``:
the module, its positional and keyword arguments, and how to read its output back in the latent layout), (3) the
latent space and the noise schedule (latent shape, initial noise scale, timesteps, model input scaling, VAE scaling,
the forward process and the training target), and (4) which parameters play which role (``safediff.adapters.roles``:
the projections that read text, the attention of text and image, ...). Generic code (the sampler, guards, erasers,
attacks) reads these and never asks which architecture it runs on; the one denoiser call is
``safediff.sampling.denoiser_output``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from safediff.adapters.conditioning import Conditioning, Segment
from safediff.errors import SafediffError

logger = logging.getLogger("safediff")


@dataclass
class DenoiserCall:
    """One denoiser forward: ``module(*args, **kwargs)[0]``, read back into the latent layout by ``output``."""

    module: torch.nn.Module
    args: tuple
    kwargs: dict
    output: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda out: out)


class Adapter:
    """What every architecture provides; subclasses fill in the architecture-specific parts."""

    arch = ""
    denoiser_component = "unet"  # the pipeline attribute holding the denoiser; edit names start with it
    schedulers: dict[str, str] = {}  # accepted scheduler names -> diffusers class names
    trajectory_scheduler: str | None = None  # what trainers sample x_t with (None: the model's own scheduler)
    skip_features = False  # the denoiser has UNet skip connections (SAFREE's latent re-attention edits them)
    cfg_by_default = True  # sampling with the model's defaults runs a negative branch (classifier-free guidance)

    def __init__(self, pipe):
        self.pipe = pipe

    # -- text ---------------------------------------------------------------------------------------------------
    @property
    def tokenizers(self) -> list:
        raise NotImplementedError

    @property
    def text_encoders(self) -> list:
        raise NotImplementedError

    @property
    def segments(self) -> list[Segment]:
        """Which positions of ``Conditioning.embeds`` each tokenization fills (in sequence order)."""
        raise NotImplementedError

    encoder_names: tuple[str, ...] = ("clip",)  # keys of a learned word's vectors (textual-inversion files)
    pooled_encoders: tuple[int, ...] = ()  # the encoders that make ``Conditioning.pooled`` (none: no pooled vector)

    @property
    def search_segment(self) -> Segment:
        """The tokenization token-slot attacks search over (its encoders share the vocabulary); the other encoders
        read the decoded text of the searched tokens."""
        return self.segments[0]

    @property
    def text_dim(self) -> int:
        """Width D of ``Conditioning.embeds``."""
        raise NotImplementedError

    def window(self, k: int) -> int:
        """Token positions text encoder k reads (its ids are padded or truncated to this length)."""
        return self.tokenizers[k].model_max_length

    @property
    def max_length(self) -> int:
        """Token positions of the first segment (SD 1.x/2.x, SDXL: the whole sequence)."""
        return self.window(self.segments[0].encoders[0])

    def bos_offset(self, k: int) -> int:
        """1 if tokenizer k puts a begin-of-text token first (CLIP), else 0 (T5): the first real token's index."""
        tok = self.tokenizers[k]
        return int(tok.bos_token_id is not None and tok("").input_ids[:1] == [tok.bos_token_id])

    def tokenize(self, prompts: list[str], k: int = 0) -> torch.Tensor:
        """Token ids [B, window(k)] of tokenizer k; warns once naming how many tokens a long prompt loses."""
        tok, length = self.tokenizers[k], self.window(k)
        ids = tok(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
        dropped = [n - length for n in (len(x) for x in tok(prompts, truncation=False).input_ids) if n > length]
        if dropped:
            logger.warning("%d prompt(s) longer than the text encoder's %d-token window were truncated "
                           "(%s token(s) dropped)", len(dropped), length, ", ".join(map(str, dropped)))
        return ids

    def encode(self, prompts: list[str]) -> Conditioning:
        return self.encode_ids([self.tokenize(prompts, k) for k in range(len(self.tokenizers))])

    def encode_ids(self, input_ids: list[torch.Tensor]) -> Conditioning:
        """As ``encode``, from prepared token ids: one [B, window(k)] tensor per tokenizer, in ``tokenizers`` order."""
        raise NotImplementedError

    def encode_token_embeddings(self, input_ids: list[torch.Tensor], token_embeds: list[torch.Tensor]) -> Conditioning:
        """As ``encode``, but encoder k's token embeddings are ``token_embeds[k]`` [B, L_k, D_k] (differentiable, e.g.
        soft or relaxed tokens); ``input_ids[k]`` still set positions that ids decide (EOS pooling)."""
        raise NotImplementedError

    def encode_negative(self, negative: list[str] | None, batch: int) -> Conditioning:
        """The unconditional branch: the negative prompts, or the empty prompt."""
        return self.encode(negative if negative is not None else [""] * batch)

    def eos_positions(self, prompts: list[str], segment: Segment | None = None) -> torch.Tensor:
        """Long [B]: each prompt's first end-of-text token in ``segment`` (default: the first), as a position of
        ``Conditioning.embeds`` (the segment's real tokens sit between its BOS, if any, and this position)."""
        segment = segment or self.segments[0]
        k = segment.encoders[0]
        tok = self.tokenizers[k]
        is_eos = self.tokenize(prompts, k) == tok.eos_token_id
        is_eos[:, :self.bos_offset(k)] = False  # a tokenizer whose BOS id equals its EOS id never puts EoT first
        if not bool(is_eos.any(dim=1).all()):
            raise SafediffError("a prompt has no end-of-text token (tokenizer without EOS?)")
        return segment.start + is_eos.int().argmax(dim=1)

    def token_embedding(self, k: int = 0) -> torch.nn.Embedding:
        """Encoder k's vocabulary embedding table (rows = token ids)."""
        return self.text_encoders[k].get_input_embeddings()

    def _to_denoiser(self, t: torch.Tensor) -> torch.Tensor:
        """Encoder output -> the denoiser's device and dtype (text encoders may live elsewhere, e.g. on the CPU)."""
        d = self.denoiser
        return t.to(device=d.device, dtype=d.dtype)

    # -- the denoiser ---------------------------------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_component)

    def denoiser_call(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                      guidance: float | None = None) -> DenoiserCall:
        """The call that predicts the denoiser output for latents ``x`` [B, C, h, w] at timestep ``t`` (a scalar or
        one per sample, in the scheduler's units) under ``cond``; ``guidance``: a guidance-distilled model's embedded
        guidance (None: the model's default)."""
        raise NotImplementedError

    def use_sdpa_attention(self) -> None:
        """Make the denoiser's attention use PyTorch's fused scaled-dot-product attention."""

    def default_settings(self) -> dict:
        """Sampler defaults of a checkpoint (steps, guidance, height, width; embedded guidance where there is one)."""
        raise NotImplementedError

    def text_kv(self) -> list[tuple[str, torch.nn.Linear]]:
        """The attention key/value projections of the text tokens (denoiser module names)."""
        raise NotImplementedError

    def text_readers(self) -> dict[str, list[tuple[str, torch.nn.Linear]]]:
        """The layers that read the text encoders' outputs directly, by the space they read: ``tokens`` (rows of
        ``Conditioning.embeds``) and, where a layer reads it, ``pooled``."""
        raise NotImplementedError

    def text_stream_is_encoder_output(self) -> bool:
        """Whether every ``text_kv`` projection reads the encoder output itself (UNet cross-attention) rather than a
        text stream transformed block by block (MM-DiT)."""
        return True

    # -- latents and the noise schedule --------------------------------------------------------------------------
    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this many pixels."""
        return 8

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(channels, h, w) of the latents of an image of ``height`` x ``width`` pixels."""
        raise NotImplementedError

    def set_timesteps(self, scheduler, steps: int, height: int, width: int, device=None) -> None:
        raise NotImplementedError

    def initial_latents(self, scheduler, noise: torch.Tensor) -> torch.Tensor:
        """Standard normal noise -> the first latents of the sampling loop."""
        raise NotImplementedError

    def model_input(self, scheduler, latents: torch.Tensor, t) -> torch.Tensor:
        """The latents as the denoiser reads them at timestep ``t``."""
        raise NotImplementedError

    def to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        """Denoiser latents -> what the VAE decoder reads."""
        raise NotImplementedError

    def from_vae(self, z: torch.Tensor) -> torch.Tensor:
        """VAE posterior latents -> denoiser latents (the inverse of ``to_vae``)."""
        raise NotImplementedError

    @property
    def train_timesteps(self) -> int:
        """Timesteps of the training schedule: training-time t is drawn from 0 .. train_timesteps - 1."""
        return int(self.pipe.scheduler.config.num_train_timesteps)

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t of the forward process the denoiser was trained on, at training timesteps ``t`` [B]."""
        raise NotImplementedError

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the denoiser predicts at x_t = ``noised(x0, noise, t)``."""
        raise NotImplementedError
