"""EraseAnything on tiny FLUX: its loss terms recomputed independently, the attention regulariser's effect, resume,
bad input, and that the sandbox (an SD-1 UNet) runs without it."""

import pytest
import torch
import torch.nn.functional as F

from safediff.concepts import resolve
from safediff.erasers import build_eraser
from safediff.erasers.erase_anything import (EraseAnythingRun, attention_penalty, attention_vector,
                                             joint_attention_maps, resco_loss)
from safediff.errors import SafediffError
from safediff.sampling import denoiser_output

RED = resolve("red")
SMALL = {"rank": 2, "ddim_steps": 2, "irrelevant": 2}


def test_penalty_and_resco_match_their_definitions():
    g = torch.Generator().manual_seed(0)
    maps = [torch.rand(2, 3, 5, 7, generator=g) for _ in range(2)]  # [B, H, N, L] per block
    pos = [1, 4]
    penalty = sum(torch.sqrt((m[:, :, :, j] ** 2).sum()) for m in maps for j in pos)
    assert torch.allclose(attention_penalty(maps, pos), penalty)
    vec = torch.stack([m[..., pos].mean(dim=-1).mean(dim=1) for m in maps]).mean(0)
    assert torch.allclose(attention_vector(maps, pos), vec)
    anchor, centre, irr = torch.rand(2, 5, generator=g), torch.rand(2, 5, generator=g), [torch.rand(2, 5, generator=g)]
    logits = torch.stack([F.cosine_similarity(anchor, b, dim=1) for b in [centre, *irr]], dim=1) / 0.07
    expected = -F.cross_entropy(logits, torch.zeros(2, dtype=torch.long))  # the centre's log-probability
    assert torch.allclose(resco_loss(anchor, centre, irr, 0.07), expected)


def test_maps_are_image_to_text_probabilities(tiny_flux):
    run = EraseAnythingRun(build_eraser("erase-anything", **SMALL), tiny_flux, RED, None, None)
    t, x = run.draw(run.conds[0])
    maps = []
    with torch.no_grad(), joint_attention_maps(tiny_flux.denoiser, "all", maps):
        denoiser_output(tiny_flux, x, t, run.conds[0])
    n_blocks = len(tiny_flux.denoiser.transformer_blocks)
    assert len(maps) == n_blocks
    text_len = run.conds[0].embeds.shape[1]
    image_tokens = x.shape[-2] * x.shape[-1] // 4
    for m in maps:
        assert m.shape[-2:] == (image_tokens, text_len)
        assert bool((m >= 0).all()) and bool((m.sum(-1) < 1).all())  # the rest goes to the image keys


def test_esd_term_at_the_lora_start_is_the_negatively_guided_gap(tiny_flux):
    """B = 0 at the start, so v_θ = v*: L_esd = (1 + η)² mean((v*(c) − v*(g))²), recomputed from the model."""
    eta = 2.0
    run = EraseAnythingRun(build_eraser("erase-anything", negative_guidance=eta, **SMALL), tiny_flux, RED, None, None)
    t, x = run.draw(run.conds[0])
    with torch.no_grad():
        l_esd, l_attn, _ = run.erase_loss(0, x, t)
        v_c = denoiser_output(tiny_flux, x, t, run.conds[0])
        v_g = denoiser_output(tiny_flux, x, t, tiny_flux.adapter.encode_negative(None, 1))
        maps = []
        with joint_attention_maps(tiny_flux.denoiser, "last", maps):
            denoiser_output(tiny_flux, x, t, run.conds[0])
    assert torch.allclose(l_esd, (1 + eta) ** 2 * ((v_c - v_g) ** 2).mean(), rtol=1e-5)
    assert torch.allclose(l_attn, attention_penalty(maps, run.positions[0]), rtol=1e-5)


def concept_attention(model, run, x, t) -> float:
    maps = []
    with torch.no_grad(), joint_attention_maps(model.denoiser, "all", maps):
        denoiser_output(model, x, t, run.conds[0])
    return float(attention_penalty(maps, run.positions[0]))


def test_attention_term_lowers_the_concept_tokens_attention(tiny_flux):
    e = build_eraser("erase-anything", iterations=6, lr=3e-2, schedule="joint", esd_weight=0.0, attn_weight=1.0,
                     keep_weight=0.0, resco_weight=0.0, attention_blocks="all", lora_on="attention", **SMALL)
    run = EraseAnythingRun(e, tiny_flux, RED, None, None)
    t, x = run.draw(run.conds[0])
    before = concept_attention(tiny_flux, run, x, t)
    edit = e.fit(tiny_flux, RED, progress=False)
    edit.apply(tiny_flux)
    after = concept_attention(tiny_flux, run, x, t)
    edit.revert(tiny_flux)
    assert after < 0.9 * before, (before, after)


def test_resume_is_bit_identical(tiny_flux, tmp_path):
    spec = {"iterations": 4, "checkpoint_every": 2, **SMALL}
    whole = build_eraser("erase-anything", **spec).fit(tiny_flux, RED, progress=False)
    ckpt = str(tmp_path / "ea.safetensors")
    build_eraser("erase-anything", **{**spec, "iterations": 2, "checkpoint": ckpt}).fit(tiny_flux, RED, progress=False)
    resumed = build_eraser("erase-anything", **{**spec, "checkpoint": ckpt}).fit(tiny_flux, RED, progress=False)
    assert resumed.metadata["info"]["resumed_at_iteration"] == 2
    assert whole.tensors.keys() == resumed.tensors.keys()
    for name in whole.tensors:
        assert torch.equal(whole.tensors[name], resumed.tensors[name]), name


@pytest.mark.parametrize("bad", [{"schedule": "bilevel"}, {"lora_on": "ffn"}, {"attention_blocks": "first"},
                                 {"rank": 0}])
def test_bad_settings_fail_in_one_line(bad):
    with pytest.raises(SafediffError) as err:
        build_eraser("erase-anything", **bad)
    assert "\n" not in str(err.value)


def test_no_preserve_prompt_fails_in_one_line(tiny_flux):
    with pytest.raises(SafediffError, match="preserve") as err:
        build_eraser("erase-anything", **SMALL).fit(tiny_flux, RED, preserve=[], progress=False)
    assert "\n" not in str(err.value)


def test_sandbox_demo_and_benchmarks_skip_it():
    """The sandbox is an SD-1 UNet, which EraseAnything refuses: the demo and the sandbox benchmarks leave it out."""
    from safediff.demo import registered_erasers
    from safediff.sandbox.validation import sandbox_erasers

    assert "erase-anything" not in sandbox_erasers() and "erase-anything" not in registered_erasers()
    assert "esd-x" in sandbox_erasers()
