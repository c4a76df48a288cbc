"""What text conditioning is, architecture-free: the denoiser's text inputs and where each position came from.

``Conditioning`` is a batch of what the denoiser reads: a token sequence ``embeds`` [B, L, D] (the UNet's
cross-attention input; the MM-DiT's ``encoder_hidden_states``) and an optional pooled vector [B, P] (SDXL's
``text_embeds``; SD3's and FLUX's ``pooled_projections``). A ``Segment`` says which positions of ``embeds`` one
tokenization produced (SD3 concatenates a CLIP segment and a T5 segment along the sequence), so methods that work on
tokens (SAFREE's projections, UCE's rows, token-slot attacks) find each encoder's tokens in the sequence.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Segment:
    """Positions ``start .. start + length`` of ``Conditioning.embeds`` are the outputs of text encoders ``encoders``
    (indices into ``adapter.text_encoders``) reading one tokenization, position for position: the encoders share a
    vocabulary and their features are concatenated (SDXL's two CLIPs) or a single encoder fills them (T5)."""

    encoders: tuple[int, ...]
    start: int
    length: int


@dataclass
class Conditioning:
    """Text conditioning of a batch: what the denoiser reads (see the module docstring)."""

    embeds: torch.Tensor  # [B, L, D]
    pooled: torch.Tensor | None = None  # [B, P], or None

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def __getitem__(self, idx) -> "Conditioning":
        return Conditioning(self.embeds[idx], None if self.pooled is None else self.pooled[idx])

    @staticmethod
    def cat(items: list["Conditioning"]) -> "Conditioning":
        pooled = None if items[0].pooled is None else torch.cat([c.pooled for c in items])
        return Conditioning(torch.cat([c.embeds for c in items]), pooled)

    def where(self, mask: torch.Tensor, other: "Conditioning") -> "Conditioning":
        """Per sample: ``other`` where mask[b] is True, else self."""
        m = mask.view(-1, 1, 1).to(self.embeds.device)
        pooled = None
        if self.pooled is not None:
            pooled = torch.where(mask.view(-1, 1).to(self.pooled.device), other.pooled, self.pooled)
        return Conditioning(torch.where(m, other.embeds, self.embeds), pooled)


def lookup_layer(text_encoder) -> torch.nn.Module:
    """The embedding module the encoder's forward calls on its ids: CLIP's ``get_input_embeddings()``; T5's
    ``encoder.embed_tokens``, a module of its own whose weight is tied to ``get_input_embeddings()`` (``shared``)."""
    layer = getattr(getattr(text_encoder, "encoder", None), "embed_tokens", None)
    return layer if isinstance(layer, torch.nn.Embedding) else text_encoder.get_input_embeddings()


@contextlib.contextmanager
def substituted_token_embeddings(text_encoder, embeds: torch.Tensor):
    """While active, the encoder's token-embedding lookup returns ``embeds`` [B, L, D] instead of looking ids up.

    A temporary forward hook on ``lookup_layer`` (CLIP's ``embeddings.token_embedding``, T5's
    ``encoder.embed_tokens``); gradients flow into ``embeds``; position embeddings, masks and EOS pooling (read from
    the real ``input_ids``) are untouched.
    """
    layer = lookup_layer(text_encoder)

    def hook(module, args, output):
        if output.shape != embeds.shape:
            raise ValueError(f"token embeddings of shape {tuple(embeds.shape)} given for ids embedding to "
                             f"{tuple(output.shape)}")
        return embeds.to(output.dtype)

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
