"""Concept Ablation (Kumari et al., ICCV 2023) on tiny random models: target/anchor prompt pairs, parameter groups,
the first loss recomputed from the frozen model, and ablating a concept onto itself changing nothing."""

import pytest
import torch

from safediff.concepts import Concept, resolve
from safediff.erasers import build_eraser
from safediff.erasers.concept_ablation import ConceptAblation, prompt_pairs
from safediff.errors import SafediffError
from safediff.registry import ERASERS
from safediff.sampling import denoiser_output

FAST = dict(iterations=2, lr=1e-3, batch=2, n_images=2)


def test_target_prompts_are_paired_with_the_anchor_prompt():
    pairs = prompt_pairs(resolve("red"), None)
    assert ("a red circle", "a circle") in pairs and all("red" not in a.split() for _, a in pairs)
    cat = Concept("grumpy cat", ("grumpy cat",), guide="cat")
    assert ("grumpy cat", "cat") in prompt_pairs([cat], None)
    assert all(a.endswith("dog") or "dog" in a for _, a in prompt_pairs([cat], "dog"))


@pytest.mark.parametrize("group, expected", [("cross-attn", lambda n: ".attn2.to_k." in n or ".attn2.to_v." in n),
                                             ("full-weight", lambda n: True)])
def test_each_parameter_group_changes_only_its_parameters(tiny_sd, group, expected):
    edit = ConceptAblation(parameters=group, **FAST).fit(tiny_sd, resolve("red"), progress=False)
    assert edit.tensors and all(expected(n.removeprefix("unet.")) for n in edit.tensors)
    if group == "full-weight":
        assert any(".attn2." not in n for n in edit.tensors)


@pytest.mark.parametrize("loss", ["model", "noise"])
def test_first_loss_recomputed_from_the_frozen_model(tiny_sd, monkeypatch, loss):
    seen = []
    noised = tiny_sd.adapter.noised

    def recording(x0, eps, t):
        x_t = noised(x0, eps, t)
        seen.append((x0, eps, t, x_t))
        return x_t

    monkeypatch.setattr(tiny_sd.adapter, "noised", recording)
    concept = [Concept("red", ("red",), contexts=("a {} circle",))]
    eraser = ConceptAblation(loss=loss, iterations=1, lr=1e-3, batch=1, n_images=1)
    eraser.fit(tiny_sd, concept, progress=False)
    x0, eps, t, x_t = seen[0]
    (target_prompt, anchor_prompt), a = prompt_pairs(concept, None)[0], tiny_sd.adapter  # one image: the first pair
    assert (target_prompt, anchor_prompt) == ("red", "")
    with torch.no_grad():
        pred = denoiser_output(tiny_sd, x_t, t, a.encode([target_prompt]))
        target = denoiser_output(tiny_sd, x_t, t, a.encode([anchor_prompt])) if loss == "model" else eps
    assert eraser.losses[0] == pytest.approx(float(torch.nn.functional.mse_loss(pred, target)), rel=1e-4)


@pytest.mark.parametrize("anchor_prediction", ["frozen", "current"])
def test_ablating_a_concept_onto_itself_changes_nothing(tiny_sd, anchor_prediction):
    same = [Concept("red", ("red",), guide="red")]  # every target prompt is its own anchor prompt
    edit = ConceptAblation(anchor_prediction=anchor_prediction, weight_decay=0.0, **FAST).fit(
        tiny_sd, same, progress=False)
    assert edit.tensors == {}


def test_registry_alias_and_bad_input(tiny_sd):
    assert ERASERS.get("concept-ablation") is ConceptAblation and ERASERS.get("ca") is ConceptAblation
    assert build_eraser("ca:loss=noise,parameters=full-weight").loss == "noise"
    for bad in ({"loss": "x0"}, {"parameters": "embedding"}, {"anchor_prediction": "old"}, {"batch": 0}):
        with pytest.raises(SafediffError):
            ConceptAblation(**bad)
    with pytest.raises(SafediffError):
        ConceptAblation(**FAST).fit(tiny_sd, [Concept("x", ("",))], progress=False)
