"""CASG-SLD: K=1 is SLD, per-sample category selection, 2+K branches in one UNet call, re-selection knob, SDXL."""

import pytest
import torch
from float_bounds import BATCH_LATENTS, assert_close
from guard_checks import count_unet_calls, pipeline_state

from safediff.errors import SafediffError
from safediff.guards import build_guard
from safediff.guards.casg import select_category
from safediff.sampling import generate

PROMPTS = ["a red circle", "a photo of a blue square on white"]
SEEDS = [3, 11]


def test_select_category_matches_brute_force_cosine():
    g = torch.Generator().manual_seed(0)
    eu, ep = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    cats = torch.randn(6, 3, 4, 5, 5, generator=g) * torch.rand(6, 1, 1, 1, 1, generator=g) * 5
    expected = []
    for b in range(3):
        d = (ep[b] - eu[b]).flatten()
        cos = [torch.nn.functional.cosine_similarity(d, (cats[k, b] - eu[b]).flatten(), dim=0) for k in range(6)]
        expected.append(int(torch.stack(cos).argmax()))
    assert select_category(eu, ep, cats).tolist() == expected
    assert len(set(expected)) > 1  # samples chose differently: the check is per sample


@pytest.mark.parametrize("preset", ["max", "strong", "weak,warmup=2"])
def test_one_category_is_sld(tiny_sd, preset):
    sld = generate(tiny_sd, PROMPTS, SEEDS, steps=8, guard=build_guard(f"sld:{preset}", "illegal"), progress=False)
    casg = generate(tiny_sd, PROMPTS, SEEDS, steps=8, guard=build_guard(f"casg-sld:{preset}", "illegal"),
                    progress=False)
    assert torch.equal(casg.latents, sld.latents)
    assert casg.unet_batch_per_step == sld.unet_batch_per_step


def test_each_sample_picks_its_own_category(tiny_sd):
    """Prompt b *is* category b's text, so δ = h_b and Cauchy-Schwarz makes b the argmax for sample b."""
    # λ = 0 keeps SLD's mask continuous, so batch-size rounding cannot flip it (see test_guard_sld.py)
    guard = build_guard("casg-sld:max,threshold=0", "red,blue")
    out = generate(tiny_sd, ["red", "blue"], SEEDS, steps=5, guard=guard, progress=False)
    chosen = guard.chosen_categories()
    assert chosen.shape == (2, 5)
    assert chosen[0].tolist() == [0] * 5 and chosen[1].tolist() == [1] * 5
    assert guard.category_names == ["red", "blue"]
    # and each sample got SLD with its own category (the momentum and ε_S gathered per sample)
    for b, concept in enumerate(["red", "blue"]):
        alone = generate(tiny_sd, [["red", "blue"][b]], [SEEDS[b]], steps=5,
                         guard=build_guard("sld:max,threshold=0", concept), progress=False)
        assert_close(out.latents[b], alone.latents[0], BATCH_LATENTS)  # 2 + K branches vs 3, batch 2 vs 1


def test_one_unet_call_of_two_plus_k_branches(tiny_sd):
    guard = build_guard("casg-sld")  # default: max, i2p-all (7 categories)
    assert len(guard.category_texts) == 7 and guard.preset == "max"
    with count_unet_calls(tiny_sd) as calls:
        out = generate(tiny_sd, PROMPTS, SEEDS, steps=4, guard=guard, progress=False)
    assert calls == [9 * len(PROMPTS)] * 4 and out.unet_batch_per_step == [9] * 4
    assert guard.chosen_categories().shape == (2, 4) and (guard.chosen_categories() >= 0).all()


def test_reselect_every_m_steps(tiny_sd):
    guard = build_guard("casg-sld:max,reselect_every=2", "red,blue,green")
    out = generate(tiny_sd, PROMPTS, SEEDS, steps=5, guard=guard, progress=False)
    assert out.unet_batch_per_step == [5, 3, 5, 3, 5]
    chosen = guard.chosen_categories()
    assert torch.equal(chosen[:, 0], chosen[:, 1]) and torch.equal(chosen[:, 2], chosen[:, 3])


def test_history_spans_batches(tiny_sd):
    guard = build_guard("casg-sld:max", "red,blue")
    generate(tiny_sd, ["red", "blue", "blue"], [1, 2, 3], steps=3, guard=guard, batch_size=2, progress=False)
    assert guard.chosen_categories()[:, 0].tolist() == [0, 1, 1]


def test_zero_strength_is_plain_cfg_and_records_no_category(tiny_sd):
    plain = generate(tiny_sd, PROMPTS, SEEDS, steps=4, progress=False)
    guard = build_guard("casg-sld:max,safety_scale=0", "red,blue")
    out = generate(tiny_sd, PROMPTS, SEEDS, steps=4, guard=guard, progress=False)
    assert torch.equal(out.pixels, plain.pixels) and out.unet_batch_per_step == [2] * 4
    assert (guard.chosen_categories() == -1).all()


def test_session_leaves_pipeline_unchanged(tiny_sd):
    before = pipeline_state(tiny_sd)
    generate(tiny_sd, PROMPTS, SEEDS, steps=3, guard=build_guard("casg-sld", "red,blue"), progress=False)
    assert pipeline_state(tiny_sd) == before


def test_sdxl_with_pooled_embeddings(tiny_sdxl):
    plain = generate(tiny_sdxl, PROMPTS, SEEDS, steps=3, progress=False)
    guard = build_guard("casg-sld:max", "red,blue,green")
    with count_unet_calls(tiny_sdxl) as calls:
        out = generate(tiny_sdxl, PROMPTS, SEEDS, steps=3, guard=guard, progress=False)
    assert calls == [5 * 2] * 3
    assert (out.latents - plain.latents).abs().max() > 1e-3
    one = generate(tiny_sdxl, PROMPTS, SEEDS, steps=3, guard=build_guard("casg-sld:max", "illegal"), progress=False)
    sld = generate(tiny_sdxl, PROMPTS, SEEDS, steps=3, guard=build_guard("sld:max", "illegal"), progress=False)
    assert torch.equal(one.latents, sld.latents)


def test_config_records_categories_and_knobs():
    cfg = build_guard("casg-sld:strong,reselect_every=3", "red,circle").config()
    assert cfg["name"] == "casg-sld" and cfg["preset"] == "strong" and cfg["reselect_every"] == 3
    assert cfg["categories"] == [{"name": "red", "text": "red"}, {"name": "circle", "text": "circle"}]
    assert cfg["safety_scale"] == 2000.0 and cfg["warmup"] == 7


@pytest.mark.parametrize("spec, words", [
    ("casg-sld:nope", "unknown preset"),
    ("casg-sld:max,reselect_every=0", "reselect_every"),
    ("casg-sld:max,safety_scale=-3", "safety_scale"),
    ("casg-sld:max,threshold=100", "threshold"),
])
def test_bad_options_are_rejected(spec, words):
    with pytest.raises(SafediffError, match=words):
        build_guard(spec, "red,blue")
