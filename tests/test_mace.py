"""MACE: exact sandbox masks, the attention probabilities it trains on, the fusion solve, refinement rows, the LoRA
stage (its loss goes down inside the mask; bit-identical resume) and what the edit records."""

import numpy as np
import pytest
import torch

from safediff.concepts import resolve
from safediff.erasers.attention_maps import cross_attention, cross_attention_probs
from safediff.erasers.closed_form import least_squares_weight
from safediff.erasers.mace import MACE, importance_weights
from safediff.erasers.prompts import WordFinder, aligned_rows
from safediff.errors import SafediffError
from safediff.sandbox.masks import SOURCE, render_value, sandbox_mask_provider
from safediff.sandbox.values import RGB

RED = resolve("red")


def test_sandbox_masks_are_the_rendered_objects():
    """Inside the mask the pixels are the object's colour; outside it, white (anti-aliased edges aside)."""
    out = render_value("red", 6, seed=3)
    assert out.pixels.shape == (6, 3, 64, 64) and out.masks.shape == (6, 1, 64, 64) and out.source == SOURCE
    ink = 1.0 - out.pixels  # (1 - a)·white + a·C: ink along 1 - C
    red = 1.0 - torch.tensor(RGB["red"], dtype=torch.float32) / 255
    inside = ink.permute(0, 2, 3, 1)[out.masks[:, 0]]
    outside = ink.permute(0, 2, 3, 1)[~out.masks[:, 0]]
    assert (outside.abs().sum(-1) > 0.05).float().mean() < 0.05
    solid = inside[inside.norm(dim=-1) > 0.5]  # fully inked pixels point along red's ink direction
    assert torch.nn.functional.cosine_similarity(solid, red[None], dim=-1).min() > 0.99
    again = render_value("red", 6, seed=3)
    assert torch.equal(again.pixels, out.pixels) and torch.equal(again.masks, out.masks)
    small = sandbox_mask_provider(RED)(RED[0], 2, 3, 32, 32)
    assert small.pixels.shape == (2, 3, 32, 32) and small.masks.dtype == torch.bool


def test_mask_provider_refuses_other_concepts():
    with pytest.raises(SafediffError):
        sandbox_mask_provider(resolve("a cat"))


def test_importance_sampling_favours_200_to_400():
    w = importance_weights(1000)
    assert float(w.sum()) == pytest.approx(1.0)
    assert 200 <= int(w.argmax()) <= 400 and float(w[200:401].sum()) > 0.75


def test_fusion_is_the_stacked_least_squares_solution():
    """W = (λW_a + Σ s_k W_k G_k)(λI + Σ s_k G_k)⁻¹ solves min λ‖W − W_a‖² + Σ s_k Σ_c ‖W c − W_k c‖² (lstsq)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    anchor, lamb = r(4, 6), 0.3
    groups = [(1.0, r(4, 6), r(5, 6)), (2.5, r(4, 6), r(3, 6))]
    got = least_squares_weight(anchor, lamb, [(s, w, c.T @ c) for s, w, c in groups])
    a = torch.cat([lamb ** 0.5 * torch.eye(6, dtype=torch.float64), *(s ** 0.5 * c for s, _, c in groups)])
    b = torch.cat([lamb ** 0.5 * anchor.T, *(s ** 0.5 * c @ w.T for s, w, c in groups)])
    want = torch.linalg.lstsq(a, b).solution.T
    assert torch.allclose(got, want, atol=1e-10)


def test_refinement_rows_surround_the_word(tiny_sd):
    """'surrounding': every position but the word's own; the prefix meets itself, the rest the guide prompt's."""
    finder = WordFinder(tiny_sd.adapter.tokenizers[0])
    prompt, guide = "a red circle", "a circle"
    word = finder.ids("red")
    pairs = aligned_rows(finder, prompt, guide, word, 0, "surrounding", 77)
    ids = finder.tok(prompt).input_ids
    start = next(i for i in range(len(ids)) if ids[i:i + len(word)] == word)
    rows = [i for i, _ in pairs]
    assert rows == [i for i in range(77) if not start <= i < start + len(word)]
    assert all(j == i for i, j in pairs if i < start)
    assert all(j == i - len(word) for i, j in pairs if start + len(word) <= i < len(ids))


def test_attention_probabilities_reproduce_the_block_output(tiny_sd):
    """The probabilities the hook computes, times the values, through to_out: the block's own output."""
    block = next(m for n, m in tiny_sd.unet.named_modules() if n.endswith("attn2"))
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 16, block.to_q.in_features, generator=g)
    context = torch.randn(2, 77, block.to_k.in_features, generator=g)
    probs = cross_attention_probs(block, hidden, context)
    assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[:2]), atol=1e-5)
    mixed = block.batch_to_head_dim(probs @ block.head_to_batch_dim(block.to_v(context)))
    with torch.no_grad():
        assert torch.allclose(block.to_out[0](mixed), block(hidden, encoder_hidden_states=context), atol=1e-5)
    seen = []
    with cross_attention(tiny_sd.unet, lambda b, p: seen.append(p.shape)):
        block(hidden, encoder_hidden_states=context)
    assert seen == [probs.shape] and not block._forward_pre_hooks


def test_lora_stage_lowers_the_attention_inside_the_mask(tiny_sd):
    """On a fixed noisy image, the trained LoRA puts less of the word's attention inside the concept's mask."""
    eraser = MACE(iterations=25, lr=0.05, rank=2, n_images=1, expand_prompts=False, use_pooler=False,
                  masks=sandbox_mask_provider(RED))
    data = eraser.concept_data(tiny_sd, RED[0], 0)
    refined = {f"unet.{n}.weight": m.weight.detach() for n, m in tiny_sd.adapter.cross_attention_kv()}
    deltas, run = eraser.train_loras(tiny_sd, RED, [data], refined, progress=False)
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(data.latents.shape, generator=g)
    with torch.no_grad():
        before = eraser.attention_loss(tiny_sd, data, 0, 0, x_t, 300, {n[5:]: w for n, w in refined.items()})
        after = eraser.attention_loss(tiny_sd, data, 0, 0, x_t, 300,
                                      {n[5:]: (w.double() + deltas[0][n]).float() for n, w in refined.items()})
    assert float(after) < 0.8 * float(before) and len(run["losses"]) == 25


def test_edit_records_the_masks_it_used(tiny_sd):
    eraser = MACE(iterations=2, n_images=2, masks=sandbox_mask_provider(RED))
    edit = eraser.fit(tiny_sd, RED, progress=False)
    masks = edit.metadata["info"]["masks"]
    assert masks[0]["source"] == SOURCE and masks[0]["images"] == 2 and 0.0 < masks[0]["coverage"] < 0.5
    assert edit.tensors and all(eraser.touches(n) for n in edit.tensors)


def test_without_a_provider_masks_come_from_cross_attention(tiny_sd):
    edit = MACE(iterations=1, n_images=1).fit(tiny_sd, RED, progress=False)
    assert edit.metadata["info"]["masks"][0]["source"].startswith("cross-attention maps")


def test_fusion_keeps_each_concepts_lora(tiny_sd):
    """One LoRA per concept, fused: erasing two concepts differs from erasing either."""
    kw = dict(iterations=3, n_images=1, lr=0.05, masks=sandbox_mask_provider(resolve("red,circle")))
    both = MACE(**kw).fit(tiny_sd, resolve("red,circle"), progress=False)
    red = MACE(**kw).fit(tiny_sd, RED, progress=False)
    assert len(both.metadata["info"]["masks"]) == 2 and both.digest != red.digest


def test_resume_after_interruption_is_bit_identical(tiny_sd, tmp_path, monkeypatch):
    kwargs = dict(iterations=3, n_images=1, lr=0.05, seed=2, masks=sandbox_mask_provider(resolve("red,circle")))
    concepts = resolve("red,circle")
    straight = MACE(**kwargs).fit(tiny_sd, concepts, progress=False)
    ckpt = tmp_path / "mace.safetensors"
    loss = MACE.attention_loss
    calls = {"n": 0}

    def interrupted(self, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 5:  # during iteration 5 (the second concept's), after the checkpoint of iteration 4
            raise KeyboardInterrupt
        return loss(self, *args, **kw)

    monkeypatch.setattr(MACE, "attention_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        MACE(**kwargs, checkpoint=str(ckpt), checkpoint_every=2).fit(tiny_sd, concepts, progress=False)
    monkeypatch.setattr(MACE, "attention_loss", loss)
    resumed = MACE(**kwargs, checkpoint=str(ckpt), checkpoint_every=2).fit(tiny_sd, concepts, progress=False)
    assert resumed.metadata["info"]["resumed_at_iteration"] == 4
    assert all(torch.equal(resumed.tensors[k], straight.tensors[k]) for k in straight.tensors)
    assert set(resumed.tensors) == set(straight.tensors)
    with pytest.raises(SafediffError, match="different run"):
        MACE(**{**kwargs, "iterations": 4}, checkpoint=str(ckpt)).fit(tiny_sd, concepts, progress=False)


@pytest.mark.parametrize("bad", [{"tokens": "middle"}, {"rank": 0}, {"mask_threshold": 2.0}])
def test_bad_options_are_one_clear_error(tiny_sd, bad):
    with pytest.raises(SafediffError):
        MACE(**bad, iterations=1, n_images=1).fit(tiny_sd, RED, progress=False)


def test_sandbox_settings_pass_the_mask_provider():
    from safediff.sandbox.validation import eraser_settings

    settings = eraser_settings(MACE, "benchmark", RED)
    assert callable(settings["masks"]) and np.isfinite(settings["lr"])
