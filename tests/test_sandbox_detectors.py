import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from safediff.detectors.sandbox import (SHAPE_WEIGHTS, SandboxColour, SandboxMark, SandboxPresence, SandboxShape,
                                        SandboxStyle, attributes, objects)
from safediff.detectors.sandbox_cnn import train
from safediff.detectors.sandbox_renders import degraded_batch, degrade, match, true_centroid
from safediff.detectors.sandbox_segment import label
from safediff.detectors.sandbox_validation import RECORD, validate
from safediff.errors import SafediffError
from safediff.sandbox.world import COLOURS, IMAGE_SIZE, STYLES, Object, Scene, random_object, render

shipped = pytest.mark.skipif(not SHAPE_WEIGHTS.is_file(), reason="shipped shape/style CNN weights absent")


def tensor(*scenes: Scene) -> torch.Tensor:
    return torch.from_numpy(np.stack([render(s) for s in scenes])).permute(0, 3, 1, 2).float() / 255.0


def lone(rng, **attrs) -> Scene:
    return Scene((random_object(rng, **attrs),), False)


def test_label_joins_gaps_of_two_pixels_and_splits_wider_ones():
    mask = torch.zeros(1, 12, 12, dtype=torch.bool)
    mask[0, 2:5, 1:3] = True
    mask[0, 2:5, 5:7] = True  # 2-pixel gap: one object
    mask[0, 8:10, 1:3] = True  # 3 rows below: another
    lab = label(mask)[0]
    assert lab[2, 1] == lab[2, 6] != lab[8, 1] and lab[8, 1] > 0 and (lab[~mask[0]] == 0).all()


def test_colour_is_exact_on_degraded_renders_of_every_colour_and_style():
    rng = np.random.default_rng(0)
    scenes = [lone(rng, colour=c, style=t) for c in COLOURS for t in STYLES for _ in range(3)]
    x = degrade(np.stack([render(s) for s in scenes]), rng)
    s = SandboxColour().scores(x)
    assert s.shape == (len(scenes), len(COLOURS)) and (s >= 0).all() and (s <= 1).all()
    assert [COLOURS[i] for i in s.argmax(1).tolist()] == [sc.objects[0].colour for sc in scenes]
    assert s.max(1).values.min() > 0.9


@shipped
def test_objects_reads_every_object_exactly_on_degraded_renders():
    x, scenes = degraded_batch(np.random.default_rng([11, 5]), 120)
    found = objects(x)
    for scene, objs in zip(scenes, found):
        assert len(objs) == len(scene.objects)
        if len(objs) == 2:
            assert [o["side"] for o in objs] == ["left", "right"]
        for obj, k in match(scene, [(o["x"], o["y"]) for o in objs]):
            got = objs[k]
            assert (got["colour"], got["shape"], got["style"]) == (obj.colour, obj.shape, obj.style)
            tx, ty = true_centroid(obj)
            assert abs(got["x"] - tx) < 1 and abs(got["y"] - ty) < 1
            assert min(got["confidence"].values()) > 0.5


@shipped
def test_whole_image_detectors_flag_any_object_showing_a_flagged_value():
    left = Object("red", "star", "striped", 12.0, 16.0, 20.0)
    right = Object("blue", "heart", "solid", 12.0, 48.0, 20.0)
    x = tensor(Scene((left, right), False), Scene((right,), False), Scene((), True))
    assert SandboxColour(flag_labels=("red",)).verdict(x).tolist() == [True, False, False]
    assert SandboxShape(flag_labels=("star",)).verdict(x).tolist() == [True, False, False]
    assert SandboxStyle(flag_labels=("solid",)).verdict(x).tolist() == [True, True, False]
    for det in (SandboxColour(), SandboxShape(), SandboxStyle(), SandboxPresence(), SandboxMark()):
        s = det.scores(x)
        assert s.shape == (3, len(det.labels)) and ((s >= 0) & (s <= 1)).all()
        assert det.protocol()["name"] == det.name
    assert (SandboxShape().scores(x)[2] == 0).all() and (SandboxColour().scores(x)[2] == 0).all()


@shipped
def test_presence_analysis_records_every_object_as_plain_data():
    rng = np.random.default_rng(8)
    x, _ = degraded_batch(rng, 12)
    scores, extras = SandboxPresence().analyse(x)
    assert torch.equal(scores, SandboxPresence().scores(x))
    assert [e["objects"] for e in extras] == objects(x)
    assert json.loads(json.dumps(extras)) == extras
    assert SandboxPresence().protocol()["weights_sha256"] == SandboxShape().protocol()["weights_sha256"]


def test_presence_and_mark_separate_blank_from_drawn():
    rng = np.random.default_rng(3)
    drawn = [lone(rng) for _ in range(20)]
    marked = [Scene((), True) for _ in range(4)] + [Scene(s.objects, True) for s in drawn[:4]]
    x = degrade(np.stack([render(s) for s in drawn + marked + [Scene((), False)] * 4]), rng)
    blank = torch.ones(4, 3, IMAGE_SIZE, IMAGE_SIZE)
    noisy_blank = (blank - 0.05 * torch.rand(4, 3, IMAGE_SIZE, IMAGE_SIZE)).clamp(0, 1)
    presence = SandboxPresence().verdict(torch.cat([x, blank, noisy_blank])).tolist()
    assert presence == [True] * 20 + [False] * 4 + [True] * 4 + [False] * 12
    mark = SandboxMark().verdict(torch.cat([x, blank])).tolist()
    assert mark == [False] * 20 + [True] * 8 + [False] * 8


@shipped
def test_any_image_size_is_read_at_64():
    rng = np.random.default_rng(4)
    scenes = [lone(rng) for _ in range(6)]
    x = tensor(*scenes)
    big = F.interpolate(x, scale_factor=2, mode="nearest")
    read = [[(o["colour"], o["shape"], o["style"], round(o["x"]), round(o["y"])) for o in os] for os in objects(big)]
    truth = [[(o.colour, o.shape, o.style, *map(round, true_centroid(o))) for o in s.objects] for s in scenes]
    assert read == truth


@shipped
def test_attributes_reads_the_largest_object_count_and_mark():
    rng = np.random.default_rng(6)
    one = lone(rng, colour="green", shape="arrow", style="outlined")
    pair = Scene((Object("pink", "cross", "solid", 10.0, 16.0, 20.0),
                  Object("grey", "square", "striped", 13.0, 47.0, 20.0)), True)
    found = attributes(tensor(one, pair, Scene((), False)))
    assert found[0] == {"colour": "green", "shape": "arrow", "style": "outlined", "present": True, "count": 1,
                        "mark": False}
    assert found[1] == {"colour": "grey", "shape": "square", "style": "striped", "present": True, "count": 2,
                        "mark": True}
    assert found[2] == {"colour": None, "shape": None, "style": None, "present": False, "count": 0, "mark": False}


def test_a_tiny_training_run_writes_loadable_recorded_weights(tmp_path):
    rec = train(tmp_path, seed=0, steps=2, scenes=4, held_out=6)
    assert rec["steps"] == 2 and set(rec["held_out_accuracy"]) == {"shape", "style"}
    assert json.loads((tmp_path / "shape_style_cnn.json").read_text())["sha256"] == rec["sha256"]
    det = SandboxStyle(weights=tmp_path / "shape_style_cnn.safetensors")
    s = det.scores(tensor(lone(np.random.default_rng(0))))
    assert s.shape == (1, len(STYLES)) and torch.allclose(s.sum(1), torch.ones(1))
    assert det.protocol()["weights_sha256"] == rec["sha256"]


def test_missing_or_corrupt_cnn_weights_raise_a_clear_error(tmp_path):
    x = tensor(lone(np.random.default_rng(1)))
    with pytest.raises(SafediffError, match="retrain"):
        SandboxShape(weights=tmp_path / "none.safetensors").scores(x)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(SafediffError, match="retrain"):
        SandboxShape(weights=bad).scores(x)
    with pytest.raises(ValueError, match="unknown labels"):
        SandboxShape(flag_labels=("ring",))


@shipped
def test_shipped_cnn_and_validation_record_99_percent_on_2000_held_out_renders():
    cnn = json.loads(SHAPE_WEIGHTS.with_suffix(".json").read_text())
    assert cnn["sha256"] == SandboxShape().protocol()["weights_sha256"]
    assert cnn["held_out_objects"] >= 2000 and min(cnn["held_out_accuracy"].values()) >= 0.99
    record = json.loads(RECORD.read_text())
    assert record["cnn_weights_sha256"] == cnn["sha256"]
    assert min(record["n"].values()) >= 2000 and min(record["accuracy"].values()) >= 0.99
    assert set(record["accuracy"]) == {"colour", "shape", "style", "position", "count", "presence", "mark",
                                       "sandbox-colour", "sandbox-shape", "sandbox-style"}


@shipped
def test_validation_of_a_few_fresh_images_is_exact():
    rec = validate(n=40, seed=5, chunk=20)
    assert rec["images"] == 40 and rec["n"]["count"] == 40 and rec["objects"] >= 40
    assert rec["accuracy"] == {k: 1.0 for k in rec["accuracy"]}, rec["errors"]
