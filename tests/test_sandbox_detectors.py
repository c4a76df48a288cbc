import json

import numpy as np
import pytest
import torch

from safediff.detectors.sandbox import (SHAPE_WEIGHTS, SandboxColour, SandboxPresence, SandboxShape,
                                        attributes, augmented_batch, presence_scores, train_shape_cnn)
from safediff.errors import SafediffError
from safediff.sandbox.world import COLOURS, SHAPES, random_scene, render, sample_batch

shipped = pytest.mark.skipif(not SHAPE_WEIGHTS.is_file(), reason="shipped shape-CNN weights absent")


def as_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


def test_colour_is_exact_on_renders():
    images, _, scenes = sample_batch(np.random.default_rng(0), 300)
    s = SandboxColour().scores(as_tensor(images))
    assert s.shape == (300, len(COLOURS)) and (s >= 0).all() and (s <= 1).all()
    assert [COLOURS[i] for i in s.argmax(1).tolist()] == [sc.colour for sc in scenes]
    assert s.max(1).values.min() > 0.9


def test_colour_of_a_blurred_noisy_render_matches_its_scene():
    rng = np.random.default_rng(2)
    hits = 0
    for _ in range(100):
        scene = random_scene(rng)
        x = as_tensor(render(scene)[None])
        x = (torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
             + 0.08 * torch.from_numpy(rng.normal(size=x.shape).astype(np.float32))).clamp(0, 1)
        hits += COLOURS[int(SandboxColour().scores(x).argmax())] == scene.colour
    assert hits >= 99


def test_presence_separates_blank_from_object_images():
    images, _, _ = sample_batch(np.random.default_rng(3), 100)
    assert (presence_scores(as_tensor(images)) == 1).all()
    blank = torch.ones(4, 3, 32, 32)
    noisy_blank = (blank - 0.05 * torch.rand(4, 3, 32, 32)).clamp(0, 1)
    assert (SandboxPresence().scores(torch.cat([blank, noisy_blank])) == 0).all()
    assert not SandboxPresence().verdict(blank).any()
    assert (SandboxColour().scores(blank) == 0).all()


def test_verdict_flags_only_the_chosen_colour():
    red = as_tensor(render(random_scene(np.random.default_rng(4), "red", "square"))[None])
    blue = as_tensor(render(random_scene(np.random.default_rng(5), "blue", "square"))[None])
    d = SandboxColour(flag_labels=("red",))
    assert d.verdict(torch.cat([red, blue])).tolist() == [True, False]


def test_tiny_training_run_writes_a_loadable_recorded_cnn(tmp_path):
    rec = train_shape_cnn(tmp_path, seed=0, steps=3, batch=16, held_out=30)
    assert 0 <= rec["held_out_accuracy"] <= 1 and rec["steps"] == 3
    assert json.loads((tmp_path / "shape_cnn.json").read_text())["sha256"] == rec["sha256"]
    det = SandboxShape(weights=tmp_path / "shape_cnn.safetensors")
    s = det.scores(torch.ones(2, 3, 32, 32))
    assert s.shape == (2, 3) and torch.allclose(s.sum(1), torch.ones(2))
    assert det.protocol()["weights_sha256"] == rec["sha256"]


def test_missing_or_corrupt_cnn_weights_raise_a_clear_error(tmp_path):
    with pytest.raises(SafediffError, match="retrain"):
        SandboxShape(weights=tmp_path / "none.safetensors").scores(torch.ones(1, 3, 32, 32))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(SafediffError, match="retrain"):
        SandboxShape(weights=bad).scores(torch.ones(1, 3, 32, 32))


@shipped
def test_shipped_shape_cnn_is_99_percent_on_held_out_blurred_noisy_renders():
    x, y = augmented_batch(np.random.default_rng([123, 4]), 600)  # a seed never used in training
    pred = SandboxShape().scores(x).argmax(1)
    assert float((pred == y).float().mean()) >= 0.99
    assert SandboxShape().protocol()["weights_sha256"] == json.loads(
        (SHAPE_WEIGHTS.parent / "shape_cnn.json").read_text())["sha256"]


@shipped
def test_attributes_reads_renders_and_blank_images():
    rng = np.random.default_rng(6)
    scenes = [random_scene(rng) for _ in range(60)]
    x = torch.cat([as_tensor(np.stack([render(s) for s in scenes])), torch.ones(1, 3, 32, 32)])
    found = attributes(x)
    assert found[-1] == {"colour": None, "shape": None, "present": False}
    assert all(f == {"colour": s.colour, "shape": s.shape, "present": True} for f, s in zip(found, scenes))
    assert set(SHAPES) == {f["shape"] for f in found[:-1]}
