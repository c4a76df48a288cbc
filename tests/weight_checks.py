"""Snapshots of a pipeline's weights, for tests that an edit touches only what it claims and reverts exactly."""

import torch

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")


def snapshot(model) -> dict[str, torch.Tensor]:
    """Every weight of every component (``component.name`` -> a copy)."""
    out = {}
    for component in COMPONENTS:
        module = getattr(model.pipe, component, None)
        if module is not None:
            out.update({f"{component}.{k}": v.detach().clone() for k, v in module.state_dict().items()})
    return out


def changed(a: dict, b: dict) -> set[str]:
    return {k for k in a if not torch.equal(a[k], b[k])}


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
