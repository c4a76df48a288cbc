"""UNet adapters: SD 1.x/2.x (one CLIP encoder) and SDXL (two), DDPM-family schedules.

SD 1.x/2.x: one CLIP encoder's last hidden state is the conditioning; SDXL: two encoders' penultimate hidden states
concatenated, the pooled embedding of the second, and the size time ids. Text is read by the cross-attention
key/value projections (``attn2.to_k`` / ``attn2.to_v``), which see the encoder output itself. Latents are
``[B, 4, H/8, W/8]``; the schedule is the DDPM one (ε- or v-prediction, x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε), with any of the
diffusers schedulers in ``SCHEDULERS``.
"""

from __future__ import annotations

import torch

from safediff.adapters.base import Adapter, DenoiserCall
from safediff.adapters.conditioning import Conditioning, Segment, substituted_token_embeddings

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "ddpm": "DDPMScheduler",
}


class SD1Adapter(Adapter):
    """SD 1.x: one CLIP text encoder, its last hidden state is the conditioning."""

    arch = "sd1"
    schedulers = SCHEDULERS
    trajectory_scheduler = "ddim"
    skip_features = True

    @property
    def tokenizers(self) -> list:
        return [self.pipe.tokenizer]

    @property
    def text_encoders(self) -> list:
        return [self.pipe.text_encoder]

    @property
    def segments(self) -> list[Segment]:
        return [Segment(tuple(range(len(self.tokenizers))), 0, self.window(0))]

    @property
    def text_dim(self) -> int:
        return self.pipe.unet.config.cross_attention_dim

    def encode_ids(self, input_ids: list[torch.Tensor]) -> Conditioning:
        te = self.text_encoders[0]
        return Conditioning(self._to_denoiser(te(input_ids[0].to(te.device))[0]))

    def encode_token_embeddings(self, input_ids: list[torch.Tensor], token_embeds: list[torch.Tensor]) -> Conditioning:
        te = self.text_encoders[0]
        with substituted_token_embeddings(te, token_embeds[0]):
            return Conditioning(self._to_denoiser(te(input_ids[0].to(te.device))[0]))

    # -- the denoiser ---------------------------------------------------------------------------------------------
    def unet_kwargs(self, cond: Conditioning, height: int, width: int) -> dict:
        return {}

    def denoiser_call(self, x, t, cond, guidance=None) -> DenoiserCall:
        f = self.pipe.vae_scale_factor
        kwargs = {"encoder_hidden_states": cond.embeds, "return_dict": False,
                  **self.unet_kwargs(cond, x.shape[-2] * f, x.shape[-1] * f)}
        if t.numel() == 1:
            t = t.reshape(())  # the UNet broadcasts a scalar timestep over the batch
        return DenoiserCall(self.pipe.unet, (x, t), kwargs)

    def use_sdpa_attention(self) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.pipe.unet.set_attn_processor(AttnProcessor2_0())

    def default_settings(self) -> dict:
        size = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        return {"steps": 50, "guidance": 7.5, "height": size, "width": size}

    def text_kv(self) -> list[tuple[str, torch.nn.Linear]]:
        """The cross-attention key/value projections that read text (``attn2.to_k`` / ``attn2.to_v``)."""
        return [(n, m) for n, m in self.pipe.unet.named_modules()
                if n.endswith(("attn2.to_k", "attn2.to_v")) and isinstance(m, torch.nn.Linear)]

    def text_readers(self) -> dict[str, list[tuple[str, torch.nn.Linear]]]:
        return {"tokens": self.text_kv()}

    # -- latents and the DDPM schedule ----------------------------------------------------------------------------
    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.pipe.vae_scale_factor
        return self.pipe.unet.config.in_channels, height // f, width // f

    def set_timesteps(self, scheduler, steps: int, height: int, width: int, device=None) -> None:
        scheduler.set_timesteps(steps, device=device)

    def initial_latents(self, scheduler, noise: torch.Tensor) -> torch.Tensor:
        return noise * scheduler.init_noise_sigma

    def model_input(self, scheduler, latents: torch.Tensor, t) -> torch.Tensor:
        return scheduler.scale_model_input(latents, t)

    def _latent_stats(self, like: torch.Tensor):
        cfg = self.pipe.vae.config
        if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
            return (torch.tensor(cfg.latents_mean).view(1, -1, 1, 1).to(like),
                    torch.tensor(cfg.latents_std).view(1, -1, 1, 1).to(like))
        return None

    def to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        stats = self._latent_stats(latents)
        if stats is not None:
            return latents * stats[1] / self.pipe.vae.config.scaling_factor + stats[0]
        return latents / self.pipe.vae.config.scaling_factor

    def from_vae(self, z: torch.Tensor) -> torch.Tensor:
        stats = self._latent_stats(z)
        if stats is not None:
            return (z - stats[0]) * self.pipe.vae.config.scaling_factor / stats[1]
        return z * self.pipe.vae.config.scaling_factor

    def _alpha_bar(self, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.pipe.scheduler.alphas_cumprod.to(x0.device)
        return a[t.long().cpu()].view(-1, 1, 1, 1).to(x0.dtype)

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε."""
        a = self._alpha_bar(x0, t)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ε, or v = √ᾱ_t ε − √(1−ᾱ_t) x₀ for v-prediction models (SD 2.x 768)."""
        if self.pipe.scheduler.config.get("prediction_type", "epsilon") == "v_prediction":
            a = self._alpha_bar(x0, t)
            return a.sqrt() * noise - (1 - a).sqrt() * x0
        return noise


class SD2Adapter(SD1Adapter):
    """SD 2.x: as SD 1.x, with an OpenCLIP-H encoder (1024-d) and often v-prediction (read from the scheduler)."""

    arch = "sd2"


class SDXLAdapter(SD1Adapter):
    """SDXL: two encoders' penultimate hidden states concatenated; pooled embedding of the second; size time ids."""

    arch = "sdxl"
    encoder_names = ("clip_l", "clip_g")
    pooled_encoders = (1,)

    @property
    def tokenizers(self) -> list:
        return [self.pipe.tokenizer, self.pipe.tokenizer_2]

    @property
    def text_encoders(self) -> list:
        return [self.pipe.text_encoder, self.pipe.text_encoder_2]

    def _conditioning(self, outputs: list) -> Conditioning:
        """Both encoders' penultimate hidden states concatenated; the pooled text_embeds of the projecting one."""
        pooled = next(out[0] for out in outputs if out[0].ndim == 2)  # CLIPTextModelWithProjection: text_embeds
        embeds = torch.cat([out.hidden_states[-2] for out in outputs], dim=-1)
        return Conditioning(self._to_denoiser(embeds), self._to_denoiser(pooled))

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
