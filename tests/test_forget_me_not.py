"""Forget-Me-Not (Zhang et al., 2023) on tiny random models: the concept's token positions, the recorded attention
against an independent softmax(QKᵀ) recomputation, the loss against the reference's masked-select norm, the first
step's loss recomputed from every layer's softmax(QKᵀ), attention to the concept falling after the fit, the
processors restored, a folder of images."""

import numpy as np
import pytest
import torch
from PIL import Image

from safediff.concepts import Concept, resolve
from safediff.erasers import build_eraser
from safediff.erasers.forget_me_not import (ForgetMeNot, attention_norm, concept_positions,
                                            recorded_cross_attention)
from safediff.errors import SafediffError
from safediff.registry import ERASERS
from safediff.sampling import denoiser_output

FAST = dict(iterations=2, lr=1e-3, batch=1, n_images=2)


def test_concept_positions_are_the_keywords_tokens_and_the_first_eot(tiny_sd):
    tok, a = tiny_sd.adapter.tokenizers[0], tiny_sd.adapter
    prompts = ["a red circle", "red and red"]
    eos = a.eos_positions(prompts)
    mask = concept_positions(tok, prompts, ["red", "red"], eos, 77, use_pooler=True)
    for b, p in enumerate(prompts):
        ids = tok(p, padding="max_length", max_length=77).input_ids
        picked = [tok.convert_ids_to_tokens(ids[i]) for i in mask[b].nonzero().flatten().tolist()]
        assert picked.count("<|endoftext|>") == 1 and int(eos[b]) in mask[b].nonzero().flatten().tolist()
        assert "".join(t.replace("</w>", " ") for t in picked if t != "<|endoftext|>").split() == \
            ["red"] * p.split().count("red")
    without = concept_positions(tok, prompts, ["red", "red"], eos, 77, use_pooler=False)
    assert (mask.sum(1) - without.sum(1)).tolist() == [1, 1]
    with pytest.raises(SafediffError):
        concept_positions(tok, ["a blue circle"], ["red"], eos[:1], 77, use_pooler=False)


def test_loss_is_the_norm_of_the_concepts_attention_over_all_layers():
    g = torch.Generator().manual_seed(0)
    heads, mask = 2, torch.tensor([[False, True, True, False], [True, False, False, False]])
    records = [(torch.rand(4, 5, 4, generator=g).softmax(-1), heads), (torch.rand(4, 3, 4, generator=g), heads)]
    picked = []
    for probs, h in records:  # rows are sample-major (b · heads + h), each with its own positions
        for r in range(probs.shape[0]):
            picked.append(probs[r][:, mask[r // h]].flatten())
    assert float(attention_norm(records, mask)) == pytest.approx(float(torch.cat(picked).norm()), rel=1e-6)


def test_recorded_probabilities_are_the_attention_softmax_and_the_output_is_unchanged(tiny_sd):
    a = tiny_sd.adapter
    x, t, cond = torch.randn(1, 4, 4, 4), torch.tensor(500), a.encode(["a red circle"])
    before = dict(tiny_sd.denoiser.attn_processors)
    with torch.no_grad():
        plain = denoiser_output(tiny_sd, x, t, cond)
        records, inputs = [], {}
        attn2 = {n: m for n, m in tiny_sd.denoiser.named_modules() if n.endswith("attn2")}
        first = next(iter(attn2.values()))
        handle = first.register_forward_pre_hook(lambda m, args, kw: inputs.update(h=args[0], e=kw.get(
            "encoder_hidden_states")), with_kwargs=True)
        with recorded_cross_attention(tiny_sd.denoiser, lambda p, h: records.append((p, h))):
            recorded = denoiser_output(tiny_sd, x, t, cond)
        handle.remove()
    assert dict(tiny_sd.denoiser.attn_processors) == before
    assert len(records) == len(attn2)
    assert (recorded - plain).abs().max() <= 1e-5 * plain.abs().max()
    q, k = first.to_q(inputs["h"]), first.to_k(inputs["e"])
    b, n, d = q.shape
    h = first.heads
    q = q.view(b, n, h, d // h).transpose(1, 2).reshape(b * h, n, d // h)
    k = k.view(b, -1, h, d // h).transpose(1, 2).reshape(b * h, -1, d // h)
    expected = (q @ k.transpose(1, 2) * first.scale).softmax(-1)
    assert torch.allclose(records[0][0], expected, atol=1e-6) and records[0][1] == h



def test_first_loss_recomputed_from_every_cross_attention_softmax(tiny_sd):
    """One step: its loss against softmax(QKᵀ·scale) of every attn2, recomputed from the layer's inputs, at the
    prompt's "red" tokens and first end-of-text token (positions found here from the token ids)."""
    tok, calls = tiny_sd.adapter.tokenizers[0], []

    def recompute(m, args, kwargs):
        b, n, _ = args[0].shape
        q = m.to_q(args[0]).view(b, n, m.heads, -1).transpose(1, 2)
        k = m.to_k(kwargs["encoder_hidden_states"]).view(b, -1, m.heads, q.shape[-1]).transpose(1, 2)
        calls.append((q @ k.transpose(-1, -2) * m.scale).softmax(-1).detach())

    attn2 = [m for n, m in tiny_sd.denoiser.named_modules() if n.endswith("attn2")]
    hooks = [m.register_forward_pre_hook(recompute, with_kwargs=True) for m in attn2]
    try:
        eraser = ForgetMeNot(iterations=1, lr=1e-3, batch=1, n_images=1)
        eraser.fit(tiny_sd, [Concept("red", ("red",), contexts=("a {} circle",))], progress=False)
    finally:
        for h in hooks:
            h.remove()
    step = calls[-len(attn2):]  # the last UNet forward is the one training step (before it, the image's sampling)
    ids = tok("a red circle", padding="max_length", max_length=77).input_ids
    red = tok("red", add_special_tokens=False).input_ids
    starts = [i for i in range(1, 77 - len(red)) if ids[i:i + len(red)] == red]
    keep = [s + j for s in starts for j in range(len(red))] + [ids.index(tok.eos_token_id, 1)]
    assert len(starts) == 1 and all(a.shape[0] == 1 for a in step)
    total = sum(float(a[..., keep].pow(2).sum()) for a in step)
    assert eraser.losses[0] == pytest.approx(total ** 0.5, rel=1e-5)

def test_attention_to_the_concept_falls_after_the_fit(tiny_sd):
    concept = [Concept("red", ("red",), contexts=("a {} circle",))]
    eraser = ForgetMeNot(iterations=6, lr=1e-3, batch=2, n_images=2, parameters="cross-attn")
    edit = eraser.fit(tiny_sd, concept, progress=False)
    assert edit.tensors and all(".attn2." in n for n in edit.tensors)
    assert eraser.losses[-1] < eraser.losses[0]


def test_a_folder_of_images_replaces_the_generated_ones(tiny_sd, tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    edit = ForgetMeNot(images=str(tmp_path), **{**FAST, "n_images": 3}).fit(tiny_sd, resolve("red"), progress=False)
    source = edit.metadata["info"]["images"]
    assert source["source"] == "folder" and source["images"] == 3 and len(source["images_sha256"]) == 64
    with pytest.raises(SafediffError, match="does not exist"):
        ForgetMeNot(images=str(tmp_path / "none"), **FAST).fit(tiny_sd, resolve("red"), progress=False)


def test_registry_alias_and_bad_input(tiny_sd):
    assert ERASERS.get("forget-me-not") is ForgetMeNot and ERASERS.get("fmn") is ForgetMeNot
    assert build_eraser("fmn:use_pooler=false").use_pooler is False
    with pytest.raises(SafediffError):
        ForgetMeNot(parameters="text-encoder")
    with pytest.raises(SafediffError):
        ForgetMeNot(**FAST).fit(tiny_sd, [Concept("x", ("",))], progress=False)
