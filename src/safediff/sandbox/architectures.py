"""The two sandbox models: what each is made of and how its trained weights become a diffusers pipeline.

``unet`` (the ``sandbox`` model, Stable Diffusion format): a 64x64 image is encoded by a three-level VAE (channels
32/64/64, downsampling factor 4) into a 16x16x4 latent; the UNet has three levels (64/128/128 channels at 16x16, 8x8
and 4x4) with cross- and self-attention at each, so the 4x4 level sees the whole scene at once (which object is left,
which right in a two-object caption); the text encoder is a 4-layer ``CLIPTextModel`` of width 128.

``flux`` (the ``sandbox-flux`` model, FLUX.1 format, ``FluxPipeline``): the *same* VAE (taken from a trained UNet
sandbox and frozen; its latents are shifted and scaled to zero mean and unit variance, FLUX's ``shift_factor`` /
``scaling_factor``), packed in 2x2 patches into 8x8 = 64 image tokens of 16 channels; a ``FluxTransformer2DModel``
with 3 double-stream (MM-DiT) and 6 single-stream blocks, 4 heads of 32 (width 128), 2-D rotary positions (axes 8, 12,
12) and no guidance embedding (undistilled: sampled with true classifier-free guidance); the token sequence is a
T5 encoder's (``T5EncoderModel``, gated-GELU as T5 v1.1, 3 layers of width 128, a Unigram ``T5Tokenizer`` over the
sandbox's words and single characters, 48 tokens) and the pooled vector a CLIP text encoder's (2 layers of width 128,
the sandbox's CLIP tokenizer), as in FLUX.1. Sizes are in each record's ``parameters``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from safediff.sandbox import world
from safediff.sandbox.tokenizer import MAX_LENGTH

ARCHES = ("unet", "flux")
LATENT_SIZE = world.IMAGE_SIZE // 4
T5_LENGTH = 48  # T5 tokens read (the longest world caption is far shorter; free text is spelled by characters)
BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
# the UNet sandbox's training objectives (``--objective``): the noise schedule and the target the scheduler declares
OBJECTIVES = {
    # Stable Diffusion 1.x (Rombach et al. 2022): scaled-linear betas, epsilon-prediction, "leading" timesteps. The
    # last training step keeps sqrt(abar_T) = 0.068 of the signal: the sampler's pure noise is read as image content.
    "epsilon": {"prediction_type": "epsilon", "steps_offset": 1},
    # Lin et al., "Common Diffusion Noise Schedules and Sample Steps Are Flawed", WACV 2024: betas rescaled to zero
    # terminal SNR, v-prediction (Salimans & Ho 2022), sampling from t = T ("trailing" timesteps).
    "v-zero-snr": {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
}
# FLUX.1's scheduler config (resolution-dependent shift); at 64 image tokens mu = 0.47, a shift of exp(mu) = 1.6
FLOW_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                  "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}


def vae_config(tiny: bool) -> dict:
    """Three levels: 64x64 pixels -> 16x16x4 latents."""
    ch = (8, 16, 16) if tiny else (32, 64, 64)
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=ch, layers_per_block=1,
                latent_channels=4, norm_num_groups=8 if tiny else 32, sample_size=world.IMAGE_SIZE)


def unet_config(tiny: bool) -> dict:
    """Three levels on the 16x16 latent (16x16, 8x8, 4x4), cross-attention at each."""
    ch = (16, 32, 32) if tiny else (64, 128, 128)
    return dict(sample_size=LATENT_SIZE, in_channels=4, out_channels=4, block_out_channels=ch,
                down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
                layers_per_block=1, cross_attention_dim=32 if tiny else 128, attention_head_dim=4 if tiny else 8,
                norm_num_groups=8 if tiny else 32)


def text_config(tok, tiny: bool, layers: int = 4) -> dict:
    hidden = 32 if tiny else 128
    return dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden, projection_dim=hidden,
                num_hidden_layers=1 if tiny else layers, num_attention_heads=4, max_position_embeddings=MAX_LENGTH,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def flux_config(tiny: bool) -> dict:
    """Packed 2x2 latent patches (16 channels), width 128 (4 heads x 32; rope axes 8+12+12 = 32)."""
    if tiny:
        return dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                    num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False,
                    axes_dims_rope=(4, 6, 6))
    return dict(patch_size=1, in_channels=16, num_layers=3, num_single_layers=6, attention_head_dim=32,
                num_attention_heads=4, joint_attention_dim=128, pooled_projection_dim=128, guidance_embeds=False,
                axes_dims_rope=(8, 12, 12))


def t5_config(tok, tiny: bool) -> dict:
    d = 32 if tiny else 128
    return dict(vocab_size=len(tok), d_model=d, d_kv=d // 4, d_ff=2 * d, num_layers=1 if tiny else 3, num_heads=4,
                feed_forward_proj="gated-gelu", relative_attention_num_buckets=16, relative_attention_max_distance=64,
                dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id)


def t5_tokenizer():
    """A Unigram ``T5Tokenizer`` over the sandbox's words (one piece each) and single characters."""
    from safediff.random_models import t5_tokenizer as build
    from safediff.sandbox.tokenizer import word_list

    return build(T5_LENGTH, words=word_list())


class Nets:
    """The trained networks of one architecture (``trainable``: name -> module; the checkpoint's prefixes), the VAE,
    and the pipeline they make."""

    def __init__(self, arch: str, tiny: bool, seed: int, tok, vae=None, objective: str = "epsilon"):
        from diffusers import AutoencoderKL, FluxTransformer2DModel, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        self.arch, self.tiny, self.tok, self.objective = arch, tiny, tok, objective
        torch.manual_seed(seed)
        if arch == "unet":  # construction order fixed: it decides the initial weights of the shipped model
            self.vae = AutoencoderKL(**vae_config(tiny))
            self.trainable = {"unet": UNet2DConditionModel(**unet_config(tiny)),
                              "text": CLIPTextModel(CLIPTextConfig(**text_config(tok, tiny)))}
            self.tok2 = None
        else:
            self.vae = vae
            self.tok2 = t5_tokenizer()
            self.trainable = {"transformer": FluxTransformer2DModel(**flux_config(tiny)),
                              "text": CLIPTextModel(CLIPTextConfig(**text_config(tok, tiny, layers=2))),
                              "text2": T5EncoderModel(T5Config(**t5_config(self.tok2, tiny)))}

    def to(self, device: str) -> Nets:
        self.vae.to(device)
        for net in self.trainable.values():
            net.to(device)
        return self

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for net in self.trainable.values() for p in net.parameters()]

    def pipeline(self, nets: dict[str, torch.nn.Module] | None = None):
        """A diffusers pipeline of these networks (or of ``nets``, e.g. EMA copies) with the VAE."""
        from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusionPipeline

        n = nets or self.trainable
        if self.arch == "unet":
            scheduler = DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=False,
                                      **OBJECTIVES[self.objective])
            return StableDiffusionPipeline(vae=self.vae, text_encoder=n["text"], tokenizer=self.tok, unet=n["unet"],
                                           scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
        return FluxPipeline(transformer=n["transformer"], scheduler=FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULER),
                            vae=self.vae, text_encoder=n["text"], tokenizer=self.tok, text_encoder_2=n["text2"],
                            tokenizer_2=self.tok2)

    def copies(self, states: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.nn.Module]:
        """CPU copies of the trainable networks holding ``states`` (name -> state dict, e.g. the EMA weights)."""
        out = {}
        for name, net in self.trainable.items():
            out[name] = copy.deepcopy(net).cpu()
            out[name].load_state_dict({k: v.cpu() for k, v in states[name].items()})
        return out


def to_pixels(images: np.ndarray, device: str) -> torch.Tensor:
    """uint8 [B,H,W,3] -> float [B,3,H,W] in [-1, 1]."""
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0).to(device)


def latent_stats(vae, seed: int, device: str, n: int = 512) -> tuple[float, float]:
    """Mean and standard deviation of the VAE's latents z ~ q(z|x) over a fixed batch of ``n`` world images."""
    rng = np.random.default_rng([seed, 99])
    images, _, _ = world.sample_batch(rng, n)
    with torch.no_grad():
        z = vae.encode(to_pixels(images, device)).latent_dist.sample(torch.Generator().manual_seed(seed)).float()
    return float(z.mean()), float(z.std())


def flux_vae(folder: str | Path, seed: int, device: str):
    """The VAE of a trained UNet sandbox folder, frozen, with FLUX's latent ``shift_factor`` (the mean) and
    ``scaling_factor`` (1 / std) measured as ``latent_stats``."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(Path(folder) / "vae"), use_safetensors=True).to(device)
    vae.eval().requires_grad_(False)
    mean, std = latent_stats(vae, seed, device)
    vae.register_to_config(shift_factor=mean, scaling_factor=1.0 / std)
    return vae
