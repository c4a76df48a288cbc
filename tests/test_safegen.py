"""SafeGen (Li et al., CCS 2024) on tiny random models: the exact mosaic, both mosaic targets against their formulas,
the sandbox exemplars that stand for the concept images, the refusal without images, a folder, the scope."""

import numpy as np
import pytest
import torch
from PIL import Image

from safediff.concepts import Concept, resolve
from safediff.detectors.sandbox import SandboxColour
from safediff.erasers.safegen import SafeGen, mosaic, mosaic_target
from safediff.errors import SafediffError
from safediff.exemplars import exemplar_images, has_exemplars
from safediff.registry import ERASERS
from safediff.sampling import Trajectories

FAST = dict(iterations=2, lr=1e-3, batch=2, n_images=2, mosaic_block=8)


def test_the_mosaic_replaces_each_cell_by_its_mean_colour():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 10, 13, 3), dtype=np.uint8)
    out = mosaic(images, 4)
    for r0 in range(0, 10, 4):
        for c0 in range(0, 13, 4):
            cell = images[:, r0:r0 + 4, c0:c0 + 4].astype(np.float64)
            mean = np.rint(cell.mean(axis=(1, 2)))
            assert (out[:, r0:r0 + 4, c0:c0 + 4] == mean[:, None, None, :]).all(), (r0, c0)
    assert (mosaic(images, 1) == images).all() and out.dtype == np.uint8 and out.shape == images.shape


def test_mosaic_targets_follow_their_formulas(tiny_sd):
    s = Trajectories(tiny_sd, 5).scheduler
    g = torch.Generator().manual_seed(0)
    z_c, z_m, eps = (torch.randn(2, 4, 4, 4, generator=g) for _ in range(3))
    t = torch.tensor([10, 700])
    x_t = s.add_noise(z_c, eps, t)
    assert torch.allclose(mosaic_target(s, "reference", x_t, z_c, z_m, eps, t), eps + z_c - z_m)
    exact = mosaic_target(s, "exact", x_t, z_c, z_m, eps, t)
    abar = s.alphas_cumprod[t].view(-1, 1, 1, 1)
    denoised = (x_t - (1 - abar).sqrt() * exact) / abar.sqrt()  # the x̂_0 the prediction implies: the mosaic
    assert torch.allclose(denoised, z_m, atol=1e-4)


def test_sandbox_exemplars_show_the_value_or_none_of_the_values():
    red, blue = resolve("red")[0], resolve("blue")[0]
    assert has_exemplars([red, blue]) and not has_exemplars([Concept("nudity", ("nudity",))])
    detector = SandboxColour()
    shown = exemplar_images([red, blue], 6, seed=0, present=True)
    absent = exemplar_images([red, blue], 6, seed=0, present=False)
    labels = list(detector.labels)
    read = lambda ims: [labels[i] for i in detector.scores([Image.fromarray(x) for x in ims]).argmax(1).tolist()]  # noqa: E731
    assert read(shown) == ["red", "blue"] * 3
    assert not {"red", "blue"} & set(read(absent))
    assert (exemplar_images([red], 3, seed=0) == exemplar_images([red], 3, seed=0)).all()


def test_text_agnostic_self_attention_only(tiny_sd):
    eraser = SafeGen(**FAST)
    edit = eraser.fit(tiny_sd, resolve("red"), progress=False)
    assert edit.tensors and all(".attn1." in n for n in edit.tensors)
    info = edit.metadata["info"]
    assert info["concept_images"] == "exemplars" and info["clean"]["source"] == "exemplars"


def test_without_concept_images_the_fit_is_refused_and_a_folder_is_used(tiny_sd, tmp_path):
    nudity = [Concept("nudity", ("nudity",), preserve=("a person wearing clothes",))]
    with pytest.raises(SafediffError, match="images=FOLDER"):
        SafeGen(**FAST).fit(tiny_sd, nudity, progress=False)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    edit = SafeGen(images=str(tmp_path), **FAST).fit(tiny_sd, nudity, progress=False)
    info = edit.metadata["info"]
    assert info["concept_images"] == "folder" and info["clean"]["source"] == "generated"
    with pytest.raises(SafediffError, match="clean_images=FOLDER"):
        SafeGen(images=str(tmp_path), **FAST).fit(tiny_sd, [Concept("nudity", ("nudity",))], progress=False)


def test_registry_and_bad_input():
    assert ERASERS.get("safegen") is SafeGen
    for bad in ({"mosaic_target": "blur"}, {"mosaic_block": 0}, {"batch": 0}):
        with pytest.raises(SafediffError):
            SafeGen(**bad)
