"""Tiny random CLIP models built from configs (no downloads) and a tiny pipeline folder, for the bench tests; and
``load_benchmark``, which imports a script of ``benchmarks/`` (not a package) as a module."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module, registered in ``sys.modules`` (its dataclasses resolve their annotations
    through it)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def tiny_clip(seed: int = 0, image_size: int = 32, projection: int = 16):
    """(CLIPModel, CLIPTokenizer, CLIPImageProcessor) with random weights."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from safediff.random_models import byte_tokenizer

    tok = byte_tokenizer()
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
                         num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tok),
                         max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                           image_size=image_size, patch_size=8),
        projection_dim=projection)
    model = CLIPModel(cfg).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                   crop_size={"height": image_size, "width": image_size})
    return model, tok, processor


def save_tiny_clip(folder: Path, seed: int = 0) -> Path:
    model, tok, processor = tiny_clip(seed)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
