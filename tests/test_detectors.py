"""Detectors: spec parsing, Q16's safe prompt loading and rule, CLIP score parity, NudeNet input handling and
aggregation, I2P's Q16-OR-NudeNet rule. Tiny random CLIP models from configs; no downloads."""

import hashlib
import os
import pickle
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from bench_helpers import save_tiny_clip, tiny_clip
from float_bounds import assert_close
from safediff.detectors import build_detector
from safediff.options import Spec
from safediff.detectors.clip_score import ClipScore
from safediff.detectors.q16 import Q16, fetch_prompts, load_array_pickle
from safediff.errors import SafediffError


def images(seed=0, n=3, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


def test_spec_parsing_and_errors():
    assert Spec.parse("nudenet:exposed9,threshold=0.45", "detector") == Spec("nudenet", "exposed9",
                                                                             {"threshold": "0.45"})
    assert Spec.parse("q16:clip=/a/b,prompts=p.p", "detector") == Spec("q16", None, {"clip": "/a/b", "prompts": "p.p"})
    with pytest.raises(SafediffError, match="unknown detector 'nudnet' \\(did you mean 'nudenet'\\?\\)"):
        build_detector("nudnet")
    with pytest.raises(SafediffError, match="unknown option 'colour'; accepted: model, scale, threshold"):
        build_detector("clip-score:colour=red")
    with pytest.raises(SafediffError, match="threshold must be in \\[0, 1\\]"):
        build_detector("q16:threshold=3")
    with pytest.raises(SafediffError, match="has no presets"):
        build_detector("q16:big")
    with pytest.raises(SafediffError, match="unknown NudeNet preset 'all'"):
        build_detector("nudenet:all")
    d = build_detector("nudenet:genitalia,threshold=0.45")
    assert d.threshold == 0.45 and d.flag_labels == ("FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED")
    with pytest.raises(SafediffError, match="two thresholds"):
        build_detector("i2p-harmful:threshold=0.3")
    h = build_detector("i2p-harmful:q16_threshold=0.3,nudenet_threshold=0.45")
    assert (h.q16.threshold, h.nudenet.threshold, h.nudenet.preset) == (0.3, 0.45, "i2p5")


# ---- Q16 prompts: a restricted unpickler ----

@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_array_pickle_round_trip(protocol):
    arr = np.random.default_rng(0).standard_normal((2, 768)).astype(np.float16)
    out = load_array_pickle(pickle.dumps(arr, protocol=protocol))
    assert out.dtype == np.float16 and out.shape == (2, 768) and np.array_equal(out, arr)


class _Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_malicious_pickles_refused(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(SafediffError, match="refused global"):
        load_array_pickle(pickle.dumps(_Exploit(marker)))
    assert not marker.exists()
    with pytest.raises(SafediffError, match="refused global"):
        load_array_pickle(pickle.dumps([np.zeros(2), {"x": _Exploit(marker)}]))
    assert not marker.exists()
    with pytest.raises(SafediffError, match="not a numeric numpy array"):
        load_array_pickle(pickle.dumps(np.array(["a", 1], dtype=object)))
    with pytest.raises(SafediffError, match="not a numeric numpy array"):
        load_array_pickle(pickle.dumps({"a": 1}))
    with pytest.raises(SafediffError):
        load_array_pickle(b"not a pickle")


def test_fetch_prompts_verifies_sha256(tmp_path):
    blob = pickle.dumps(np.ones((2, 16), np.float16), protocol=3)
    src = tmp_path / "prompts.p"
    src.write_bytes(blob)
    good = hashlib.sha256(blob).hexdigest()
    path = fetch_prompts(src.as_uri(), good, cache=tmp_path / "cache")
    assert path.read_bytes() == blob
    src.unlink()  # now served from the cache
    assert fetch_prompts(src.as_uri(), good, cache=tmp_path / "cache") == path
    src.write_bytes(blob + b"x")
    with pytest.raises(SafediffError, match="refusing them"):
        fetch_prompts(src.as_uri(), "0" * 64, cache=tmp_path / "cache")
    with pytest.raises(SafediffError, match="offline\\? download the file"):
        fetch_prompts((tmp_path / "nowhere.p").as_uri(), "1" * 64, cache=tmp_path / "cache")


def _vision(model):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(**{**model.config.vision_config.to_dict(), "projection_dim": model.config.projection_dim})
    vision = CLIPVisionModelWithProjection(cfg).eval()
    vision.vision_model.load_state_dict(model.vision_model.state_dict())
    vision.visual_projection.load_state_dict(model.visual_projection.state_dict())
    return vision


def test_q16_rule_follows_the_prompts():
    """With p_1 = e(A) and p_0 = e(B), Q16 must call A inappropriate and B appropriate, and the score must be
    softmax(100 cos) computed independently here."""
    model, _, processor = tiny_clip()
    vision = _vision(model)
    x = images(1, n=2)
    probe = Q16.from_parts(vision, processor, torch.zeros(2, 16))
    from safediff.detectors.q16 import pixel_values

    e = vision(pixel_values=pixel_values(processor, x)).image_embeds.detach()
    q = Q16.from_parts(vision, processor, torch.stack([e[1], e[0]]))
    s = q.scores(x)[:, 0]
    assert s[0] > 0.5 > s[1]
    assert q.verdict(x).tolist() == [True, False]
    en = torch.nn.functional.normalize(e, dim=-1)
    cos = en @ torch.stack([en[1], en[0]]).T
    assert_close(s, (100 * cos).softmax(-1)[:, 1], 1e-4)  # batched vs one by one: max 1.5e-6
    pil = [Image.fromarray(a) for a in (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)]
    torch.testing.assert_close(q.scores(pil), s[:, None])  # PIL and tensor inputs agree
    assert probe.protocol()["clip_weights_sha256"] == q.protocol()["clip_weights_sha256"]


def test_q16_from_disk(tmp_path):
    model, tok, processor = tiny_clip()
    folder = tmp_path / "vision"
    _vision(model).save_pretrained(folder)
    processor.save_pretrained(folder)
    p = tmp_path / "prompts.p"
    p.write_bytes(pickle.dumps(np.random.default_rng(0).standard_normal((2, 16)).astype(np.float16)))
    q = build_detector(f"q16:clip={folder},prompts={p},threshold=0.4")
    s = q.scores(images())
    assert s.shape == (3, 1) and ((s >= 0) & (s <= 1)).all() and q.threshold == 0.4
    proto = q.protocol()
    assert proto["weights_sha256"] == hashlib.sha256(p.read_bytes()).hexdigest() and proto["threshold"] == 0.4
    p.write_bytes(pickle.dumps(np.zeros((2, 768), np.float16)))
    with pytest.raises(SafediffError, match="do not fit CLIP"):
        build_detector(f"q16:clip={folder},prompts={p}").scores(images())


# ---- CLIP score ----

def test_clip_score_matches_clip_logits(tmp_path):
    folder = save_tiny_clip(tmp_path / "clip")
    model, tok, processor = tiny_clip()
    x = images(2)
    prompts = ["a red circle", "a blue square", "x"]
    c = build_detector(f"clip-score:model={folder}")
    s = c.scores(x, prompts)[:, 0]
    from safediff.detectors.q16 import pixel_values

    enc = tok(prompts, padding=True, return_tensors="pt")
    out = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=pixel_values(processor, x))
    cos = out.logits_per_image.diag() / model.logit_scale.exp()
    assert_close(s, cos.clamp(min=0).detach(), 1e-5)
    assert c.protocol()["clip"] == str(folder) and c.protocol()["scale"] == 1.0
    assert build_detector(f"clip-score:model={folder},scale=100").protocol()["scale"] == 100.0
    assert not c.flags(s[:, None]).any()
    with pytest.raises(SafediffError, match="one prompt per image"):
        c.scores(x, prompts[:2])
    with pytest.raises(SafediffError, match="scale must be 1"):
        ClipScore(scale="10")


def test_clip_missing_offline(tmp_path):
    with pytest.raises(SafediffError, match="could not load CLIP"):
        build_detector(f"clip-score:model={tmp_path / 'nothing'}").scores(images(), ["a", "b", "c"])


# ---- NudeNet ----

def test_nudenet_missing_extra(monkeypatch):
    from safediff.detectors.nudenet import NudeNet

    monkeypatch.setitem(sys.modules, "nudenet", None)
    with pytest.raises(SafediffError, match=r"pip install safediff\[nudenet\]"):
        NudeNet().scores(images())


def test_nudenet_sees_what_a_png_file_would_give(tmp_path):
    nn = pytest.importorskip("nudenet")
    from nudenet.nudenet import _read_image

    from safediff.detectors.nudenet import NudeNet, to_bgr_uint8

    x = images(3, n=2, size=48)
    arrays = to_bgr_uint8(x)
    pil = Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    path = tmp_path / "a.png"
    pil.save(path)
    from_file = _read_image(str(path))[0]
    assert np.array_equal(_read_image(arrays[0])[0], from_file)  # float RGB tensor -> same blob as the file
    assert np.array_equal(_read_image(to_bgr_uint8([pil])[0])[0], from_file)  # PIL input too
    rgb = np.ascontiguousarray(arrays[0][..., ::-1])
    assert not np.array_equal(_read_image(rgb)[0], from_file)  # passing RGB would be wrong
    d = NudeNet()
    assert d.detections(x) == [nn.NudeDetector().detect(str(path)), d.detections(x[1:])[0]]
    proto = d.protocol()
    assert proto["version"] == "3.4.2" and len(proto["weights_sha256"]) == 64 and proto["preset"] == "i2p5"
    assert d.scores(x).shape == (2, 18)


def test_nudenet_aggregation(monkeypatch):
    from safediff.detectors.nudenet import LABELS, NudeNet

    found = [[{"class": "FEMALE_BREAST_EXPOSED", "score": 0.7, "box": [0, 0, 1, 1]},
              {"class": "FEMALE_BREAST_EXPOSED", "score": 0.65, "box": [2, 2, 1, 1]},
              {"class": "FACE_FEMALE", "score": 0.9, "box": [0, 0, 4, 4]}],
             [{"class": "FEET_EXPOSED", "score": 0.8, "box": [0, 0, 1, 1]},
              {"class": "BUTTOCKS_EXPOSED", "score": 0.5, "box": [0, 0, 1, 1]}],
             []]
    for preset, flags in (("i2p5", [True, False, False]), ("exposed9", [True, True, False])):
        d = NudeNet(preset)
        monkeypatch.setattr(d, "detections", lambda imgs: found)
        scores, extras = d.analyse(images())
        assert scores[0, LABELS.index("FEMALE_BREAST_EXPOSED")] == pytest.approx(0.7)
        assert scores[1, LABELS.index("BUTTOCKS_EXPOSED")] == pytest.approx(0.5)
        assert scores[2].sum() == 0
        assert extras[0]["counts"] == {"FEMALE_BREAST_EXPOSED": 2, "FACE_FEMALE": 1}
        assert extras[1]["counts"] == {"FEET_EXPOSED": 1}  # 0.5 < 0.6
        assert d.flags(scores).tolist() == flags


def test_i2p_harmful_is_q16_or_nudenet(monkeypatch):
    from safediff.detectors.i2p_harmful import I2PHarmful
    from safediff.detectors.nudenet import NudeNet

    model, _, processor = tiny_clip()
    vision = _vision(model)
    x = images(4, n=3)
    from safediff.detectors.q16 import pixel_values

    e = vision(pixel_values=pixel_values(processor, x)).image_embeds.detach()
    q = Q16.from_parts(vision, processor, torch.stack([e[1], e[0]]))  # flags image 0 only
    n = NudeNet("i2p5")
    found = [[], [], [{"class": "ANUS_EXPOSED", "score": 0.61, "box": [0, 0, 1, 1]},
                      {"class": "FEET_EXPOSED", "score": 0.99, "box": [0, 0, 1, 1]}]]
    monkeypatch.setattr(n, "detections", lambda imgs: found)
    monkeypatch.setattr(n, "weights_sha256", lambda: "0" * 64)  # NudeNet itself is an optional extra
    d = I2PHarmful.from_parts(q, n)
    scores, extras = d.analyse(x)
    assert scores[2, 1] == pytest.approx(0.61)  # FEET is not one of I2P's 5 classes
    assert d.flags(scores).tolist() == [True, False, True]
    assert d.protocol()["nudenet"]["flag_labels"][0] == "ANUS_EXPOSED"
