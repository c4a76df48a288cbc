"""FLUX.1 dev / schnell (``FluxPipeline``): CLIP-L pooled + T5-XXL, an MM-DiT with single-stream blocks.

Conditioning (as the pipeline builds it): T5's last hidden state (512 tokens for dev, 256 for schnell, the lengths
the models were trained with) is the token sequence; CLIP-L's pooled output (768) is the pooled vector. The text
tokens' position ids are zeros. FLUX.1 dev is guidance-distilled: the guidance scale (default 3.5) is an *input* of
the transformer (``guidance``), and sampling runs one branch; schnell has no guidance input (4 steps). True
classifier-free guidance with a negative branch (diffusers' ``true_cfg_scale``) is the sampler's ``guidance`` here:
1 (the default) runs no negative branch; guards that steer the negative branch need guidance > 1.

Latent layout: latents are [B, 16, H/8, W/8] everywhere in safediff (initial noise, scheduler, decoding, attacks);
the transformer reads them packed as 2x2 patches, [B, (H/16)(W/16), 64], with image position ids (row, column): the
adapter packs at the call and unpacks the output. The Euler step is element-wise, so stepping unpacked latents is the
same computation as the pipeline's. Timesteps: σ from 1 to 1/steps, shifted by μ, which grows with the number of
image tokens; the transformer reads t / 1000.

Single-stream blocks (``single_transformer_blocks``): after the double-stream blocks, text and image tokens are
concatenated and share every projection (``attn.to_q/to_k/to_v``, the MLP); no layer there reads text alone.
"""

from __future__ import annotations

import numpy as np
import torch

from safediff.adapters.base import DenoiserCall
from safediff.adapters.conditioning import Conditioning, Segment, substituted_token_embeddings
from safediff.adapters.flow import FlowAdapter, calculate_shift

DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline's default latent side (1024 px at the VAE's factor 8)


def pack(x: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h/2)(w/2), 4C]: 2x2 patches, row-major, channels (c, dy, dx)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of ``pack`` for latents of h x w."""
    b, _, c4 = x.shape
    return x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """[(h/2)(w/2), 3] position ids of the packed image tokens: (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxAdapter(FlowAdapter):
    arch = "flux"
    t5_index = 1
    pooled_encoders = (0,)
    encoder_names = ("clip_l", "t5")
    cfg_by_default = False

    @property
    def distilled(self) -> bool:
        """Guidance-distilled (dev): the transformer reads an embedded guidance scale."""
        return bool(self.pipe.transformer.config.guidance_embeds)

    @property
    def default_max_sequence_length(self) -> int:
        return 512 if self.distilled else 256

    @property
    def tokenizers(self) -> list:
        return [self.pipe.tokenizer, self.pipe.tokenizer_2]

    @property
    def text_encoders(self) -> list:
        return [self.pipe.text_encoder, self.pipe.text_encoder_2]

    @property
    def segments(self) -> list[Segment]:
        return [Segment((1,), 0, self.t5_length)]

    def encode_token_embeddings(self, input_ids: list[torch.Tensor], token_embeds: list) -> Conditioning:
        clip = self.text_encoders[0]
        if token_embeds[0] is None:
            pooled = clip(input_ids[0].to(clip.device), output_hidden_states=False).pooler_output
        else:
            with substituted_token_embeddings(clip, token_embeds[0]):
                pooled = clip(input_ids[0].to(clip.device), output_hidden_states=False).pooler_output
        return Conditioning(self._to_denoiser(self._t5(input_ids[1], token_embeds[1])), self._to_denoiser(pooled))

    def denoiser_call(self, x, t, cond, guidance=None) -> DenoiserCall:
        b, _, h, w = x.shape
        t = t.reshape(-1).expand(b) if t.numel() == 1 else t
        kwargs = {"encoder_hidden_states": cond.embeds, "pooled_projections": cond.pooled,
                  "timestep": t.to(x.dtype) / 1000,
                  "img_ids": image_ids(h, w, x.device, cond.embeds.dtype),
                  "txt_ids": torch.zeros(cond.embeds.shape[1], 3, device=x.device, dtype=cond.embeds.dtype),
                  "guidance": None, "return_dict": False}
        if self.distilled:
            if guidance is None:
                raise ValueError("FLUX.1 dev reads an embedded guidance scale; none was given")
            kwargs["guidance"] = torch.full([1], guidance, device=x.device, dtype=torch.float32).expand(b)
        return DenoiserCall(self.pipe.transformer, (pack(x),), kwargs, output=lambda out: unpack(out, h, w))

    def default_settings(self) -> dict:
        size = DEFAULT_SAMPLE_SIZE * self.pipe.vae_scale_factor
        settings = {"steps": 28 if self.distilled else 4, "guidance": 1.0, "height": size, "width": size}
        if self.distilled:
            settings["embedded_guidance"] = 3.5
        return settings

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.pipe.vae_scale_factor
        return self.pipe.transformer.config.in_channels // 4, 2 * (height // (f * 2)), 2 * (width // (f * 2))

    def set_timesteps(self, scheduler, steps: int, height: int, width: int, device=None) -> None:
        """σ linear from 1 to 1/steps (unless the scheduler makes its own flow sigmas), shifted by μ(image tokens)."""
        sigmas = None if scheduler.config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / steps, steps)
        mu = calculate_shift(self.image_tokens(height, width), scheduler.config)
        if sigmas is None:
            scheduler.set_timesteps(steps, device=device, mu=mu)
        else:
            scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
