"""Erasers on SD3 / FLUX (MM-DiT): what each edits and the property its design guarantees.

- UCE/RECE/TRCE stage 1 (``layers=readers``): the layers that read the encoder outputs (``context_embedder``, the
  pooled-text embedder) solve their closed forms exactly, over every segment's rows (SD3: CLIP and T5);
- UCE ``layers=text-kv``: every joint block's context K/V satisfies the normal equations of UCE's objective on the
  inputs it reads (recorded with the earlier blocks edited), and moves the erase rows toward the guide's K/V; RECE
  refuses it in one line; FLUX's single-stream blocks are never edited;
- ESD's variants and TRCE's stage 2 train the parameters their roles name.
"""

import pytest
import torch

from float_bounds import assert_close
from safediff.adapters.roles import denoiser_names, has_role
from safediff.concepts import resolve
from safediff.erasers import build_eraser
from safediff.erasers.closed_form import reader_projections
from safediff.adapters.roles import in_group
from safediff.erasers.esd import variant_group
from safediff.erasers.prompts import build_rows, plan_rows
from safediff.erasers.text_stream import block_inputs, joint_blocks, probes
from safediff.erasers.trce import eot_embeddings
from safediff.errors import SafediffError

RED = resolve("red")


def objective_gradient(w, w_old, erase, guide, preserve, target, lamb, s_e, s_p):
    """∂/∂W of s_e Σ‖W c − W_old g‖² + s_p Σ‖W p − W_old q‖² + λ‖W − W_old‖² (halved), float64."""
    r_e = erase @ w.T - guide @ w_old.T
    r_p = preserve @ w.T - target @ w_old.T
    return s_e * r_e.T @ erase + s_p * r_p.T @ preserve + lamb * (w - w_old)


@pytest.mark.parametrize("fixture", ["tiny_sd3", "tiny_flux"])
def test_uce_readers_solve_the_objective_exactly(request, fixture):
    model = request.getfixturevalue(fixture)
    uce = build_eraser("uce:lamb=0.3,erase_scale=2,preserve_scale=0.7")
    edit = uce.fit(model, RED, progress=False)
    rows = build_rows(model, RED, None, None, "to_end", True)
    spaces = reader_projections(model)
    assert set(edit.tensors) == {n for layers in spaces.values() for n in layers}
    assert set(edit.tensors) == {"transformer.context_embedder.weight",
                                 "transformer.time_text_embed.text_embedder.linear_1.weight"}
    for space, layers in spaces.items():
        r = rows.space(space)
        for name, layer in layers.items():
            w_old, w = layer.weight.double(), edit.tensors[name].double()
            grad = objective_gradient(w, w_old, r.erase, r.guide, r.preserve, r.preserve, 0.3, 2.0, 0.7)
            scale = (2.0 * r.erase.T @ r.erase).norm() * w.norm()
            assert_close(grad / scale, torch.zeros_like(grad), 1e-6)


def test_uce_rows_come_from_every_segment(tiny_sd3):
    """The word is found in CLIP's tokens and in T5's, each with its own tokenizer."""
    plan = plan_rows(tiny_sd3, RED, None, None, "last", False)
    clip, t5 = tiny_sd3.adapter.segments
    (erase, guide), = plan.pairs
    assert (erase, guide) == ("red", "")
    positions = [i for i, _ in plan.positions[0]]
    assert positions == [clip.start + 3, t5.start + 0]  # CLIP: r e d</w> after BOS; T5: ▁red opens the prompt
    assert [j for _, j in plan.positions[0]] == [clip.start + 0, t5.start + 0]  # BOS of ""; T5's first row of ""


def test_uce_text_kv_satisfies_the_normal_equations_on_recorded_inputs(tiny_sd3):
    model = tiny_sd3
    uce = build_eraser("uce:layers=text-kv,lamb=0.3,probes=2")
    edit = uce.fit(model, RED, progress=False)
    blocks = joint_blocks(model)
    assert set(edit.tensors) == {name for kv in blocks for name, _ in kv}
    assert all(has_role(n, "text_kv") and uce.touches(n) for n in edit.tensors)
    plan = plan_rows(model, RED, None, None, "to_end", True)
    a = model.adapter
    erase, guides, kept = (a.encode([p for p, _ in plan.pairs]), a.encode([g for _, g in plan.pairs]),
                           a.encode(plan.kept))
    points = probes(model, 2, 0)
    edit.apply(model)
    now = [(block_inputs(model, k, erase, points), block_inputs(model, k, kept, points)) for (_, k), _ in blocks]
    edit.revert(model)
    for ((k_name, k), (v_name, v)), (c_now, p_now) in zip(blocks, now):
        g_old = block_inputs(model, k, guides, points)
        q_old = block_inputs(model, k, kept, points)
        n, at = len(plan.pairs), [list(zip(*rows)) for rows in plan.positions]
        c = torch.cat([c_now[p * n + i, list(at[i][0])] for p in range(2) for i in range(n)])
        g = torch.cat([g_old[p * n + i, list(at[i][1])] for p in range(2) for i in range(n)])
        for name, layer in ((k_name, k), (v_name, v)):
            w_old, w = layer.weight.double(), edit.tensors[name].double()
            grad = objective_gradient(w, w_old, c, g, p_now.flatten(0, 1), q_old.flatten(0, 1), 0.3, 1.0, 1.0)
            scale = (c.T @ c).norm() * w.norm()
            assert_close(grad / scale, torch.zeros_like(grad), 1e-6)
            before = (c @ w_old.T - g @ w_old.T).norm()
            assert (c @ w.T - g @ w_old.T).norm() < before  # the erase rows move toward the guide's K/V


def test_flux_single_stream_blocks_are_never_edited(tiny_flux):
    edit = build_eraser("uce:layers=text-kv,probes=1").fit(tiny_flux, RED, progress=False)
    assert edit.tensors and not any("single_transformer_blocks" in n for n in edit.tensors)
    assert not any(has_role(f"transformer.{n}", "text_kv") for n in denoiser_names(tiny_flux, "text_attention")
                   if n.startswith("single_transformer_blocks"))


def test_rece_refuses_text_kv_and_edits_the_readers(tiny_flux):
    with pytest.raises(SafediffError, match="use layers=readers") as err:
        build_eraser("rece:layers=text-kv").fit(tiny_flux, RED, progress=False)
    assert "\n" not in str(err.value)
    edit = build_eraser("rece:epochs=2").fit(tiny_flux, RED, progress=False)
    assert set(edit.tensors) == set(build_eraser("uce").fit(tiny_flux, RED, progress=False).tensors)
    assert edit.metadata["info"]["chosen_epoch"] == 2


def test_trce_stage_one_reads_every_segments_eot_row(tiny_sd3):
    prompts = ["a red circle", "a photo of a blue square"]
    rows = eot_embeddings(tiny_sd3, prompts)
    cond = tiny_sd3.adapter.encode(prompts)
    clip, t5 = tiny_sd3.adapter.segments
    assert rows.shape == (4, tiny_sd3.adapter.text_dim)
    eot = tiny_sd3.adapter.eos_positions(prompts[:1], clip)[0]
    assert tiny_sd3.adapter.tokenize(prompts[:1], 0)[0, eot] == tiny_sd3.adapter.tokenizers[0].eos_token_id
    assert torch.equal(rows[0], cond.embeds[0, eot])
    assert torch.equal(rows[2], cond.embeds[0, t5.start + 3])  # ▁a ▁red ▁circle </s>
    edit = build_eraser("trce:stages=1").fit(tiny_sd3, RED, progress=False)
    readers = reader_projections(tiny_sd3)
    assert set(edit.tensors) == set(readers["tokens"]) | set(readers["pooled"])


@pytest.mark.parametrize("fixture", ["tiny_sd3", "tiny_flux"])
def test_trained_parameter_sets_follow_the_roles(request, fixture):
    model = request.getfixturevalue(fixture)
    names = [f"transformer.{n}" for n, _ in model.denoiser.named_parameters()]
    x, strict, u = ({n for n in names if in_group(variant_group(v), n)} for v in ("x", "x-strict", "u"))
    assert strict and strict <= x and not x & u
    assert all(".attn.add_k_proj." in n or ".attn.add_v_proj." in n for n in strict)
    assert all(".attn." in n for n in x)
    assert any("single_transformer_blocks" in n for n in x) == (fixture == "tiny_flux")
    assert not any(n.startswith(("transformer.context_embedder.", "transformer.time_text_embed.",
                                 "transformer.proj_out.")) or "_context." in n for n in u)
    assert any(".ff." in n for n in u)
    stage2 = {f"transformer.{n}" for n in denoiser_names(model, "image_attention")}
    assert stage2 and not stage2 & strict and all(".attn.to_" in n or ".attn.norm_" in n for n in stage2)
