"""Command-line values checked before any work: devices, dtypes, seeds, text (one clear line each)."""

from __future__ import annotations

from safediff.errors import SafediffError

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "bfloat16": "bfloat16",
          "bf16": "bfloat16"}


def dtype(name: str):
    import torch

    if name not in DTYPES:
        raise SafediffError(f"unknown dtype '{name}'; accepted: {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[name])


def device(name: str) -> str:
    import re

    import torch

    m = re.fullmatch(r"cuda(?::(\d+))?", name)
    if name != "cpu" and m is None:
        raise SafediffError(f"unknown device '{name}'; accepted: cpu, cuda, cuda:N")
    if m is not None:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise SafediffError(f"device '{name}' requested but no CUDA GPU is available; accepted here: cpu")
        if m.group(1) is not None and int(m.group(1)) >= count:
            raise SafediffError(f"device '{name}' does not exist; this machine has cuda:0..cuda:{count - 1}")
    return name


def text(value: str | None, what: str) -> str | None:
    """Command-line text that is not valid UTF-8 (arrives as lone surrogates) -> one clear line."""
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise SafediffError(f"{what} is not valid UTF-8 text") from None
    return value


def seed(seed: int) -> int:
    from safediff.bench.datasets import MAX_SEED

    if not 0 <= seed <= MAX_SEED:
        raise SafediffError(f"--seed must be in [0, 2**63 - 1], got {seed}")
    return seed
