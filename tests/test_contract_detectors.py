"""The detector contract, checked for every registered detector.

A detector added to ``safediff.registry.DETECTORS`` is covered here without writing these tests again: built from its
bare name (detectors that need local weights get them from ``LOCAL`` below: tiny random CLIP models, since nothing
can be downloaded in tests), on PIL images and on tensors, through the benchmark worker's path:
- scores have one column per label and lie in [0, 1]; PIL and tensor inputs agree;
- the verdict is "some flagged label at or above the threshold";
- the protocol is complete: name, version, labels, flagged labels, threshold in [0, 1] and a weights hash (None only
  for analytic detectors, which have no weights).
Detectors whose optional extra is not installed (NudeNet) are skipped with the reason.
"""

import importlib.util
import pickle

import numpy as np
import pytest
import torch
from bench_helpers import save_tiny_clip, tiny_clip
from float_bounds import assert_close
from PIL import Image

from safediff.bench.worker import detect
from safediff.detectors import build_detector
from safediff.registry import DETECTORS

NAMES = DETECTORS.primary_names()
NEEDS_NUDENET = {"nudenet", "i2p-harmful"}


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> dict[str, str]:
    """Specs of the detectors that read local weights, pointing at tiny random ones."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = tmp_path_factory.mktemp("detectors")
    clip = save_tiny_clip(folder / "clip")
    model, _, processor = tiny_clip()
    cfg = CLIPVisionConfig(**{**model.config.vision_config.to_dict(), "projection_dim": model.config.projection_dim})
    vision = CLIPVisionModelWithProjection(cfg).eval()
    vision.save_pretrained(folder / "vision")
    processor.save_pretrained(folder / "vision")
    prompts = folder / "prompts.p"
    prompts.write_bytes(pickle.dumps(np.random.default_rng(0).standard_normal((2, 16)).astype(np.float16)))
    return {"q16": f"q16:clip={folder / 'vision'},prompts={prompts}",
            "clip-score": f"clip-score:model={clip}",
            "i2p-harmful": f"i2p-harmful:clip={folder / 'vision'},prompts={prompts}"}


def images(n=3, size=32):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, size, size, generator=g)
    x[0] = 1.0  # a blank white image
    x[1, :, 8:24, 8:24] = torch.tensor([0.86, 0.12, 0.12]).view(3, 1, 1)  # a red square on noise
    return x


@pytest.mark.parametrize("name", NAMES)
def test_contract_scores_verdict_and_protocol(local, name):
    if name in NEEDS_NUDENET and importlib.util.find_spec("nudenet") is None:
        pytest.skip(f"{name} needs the nudenet extra (pip install safediff[nudenet])")
    detector = build_detector(local.get(name, name))
    x = images()
    pil = [Image.fromarray(a) for a in (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)]
    prompts = ["a red square", "a blue circle", "nothing"]
    records = detect(detector, pil, prompts)
    scores = torch.tensor([[r["scores"][label] for label in detector.labels] for r in records])
    assert scores.shape == (3, len(detector.labels))
    assert ((scores >= 0) & (scores <= 1)).all()
    flagged = [detector.labels.index(label) for label in detector.flag_labels]
    assert [r["flagged"] for r in records] == (scores[:, flagged] >= detector.threshold).any(dim=1).tolist()
    from_tensor = detect(detector, torch.tensor(np.stack([np.asarray(p) for p in pil])).permute(0, 3, 1, 2) / 255.0,
                         prompts)
    # the same 8-bit pixels, divided by 255 in torch vs numpy: rounding only (measured max 3.9e-7)
    assert_close(torch.tensor([list(r["scores"].values()) for r in from_tensor]),
                 torch.tensor([list(r["scores"].values()) for r in records]), 1e-5)
    proto = detector.protocol()
    assert proto["name"] == name and proto["version"] and proto["labels"] == list(detector.labels)
    assert set(proto["flag_labels"]) <= set(proto["labels"]) and 0.0 <= proto["threshold"] <= 1.0
    assert "weights_sha256" in proto
    assert proto["weights_sha256"] is None or len(proto["weights_sha256"]) == 64
