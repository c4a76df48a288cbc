"""Diffusers pipelines with random weights, built from configs in code (no network).

Tiny ones (``tiny-sd``, ``tiny-sdxl``) make the tests fast; full-size ones (``sd15``, ``sdxl``) have the real
architectures' sizes for speed measurements, where weight values do not matter. The tokenizer is a real
``CLIPTokenizer`` over byte-level tokens (every prompt encodes; no merges), so the tiny text encoders are small.
"""

from __future__ import annotations

import torch

ARCHES = ("tiny-sd", "tiny-sdxl", "sd15", "sdxl")


def byte_tokenizer(max_length: int = 77):
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length, pad_token="<|endoftext|>")
    assert len(tok) == 514, f"byte tokenizer has {len(tok)} tokens, expected 514"
    return tok


def _clip_text(hidden: int, layers: int, heads: int, inter: int, vocab: int, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden, intermediate_size=inter,
                         num_attention_heads=heads, num_hidden_layers=layers, vocab_size=vocab,
                         max_position_embeddings=77, projection_dim=projection or hidden, hidden_act="gelu")
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def build_pipeline(arch: str = "tiny-sd", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A diffusers pipeline of the named architecture with weights drawn from ``torch.manual_seed(seed)``."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    if arch not in ARCHES:
        raise ValueError(f"unknown architecture {arch}; accepted: {', '.join(ARCHES)}")
    torch.manual_seed(seed)
    tok = byte_tokenizer()
    if arch == "tiny-sd":
        unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=16,
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                    attention_head_dim=(2, 4), norm_num_groups=8)
        vae = AutoencoderKL(block_out_channels=(16, 32), latent_channels=4, norm_num_groups=8,
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
        te = _clip_text(32, 2, 4, 37, len(tok))
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=_scheduler(),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    elif arch == "tiny-sdxl":
        unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=16,
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                    use_linear_projection=True, addition_embed_type="text_time",
                                    addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                                    projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64,
                                    norm_num_groups=8)
        vae = AutoencoderKL(block_out_channels=(16, 32), latent_channels=4, norm_num_groups=8,
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
        te = _clip_text(32, 2, 4, 37, len(tok))
        te2 = _clip_text(32, 2, 4, 37, len(tok), projection=32)
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok,
                                         tokenizer_2=byte_tokenizer(), unet=unet, scheduler=_scheduler(),
                                         force_zeros_for_empty_prompt=True)
    elif arch == "sd15":
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4, sample_size=512,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        te = _clip_text(768, 12, 12, 3072, 49408)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=_scheduler(),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:  # sdxl
        unet = UNet2DConditionModel(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                    attention_head_dim=(5, 10, 20), use_linear_projection=True,
                                    addition_embed_type="text_time", addition_time_embed_dim=256,
                                    transformer_layers_per_block=(1, 2, 10),
                                    projection_class_embeddings_input_dim=2816, cross_attention_dim=2048)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4, sample_size=1024,
                            scaling_factor=0.13025, force_upcast=True,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        te = _clip_text(768, 12, 12, 3072, 49408)
        te2 = _clip_text(1280, 32, 20, 5120, 49408, projection=1280)
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok,
                                         tokenizer_2=byte_tokenizer(), unet=unet, scheduler=_scheduler(),
                                         force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)
