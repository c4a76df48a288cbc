"""SD3 / SD3.5 (``StableDiffusion3Pipeline``): CLIP-L + CLIP-G + optional T5-XXL, an MM-DiT, flow-matching Euler.

Conditioning (as the pipeline builds it): the two CLIP encoders' penultimate hidden states concatenated along
features (768 + 1280) and zero-padded to T5's width (4096) form a 77-token CLIP segment; T5's last hidden state
(256 tokens; zeros when the pipeline was loaded without T5) follows it along the sequence. The pooled vector is both
CLIPs' projected pooled embeddings concatenated (2048). Classifier-free guidance with the empty prompt (default
scale 7, 28 steps). The denoiser reads latents [B, 16, H/8, W/8] and the scheduler's timestep t ∈ [0, 1000].
Token-slot attacks search T5's vocabulary (when loaded; else CLIP's); the CLIPs read the decoded text.
"""

from __future__ import annotations

import torch

from safediff.adapters.base import DenoiserCall
from safediff.adapters.conditioning import Conditioning, Segment, substituted_token_embeddings
from safediff.adapters.flow import FlowAdapter


class SD3Adapter(FlowAdapter):
    arch = "sd3"
    pooled_encoders = (0, 1)
    encoder_names = ("clip_l", "clip_g", "t5")

    @property
    def t5_index(self) -> int | None:
        return 2 if self.pipe.text_encoder_3 is not None else None

    @property
    def tokenizers(self) -> list:
        return [self.pipe.tokenizer, self.pipe.tokenizer_2] + ([self.pipe.tokenizer_3] if self.t5_index else [])

    @property
    def text_encoders(self) -> list:
        return [self.pipe.text_encoder, self.pipe.text_encoder_2] + ([self.pipe.text_encoder_3]
                                                                      if self.t5_index else [])

    @property
    def segments(self) -> list[Segment]:
        clip = Segment((0, 1), 0, self.window(0))
        return [clip] + ([Segment((2,), clip.length, self.t5_length)] if self.t5_index else [])

    @property
    def search_segment(self) -> Segment:
        return self.segments[-1]

    def encode_token_embeddings(self, input_ids: list[torch.Tensor], token_embeds: list) -> Conditioning:
        hidden, pooled = [], []
        for ids, embeds, te in zip(input_ids[:2], token_embeds[:2], self.text_encoders[:2]):
            if embeds is None:
                out = te(ids.to(te.device), output_hidden_states=True)
            else:
                with substituted_token_embeddings(te, embeds):
                    out = te(ids.to(te.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out[0])  # CLIPTextModelWithProjection: text_embeds
        clip = torch.cat(hidden, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, self.text_dim - clip.shape[-1]))
        if self.t5_index is None:
            t5 = torch.zeros(clip.shape[0], self.t5_length, self.text_dim, dtype=clip.dtype, device=clip.device)
        else:
            t5 = self._t5(input_ids[2], token_embeds[2]).to(clip.device)
        return Conditioning(self._to_denoiser(torch.cat([clip, t5.to(clip.dtype)], dim=1)),
                            self._to_denoiser(torch.cat(pooled, dim=-1)))

    def denoiser_call(self, x, t, cond, guidance=None) -> DenoiserCall:
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        kwargs = {"encoder_hidden_states": cond.embeds, "pooled_projections": cond.pooled, "timestep": t,
                  "return_dict": False}
        return DenoiserCall(self.pipe.transformer, (x,), kwargs)

    def default_settings(self) -> dict:
        size = self.pipe.transformer.config.sample_size * self.pipe.vae_scale_factor
        return {"steps": 28, "guidance": 7.0, "height": size, "width": size}

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.pipe.vae_scale_factor
        return self.pipe.transformer.config.in_channels, height // f, width // f
