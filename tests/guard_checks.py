"""Shared checks for guard tests: denoiser call counting and 'the pipeline is left as it was'."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def count_unet_calls(model):
    """Yields a list that receives the batch size of every denoiser forward call made inside the block."""
    sizes: list[int] = []
    handle = model.denoiser.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    try:
        yield sizes
    finally:
        handle.remove()


def pipeline_state(model) -> dict:
    """What a guard session must not leave changed: hooks, attention processors, weights, scheduler config."""
    denoiser = model.denoiser
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in denoiser.modules())
    return {
        "hooks": hooks,
        "processors": {k: type(v).__name__ for k, v in denoiser.attn_processors.items()},
        "weights": model.weights_sha256(),
        "scheduler": dict(model.pipe.scheduler.config),
        "training": denoiser.training,
    }
