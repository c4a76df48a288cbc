"""Negative-prompt guard = generate(..., negative_prompt=concept text); 2 branches; no presets."""

import pytest
import torch
from guard_checks import count_unet_calls, pipeline_state

from safediff.errors import SafediffError
from safediff.guards import build_guard
from safediff.sampling import generate

PROMPTS = ["a red circle", "a photo of a blue square on white"]
SEEDS = [3, 11]


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sdxl"])
def test_equals_negative_prompt(fixture, request):
    model = request.getfixturevalue(fixture)
    guard = build_guard("negative-prompt", "red,circle")
    assert guard.concept_text == "red, circle"
    with count_unet_calls(model) as calls:
        out = generate(model, PROMPTS, SEEDS, steps=4, guard=guard, progress=False)
    ref = generate(model, PROMPTS, SEEDS, steps=4, negative_prompt="red, circle", progress=False)
    plain = generate(model, PROMPTS, SEEDS, steps=4, progress=False)
    assert torch.equal(out.pixels, ref.pixels)
    assert (out.latents - plain.latents).abs().max() > 1e-3  # the guard did something
    assert calls == [4] * 4 and out.unet_batch_per_step == [2] * 4


def test_cfg_off_has_no_effect(tiny_sd):
    out = generate(tiny_sd, PROMPTS, SEEDS, steps=3, guidance=1.0, guard=build_guard("negative-prompt", "red"),
                   progress=False)
    plain = generate(tiny_sd, PROMPTS, SEEDS, steps=3, guidance=1.0, progress=False)
    assert torch.equal(out.pixels, plain.pixels)


def test_default_concept_and_config():
    cfg = build_guard("negative-prompt").config()
    assert cfg["name"] == "negative-prompt" and cfg["concepts"] == ["sld-default"]
    assert cfg["concept_text"].startswith("an image showing hate, harassment")


def test_session_leaves_pipeline_unchanged(tiny_sd):
    before = pipeline_state(tiny_sd)
    generate(tiny_sd, PROMPTS, SEEDS, steps=2, guard=build_guard("negative-prompt", "red"), progress=False)
    assert pipeline_state(tiny_sd) == before


@pytest.mark.parametrize("spec, concept, words", [
    ("negative-prompt:max", "red", "has no presets"),
    ("negative-prompt:scale=2", "red", "unknown option"),
    ("negative-prompt", "", "empty concept"),
])
def test_bad_input(spec, concept, words):
    with pytest.raises(SafediffError, match=words):
        build_guard(spec, concept)
