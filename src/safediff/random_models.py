"""Diffusers pipelines with random weights, built from configs in code (no network).

Tiny ones (``tiny-sd``, ``tiny-sdxl``, ``tiny-sd3``, ``tiny-flux``, ``tiny-flux-schnell``) make the tests fast;
full-size ones (``sd15``, ``sdxl``) have the real architectures' sizes for speed measurements, where weight values do
not matter. The CLIP tokenizer is a real ``CLIPTokenizer`` over byte-level tokens (every prompt encodes; no merges),
so the tiny text encoders are small. The T5 tokenizer of the SD3/FLUX models is a real ``T5Tokenizer`` (a Unigram
model, as T5's sentencepiece one) over single characters and a few hundred whole words, built offline.
"""

from __future__ import annotations

import torch

ARCHES = ("tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-flux-schnell", "sd15", "sdxl")
DIT_ARCHES = ("tiny-sd3", "tiny-flux", "tiny-flux-schnell")


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


# Whole words of the T5 test vocabulary (any other word is spelled from single characters).
T5_WORDS = (
    "a an the of on in with and or that is are this to by for at from as it its no not one two some something "
    "photo image picture drawing painting portrait illustration render scene snapshot artwork close-up oil black "
    "white background object shape person people woman man room clothes wearing red green blue yellow crimson "
    "scarlet emerald navy azure golden circle square triangle disc box pyramid cat dog car tree house sky nudity "
    "naked nude violence blood art style text written song cake zebra"
).split()


def t5_tokenizer(max_length: int = 32, words: tuple[str, ...] | list[str] = T5_WORDS):
    """A ``T5Tokenizer`` (Unigram, SentencePiece-style ``▁`` word starts, ``</s>`` appended, ``<pad>`` = 0) whose
    pieces are ``words`` (default ``T5_WORDS``) and every printable ASCII character, alone and word-initial; whole
    words win over spellings (higher score). Built in code, no download."""
    import string

    from transformers import T5Tokenizer

    chars = [c for c in string.printable if not c.isspace()]
    scores = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "\u2581": -5.0}
    for piece, score in [(f"\u2581{w}", -1.0) for w in words] + [(p, -3.0) for c in chars
                                                                      for p in (f"\u2581{c}", c)]:
        scores.setdefault(piece, score)
    return T5Tokenizer(vocab=list(scores.items()), extra_ids=0, model_max_length=max_length)


def _t5_text(d_model: int, vocab: int):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=vocab, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4, dropout_rate=0.0,
                   relative_attention_num_buckets=8, relative_attention_max_distance=32, decoder_start_token_id=0)
    return T5EncoderModel(cfg).eval()


def _flow_scheduler(dynamic: bool):
    """Flow-matching Euler: SD3's fixed shift 3, or FLUX.1's resolution-dependent shift (its hub config)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if dynamic:
        return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                               base_image_seq_len=256, max_image_seq_len=4096)
    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def _dit_vae(latent_channels: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(16, 32), latent_channels=latent_channels, norm_num_groups=8,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)


def _build_dit(arch: str):
    """SD3 (two CLIPs with projection + T5, MM-DiT) or FLUX.1 dev/schnell (CLIP pooled + T5, MM-DiT with
    single-stream blocks; schnell has no guidance embedding)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline

    t5_tok = t5_tokenizer()
    if arch == "tiny-sd3":
        transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                            attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                                            caption_projection_dim=32, pooled_projection_dim=48, pos_embed_max_size=16)
        te = _clip_text(16, 2, 2, 37, 514, projection=16)
        te2 = _clip_text(32, 2, 4, 37, 514, projection=32)
        te3 = _t5_text(64, len(t5_tok))
        return StableDiffusion3Pipeline(transformer=transformer, scheduler=_flow_scheduler(False), vae=_dit_vae(4),
                                        text_encoder=te, tokenizer=byte_tokenizer(), text_encoder_2=te2,
                                        tokenizer_2=byte_tokenizer(), text_encoder_3=te3, tokenizer_3=t5_tok)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
                                         guidance_embeds=arch == "tiny-flux")
    te = _clip_text(32, 2, 4, 37, 514)
    te2 = _t5_text(32, len(t5_tok))
    return FluxPipeline(transformer=transformer, scheduler=_flow_scheduler(True), vae=_dit_vae(4), text_encoder=te,
                        tokenizer=byte_tokenizer(), text_encoder_2=te2, tokenizer_2=t5_tok)


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
    if arch in DIT_ARCHES:
        pipe = _build_dit(arch)
        pipe.set_progress_bar_config(disable=True)
        return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
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
