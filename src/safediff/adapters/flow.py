"""What the rectified-flow transformers (SD3/SD3.5, FLUX.1) share: the flow-matching schedule and the MM-DiT roles.

Flow matching (Lipman et al., ICLR 2023; Esser et al., "Scaling Rectified Flow Transformers for High-Resolution Image
Synthesis", ICML 2024, the SD3 paper): x_σ = (1 − σ) x₀ + σ ε with σ = t / 1000 ∈ [0, 1]; the denoiser predicts the
velocity v = dx_σ/dσ = ε − x₀ (the training target of attacks and trainers, where SD's is ε); the sampler is the
Euler method on σ (diffusers' ``FlowMatchEulerDiscreteScheduler``): no input scaling, initial latents = ε. The VAE's
latents are shifted and scaled: z_denoiser = (z_vae − shift) · scale.

MM-DiT (the SD3 paper): text tokens and image tokens are two streams with their own weights that meet in a *joint*
attention in every block (each stream's Q, K, V computed by its own projections, attention over the concatenated
sequence). The encoder outputs are read directly only by ``context_embedder`` (the token sequence) and
``time_text_embed.text_embedder`` (the pooled vector, which modulates every block with the timestep). The context
key/value projections ``attn.add_k_proj`` / ``attn.add_v_proj`` of block k read the *text stream* after k blocks
(normalised and modulated by the timestep), which has already attended to the image: it is not the encoder output.

Memory options (``safediff.models.load_pipeline``): ``dtype=torch.bfloat16``, text encoders on another device
(``text_encoder_device="cpu"``: encodings are moved to the denoiser), and ``cache_text``: encodings of identical
token batches (the empty negative prompt, a guard's concept texts) are computed once per weights version.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from safediff.adapters.base import Adapter
from safediff.adapters.conditioning import Conditioning, substituted_token_embeddings

CACHE_SIZE = 64  # text batches kept by ``cache_text``


def calculate_shift(image_seq_len: int, config) -> float:
    """The resolution-dependent shift μ of the flow schedule: linear in the number of image tokens between
    (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift) (FLUX.1; SD3.5 with dynamic shifting)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + (base_shift - m * base_len)


class FlowAdapter(Adapter):
    """Flow-matching schedule, VAE shift/scale, MM-DiT parameter naming (``transformer``)."""

    denoiser_component = "transformer"
    schedulers = {"euler": "FlowMatchEulerDiscreteScheduler"}
    trajectory_scheduler = None
    skip_features = False
    default_max_sequence_length = 256  # T5 tokens (diffusers' pipeline default)

    def __init__(self, pipe, cache_text: bool = False):
        super().__init__(pipe)
        self._cache: OrderedDict | None = OrderedDict() if cache_text else None

    # -- text -----------------------------------------------------------------------------------------------------
    t5_index: int | None = None  # position of the T5 encoder in ``text_encoders`` (None: no T5)

    @property
    def t5_length(self) -> int:
        """T5 tokens read: the pipeline's default sequence length, or the tokenizer's window if shorter."""
        if self.t5_index is None:
            return self.default_max_sequence_length
        return min(self.default_max_sequence_length, self.tokenizers[self.t5_index].model_max_length)

    def window(self, k: int) -> int:
        return self.t5_length if k == self.t5_index else super().window(k)

    @property
    def text_dim(self) -> int:
        return self.pipe.transformer.config.joint_attention_dim

    def encode_ids(self, input_ids: list[torch.Tensor]) -> Conditioning:
        if self._cache is None or torch.is_grad_enabled():
            return self._encode(input_ids)
        versions = sum(p._version for te in self.text_encoders for p in te.parameters())
        key = (tuple(ids.numpy().tobytes() + bytes(str(tuple(ids.shape)), "ascii") for ids in input_ids), versions,
               str(self.denoiser.device), self.denoiser.dtype)
        if key not in self._cache:
            self._cache[key] = self._encode(input_ids)
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]

    def _encode(self, input_ids: list[torch.Tensor]) -> Conditioning:
        return self.encode_token_embeddings(input_ids, [None] * len(input_ids))

    def _t5(self, ids: torch.Tensor, embeds: torch.Tensor | None) -> torch.Tensor:
        te = self.text_encoders[self.t5_index]
        if embeds is None:
            return te(ids.to(te.device))[0]
        with substituted_token_embeddings(te, embeds):
            return te(ids.to(te.device))[0]

    def use_sdpa_attention(self) -> None:
        """Nothing to do: diffusers' joint-attention processors of SD3 and FLUX call SDPA already."""

    # -- the flow-matching schedule -------------------------------------------------------------------------------
    @property
    def size_multiple(self) -> int:
        return self.pipe.vae_scale_factor * 2  # 2x2 latent patches

    def initial_latents(self, scheduler, noise: torch.Tensor) -> torch.Tensor:
        return noise

    def model_input(self, scheduler, latents: torch.Tensor, t) -> torch.Tensor:
        return latents

    def set_timesteps(self, scheduler, steps: int, height: int, width: int, device=None) -> None:
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", False):
            kwargs["mu"] = calculate_shift(self.image_tokens(height, width), scheduler.config)
        scheduler.set_timesteps(steps, device=device, **kwargs)

    def image_tokens(self, height: int, width: int) -> int:
        _, h, w = self.latent_shape(height, width)
        return (h // 2) * (w // 2)

    def to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.pipe.vae.config
        return latents / cfg.scaling_factor + cfg.shift_factor

    def from_vae(self, z: torch.Tensor) -> torch.Tensor:
        cfg = self.pipe.vae.config
        return (z - cfg.shift_factor) * cfg.scaling_factor

    def _sigma(self, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (t.to(x0.device, torch.float32) / self.train_timesteps).view(-1, 1, 1, 1).to(x0.dtype)

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_σ = (1 − σ) x₀ + σ ε, σ = t / 1000."""
        s = self._sigma(x0, t)
        return s * noise + (1.0 - s) * x0

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The velocity v = ε − x₀."""
        return noise - x0

    # -- MM-DiT layers ----------------------------------------------------------------------------------------------
    def text_kv(self) -> list[tuple[str, torch.nn.Linear]]:
        """The context (text-stream) key/value projections of the joint-attention blocks."""
        return [(n, m) for n, m in self.pipe.transformer.named_modules()
                if n.endswith(("attn.add_k_proj", "attn.add_v_proj")) and isinstance(m, torch.nn.Linear)]

    def text_readers(self) -> dict[str, list[tuple[str, torch.nn.Linear]]]:
        t = self.pipe.transformer
        return {"tokens": [("context_embedder", t.context_embedder)],
                "pooled": [("time_text_embed.text_embedder.linear_1", t.time_text_embed.text_embedder.linear_1)]}

    def text_stream_is_encoder_output(self) -> bool:
        return False
