"""Per-architecture adapters: how prompts become conditioning and which projections read text.

An *adapter* knows, for one architecture, how prompts become conditioning (SD 1.x/2.x: one CLIP encoder's last hidden
state; SDXL: two encoders' penultimate hidden states concatenated, the pooled embedding and the time ids), which
cross-attention projections read text, and what extra inputs the denoiser takes. Guards, erasers and attacks use the
adapter, never architecture ``if``s; the one denoiser call is ``safediff.sampling.denoiser_output``.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from safediff.errors import SafediffError

logger = logging.getLogger("safediff")


@contextlib.contextmanager
def substituted_token_embeddings(text_encoder, embeds: torch.Tensor):
    """While active, the encoder's token-embedding layer returns ``embeds`` [B, L, D] instead of looking ids up.

    A temporary forward hook on ``get_input_embeddings()`` (``embeddings.token_embedding``); gradients flow into
    ``embeds``; position embeddings, the causal mask and EOS pooling (read from the real ``input_ids``) are untouched.
    """
    layer = text_encoder.get_input_embeddings()

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


@dataclass
class Conditioning:
    """Text conditioning of a batch: what the UNet's cross-attention (and SDXL's added embedding) reads."""

    embeds: torch.Tensor  # [B, L, D]
    pooled: torch.Tensor | None = None  # [B, P] (SDXL's text_embeds), else None

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


class Adapter:
    """SD 1.x: one CLIP text encoder, its last hidden state is the conditioning."""

    arch = "sd1"

    def __init__(self, pipe):
        self.pipe = pipe

    @property
    def tokenizers(self) -> list:
        return [self.pipe.tokenizer]

    @property
    def text_encoders(self) -> list:
        return [self.pipe.text_encoder]

    @property
    def max_length(self) -> int:
        return self.tokenizers[0].model_max_length

    def tokenize(self, prompts: list[str], tokenizer=None) -> torch.Tensor:
        """Token ids [B, max_length] (BOS ... EOS pad); warns once naming how many tokens a long prompt loses."""
        tok = tokenizer or self.tokenizers[0]
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        lengths = [len(x) for x in tok(prompts, truncation=False).input_ids]
        dropped = [n - tok.model_max_length for n in lengths if n > tok.model_max_length]
        if dropped:
            logger.warning("%d prompt(s) longer than the text encoder's %d-token window were truncated "
                           "(%s token(s) dropped)", len(dropped), tok.model_max_length, ", ".join(map(str, dropped)))
        return ids

    def encode(self, prompts: list[str]) -> Conditioning:
        return self.encode_ids([self.tokenize(prompts, tok) for tok in self.tokenizers])

    def eos_positions(self, prompts: list[str]) -> torch.Tensor:
        """Long [B]: each prompt's first end-of-text token in encoder 0's ids (BOS at 0, the prompt's tokens at
        1..eos-1; a tokenizer whose BOS id equals its EOS id never puts EoT first)."""
        tok = self.tokenizers[0]
        is_eos = self.tokenize(prompts, tok) == tok.eos_token_id
        is_eos[:, 0] = False
        if not bool(is_eos.any(dim=1).all()):
            raise SafediffError("a prompt has no end-of-text token (tokenizer without EOS?)")
        return is_eos.int().argmax(dim=1)

    def encode_ids(self, input_ids: list[torch.Tensor]) -> Conditioning:
        """As ``encode``, from prepared token ids: one [B, L] tensor per tokenizer, in ``tokenizers`` order."""
        te = self.text_encoders[0]
        return Conditioning(te(input_ids[0].to(te.device))[0].to(self.pipe.unet.dtype))

    def encode_negative(self, negative: list[str] | None, batch: int) -> Conditioning:
        """The unconditional branch: the negative prompts, or the empty prompt."""
        return self.encode(negative if negative is not None else [""] * batch)

    def unet_kwargs(self, cond: Conditioning, height: int, width: int) -> dict:
        return {}

    def cross_attention_kv(self) -> list[tuple[str, torch.nn.Linear]]:
        """The cross-attention key/value projections that read text (``attn2.to_k`` / ``attn2.to_v``)."""
        return [(n, m) for n, m in self.pipe.unet.named_modules()
                if n.endswith(("attn2.to_k", "attn2.to_v")) and isinstance(m, torch.nn.Linear)]

    @property
    def text_dim(self) -> int:
        return self.pipe.unet.config.cross_attention_dim

    def token_embedding(self, k: int = 0) -> torch.nn.Embedding:
        """Encoder k's vocabulary embedding table (rows = token ids)."""
        return self.text_encoders[k].get_input_embeddings()

    def encode_token_embeddings(self, input_ids: list[torch.Tensor], token_embeds: list[torch.Tensor]) -> Conditioning:
        """As ``encode``, but encoder k's token embeddings are ``token_embeds[k]`` [B, L, D_k] (differentiable, e.g.
        soft or relaxed tokens); ``input_ids[k]`` [B, L] (tokenizer k's ids) still set the EOS pooling position."""
        te = self.text_encoders[0]
        with substituted_token_embeddings(te, token_embeds[0]):
            return Conditioning(te(input_ids[0].to(te.device))[0].to(self.pipe.unet.dtype))


class SD2Adapter(Adapter):
    """SD 2.x: as SD 1.x, with an OpenCLIP-H encoder (1024-d) and often v-prediction (read from the scheduler)."""

    arch = "sd2"


class SDXLAdapter(Adapter):
    """SDXL: two encoders' penultimate hidden states concatenated; pooled embedding of the second; size time ids."""

    arch = "sdxl"

    @property
    def tokenizers(self) -> list:
        return [self.pipe.tokenizer, self.pipe.tokenizer_2]

    @property
    def text_encoders(self) -> list:
        return [self.pipe.text_encoder, self.pipe.text_encoder_2]

    def _conditioning(self, outputs: list) -> Conditioning:
        """Both encoders' penultimate hidden states concatenated; the pooled text_embeds of the projecting one."""
        pooled = next(out[0] for out in outputs if out[0].ndim == 2)  # CLIPTextModelWithProjection: text_embeds
        dtype = self.pipe.unet.dtype
        return Conditioning(torch.cat([out.hidden_states[-2] for out in outputs], dim=-1).to(dtype), pooled.to(dtype))

    def encode_ids(self, input_ids: list[torch.Tensor]) -> Conditioning:
        return self._conditioning([te(ids.to(te.device), output_hidden_states=True)
                                   for ids, te in zip(input_ids, self.text_encoders)])

    def encode_token_embeddings(self, input_ids: list[torch.Tensor], token_embeds: list[torch.Tensor]) -> Conditioning:
        outputs = []
        for ids, embeds, te in zip(input_ids, token_embeds, self.text_encoders):
            with substituted_token_embeddings(te, embeds):
                outputs.append(te(ids.to(te.device), output_hidden_states=True))
        return self._conditioning(outputs)

    def encode_negative(self, negative: list[str] | None, batch: int) -> Conditioning:
        if negative is None and self.pipe.config.get("force_zeros_for_empty_prompt", False):
            probe = self.encode([""])
            return Conditioning(torch.zeros_like(probe.embeds).expand(batch, -1, -1).clone(),
                                torch.zeros_like(probe.pooled).expand(batch, -1).clone())
        return self.encode(negative if negative is not None else [""] * batch)

    def unet_kwargs(self, cond: Conditioning, height: int, width: int) -> dict:
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=cond.embeds.dtype,
                                device=cond.embeds.device).repeat(len(cond), 1)
        return {"added_cond_kwargs": {"text_embeds": cond.pooled, "time_ids": time_ids}}


SUPPORTED = "StableDiffusionPipeline (SD 1.x/2.x, the sandbox) and StableDiffusionXLPipeline (SDXL)"


def adapter_for(pipe) -> Adapter:
    name = type(pipe).__name__
    if name == "StableDiffusionXLPipeline":
        return SDXLAdapter(pipe)
    if name in ("StableDiffusionPipeline", "StableDiffusionPipelineSafe"):
        return SD2Adapter(pipe) if pipe.unet.config.cross_attention_dim == 1024 else Adapter(pipe)
    raise SafediffError(f"unsupported architecture {name}; supported: {SUPPORTED}")
