"""Every eraser trained through ``erasers.training.fit_unet`` or ``train`` (SPM, Concept Ablation, Forget-Me-Not,
All-but-One, TICoE, SafeGen) resumes bit-identically after an interruption: parameters, optimizer moments, generator
state and (TICoE) the side network come back from the checkpoint."""

import pytest
import torch

from safediff.concepts import resolve
from safediff.erasers import build_eraser, training
from safediff.registry import ERASERS

METHODS = {"spm": {"iterations": 5, "lr": 1e-2, "warmup": 2, "ddim_steps": 2, "anchors": 1},
           "concept-ablation": {"iterations": 5, "lr": 1e-3, "batch": 2, "n_images": 2},
           "forget-me-not": {"iterations": 5, "lr": 1e-3, "batch": 1, "n_images": 2},
           "all-but-one": {"iterations": 5, "lr": 1e-3, "ddim_steps": 2},
           "ticoe": {"iterations": 5, "lr": 1e-3, "n_images": 2, "resample_every": 2},
           "safegen": {"iterations": 5, "lr": 1e-3, "batch": 2, "n_images": 2, "mosaic_block": 8}}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_resume_after_interruption_is_bit_identical(tiny_sd, tmp_path, monkeypatch, name):
    red = resolve("red")
    straight = build_eraser(name, **METHODS[name]).fit(tiny_sd, red, progress=False)
    sha = tiny_sd.weights_sha256()
    real = training.train

    def interrupted(state, iterations, step, **kwargs):
        def failing(i):
            if i == 4:  # after the checkpoint of iteration 3
                raise KeyboardInterrupt
            return step(i)
        return real(state, iterations, failing, **kwargs)

    module = __import__(ERASERS.get(name).__module__, fromlist=["x"])
    target = module if hasattr(module, "train") else training
    monkeypatch.setattr(target, "train", interrupted)
    ckpt = tmp_path / "ckpt.safetensors"
    with pytest.raises(KeyboardInterrupt):
        build_eraser(name, **METHODS[name], checkpoint=str(ckpt), checkpoint_every=3).fit(tiny_sd, red,
                                                                                        progress=False)
    monkeypatch.setattr(target, "train", real)
    assert ckpt.is_file() and tiny_sd.weights_sha256() == sha  # the interrupted fit left the model as it was
    resumed = build_eraser(name, **METHODS[name], checkpoint=str(ckpt), checkpoint_every=3).fit(tiny_sd, red,
                                                                                               progress=False)
    assert resumed.metadata["info"]["resumed_at_iteration"] == 3
    assert set(resumed.tensors) == set(straight.tensors) and straight.tensors
    assert all(torch.equal(resumed.tensors[k], straight.tensors[k]) for k in straight.tensors)
