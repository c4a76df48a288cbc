"""UCE: parity with the paper's per-layer formula, K/V mapping properties, token rows, no-op, SDXL, bad concepts."""

import pytest
import torch

from float_bounds import assert_close
from safediff.erasers import build_eraser
from safediff.concepts import Concept, resolve
from safediff.errors import SafediffError
from safediff.erasers.closed_form import kv_projections
from safediff.erasers.prompts import WordFinder, aligned_rows, build_rows
from safediff.erasers.uce import UCE


def kv_snapshot(model):
    return {n: m.weight.detach().clone() for n, m in kv_projections(model).items()}


def full_snapshot(model):
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder", "vae")
            for k, v in getattr(model.pipe, c).state_dict().items()}


def test_matches_the_per_layer_formula_of_the_paper(tiny_sd):
    """Independent reference: for each W, (λW + s_e Σ v* cᵀ + s_p Σ W c_j c_jᵀ)(λI + s_e Σ c cᵀ + s_p Σ c_j c_jᵀ)⁻¹."""
    eraser = UCE(lamb=0.3, erase_scale=2.0, preserve_scale=0.7)
    concepts = resolve("red")
    rows = build_rows(tiny_sd, concepts, None, None, "to_end", True)
    edit = eraser.fit(tiny_sd, concepts, progress=False)
    d = rows.erase.shape[1]
    for name, w in kv_snapshot(tiny_sd).items():
        w = w.double()
        v_star = rows.guide @ w.T  # v_i* = W_old c_i^guide, one per row
        mat1 = 0.3 * w + 2.0 * sum(torch.outer(v, c) for v, c in zip(v_star, rows.erase)) \
            + 0.7 * sum(torch.outer(w @ c, c) for c in rows.preserve)
        mat2 = 0.3 * torch.eye(d, dtype=torch.float64) + 2.0 * rows.erase.T @ rows.erase \
            + 0.7 * rows.preserve.T @ rows.preserve
        want = mat1 @ torch.inverse(mat2)
        got = edit.tensors[name].double()
        assert_close(got, want, 1e-5, relative=True)


def test_touches_only_cross_attention_kv_and_leaves_the_model_alone(tiny_sd):
    before = full_snapshot(tiny_sd)
    edit = UCE().fit(tiny_sd, resolve("red"), progress=False)
    after = full_snapshot(tiny_sd)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert set(edit.tensors) == set(kv_projections(tiny_sd)) and len(edit.tensors) > 0
    assert all(".attn2.to_k." in n or ".attn2.to_v." in n for n in edit.tensors)
    assert all(t.dtype == tiny_sd.dtype for t in edit.tensors.values())


def test_concept_kv_move_to_the_guide_and_preserved_kv_stay(tiny_sd):
    """With room to satisfy both (one erase row per word), the concept's K/V become the guide's, preserved K/V stay."""
    concepts = resolve("red")
    rows = build_rows(tiny_sd, concepts, None, [], "last", False)
    assert rows.erase.shape[0] == 1  # "red" alone, its last token, paired with BOS of ""
    old = {n: w.double() for n, w in kv_snapshot(tiny_sd).items()}
    edit = UCE(lamb=0.01, tokens="last", expand_prompts=False).fit(tiny_sd, concepts, preserve=[], progress=False)
    for name, w in old.items():
        new = edit.tensors[name].double()
        target = rows.guide @ w.T
        before = (rows.erase @ w.T - target).norm()
        after = (rows.erase @ new.T - target).norm()
        assert after < 0.05 * before, name
        drift = (rows.preserve @ new.T - rows.preserve @ w.T).norm() / (rows.preserve @ w.T).norm()
        assert drift < 0.05, name


def test_default_edit_minimises_the_uce_objective(tiny_sd):
    """Default rows (more than the text width): W_new is the minimiser, so any perturbation costs more."""
    concepts = resolve("red")
    rows = build_rows(tiny_sd, concepts, None, None, "to_end", True)
    edit = UCE().fit(tiny_sd, concepts, progress=False)
    gen = torch.Generator().manual_seed(0)
    for name, w in list(kv_snapshot(tiny_sd).items())[:4]:
        w = w.double()

        def objective(m):
            return (((rows.erase @ m.T - rows.guide @ w.T) ** 2).sum() + ((rows.preserve @ (m - w).T) ** 2).sum()
                    + 0.5 * ((m - w) ** 2).sum())

        new = edit.tensors[name].double()
        best = objective(new)
        assert best < objective(w)
        for _ in range(3):
            bump = torch.randn(w.shape, generator=gen, dtype=torch.float64) * 1e-3 * w.abs().mean()
            assert objective(new + bump) > best


def test_erase_scale_zero_is_a_no_op(tiny_sd):
    old = kv_snapshot(tiny_sd)
    edit = UCE(erase_scale=0.0).fit(tiny_sd, resolve("red"), progress=False)
    for name, t in edit.tensors.items():
        assert_close(t, old[name], 1e-6)
    edit.apply(tiny_sd)
    for name, m in kv_projections(tiny_sd).items():
        assert_close(m.weight, old[name], 1e-6)


def test_token_rows_follow_the_reference_conventions(tiny_sd):
    tok = tiny_sd.adapter.tokenizers[0]
    finder = WordFinder(tok)
    red = finder.ids("red")  # byte tokens r, e, d</w>
    # "a red circle": BOS a r e d</w> c i r c l e</w> EOS pad…  guide "a circle": BOS a c i r c l e</w> EOS …
    pairs = aligned_rows(finder, "a red circle", "a circle", red, 0, "to_end", 77)
    assert pairs[0] == (4, 1)  # the word's last token meets the token before it in the guide prompt
    assert pairs[1] == (5, 2) and pairs[7] == (11, 8)  # the rest, EoT included, keeps its place after the word
    assert pairs[8] == (12, 12) and pairs[-1] == (76, 76)  # padding meets the guide's padding at the same position
    shifted = aligned_rows(finder, "a red circle", "a circle", red, 0, "to_end", 77, padding="shifted")
    assert shifted[:8] == pairs[:8] and shifted[8] == (12, 9) and shifted[-1] == (76, 73)  # the 2023 pairing
    assert aligned_rows(finder, "a red circle", "a circle", red, 0, "last", 77) == [(4, 1)]
    # the word alone and guide "" pair from the word's last token with BOS (both reference scripts)
    assert aligned_rows(finder, "red", "", red, 0, "to_end", 77)[0] == (3, 0)
    # every occurrence, whole words only
    # BOS r e d</w> a n d</w> r e d</w> EOS  vs  BOS a n d</w> EOS
    assert aligned_rows(finder, "red and red", "and", red, 0, "last", 77) == [(3, 0), (9, 3)]
    assert aligned_rows(finder, "a hundred circles", "a hundred circles", red, 0, "to_end", 77) == []
    # a guide of another length shifts the rows after the word
    blue = len(finder.ids("blue"))
    assert aligned_rows(finder, "a red circle", "a blue circle", red, blue, "to_end", 77)[:2] == [(4, 5), (5, 6)]


def test_synonyms_are_not_erased_unless_given(tiny_sd):
    red = resolve("red")[0]
    assert red.synonyms  # the sandbox concept knows them, the eraser must not use them
    plain = UCE().fit(tiny_sd, [red], progress=False)
    assert plain.metadata["info"]["erase_words"] == ["red"]
    more = UCE(also_erase=("crimson",)).fit(tiny_sd, [red], progress=False)
    assert more.metadata["info"]["erase_words"] == ["red", "crimson"]
    assert more.metadata["hyperparameters"]["also_erase"] == ["crimson"]


def test_preserve_prompts_never_contain_the_erased_word(tiny_sd):
    rows = build_rows(tiny_sd, resolve("triangle"), None, ["green", "a triangle of green"], "to_end", True)
    assert "" in rows.info["examples"]["preserve"]
    assert not any("triangle" in p for p in rows.info["examples"]["preserve"])
    assert rows.info["prompts"]["preserve"] > 1


def test_sdxl_edits_every_kv_on_the_concatenated_embeddings(tiny_sdxl):
    assert tiny_sdxl.adapter.text_dim == 64  # 32 + 32: both encoders feed the same K/V
    edit = UCE().fit(tiny_sdxl, resolve("red"), progress=False)
    assert set(edit.tensors) == set(kv_projections(tiny_sdxl))
    assert all(t.shape[1] == 64 for t in edit.tensors.values())
    edit.apply(tiny_sdxl)
    edit.revert(tiny_sdxl)


@pytest.mark.parametrize("word", ["<|endoftext|>", "   ", "<|startoftext|> <|endoftext|>"])
def test_a_concept_that_encodes_to_no_tokens_is_a_clear_error(tiny_sd, word):
    with pytest.raises(SafediffError, match="encodes to no tokens"):
        UCE().fit(tiny_sd, [Concept(word, (word,))], progress=False)


def test_bad_hyperparameters_are_user_errors(tiny_sd):
    with pytest.raises(SafediffError, match="token convention"):
        UCE(tokens="middle").fit(tiny_sd, resolve("red"), progress=False)
    with pytest.raises(SafediffError, match="unknown option"):
        build_eraser("uce:lambda=1")
    with pytest.raises(SafediffError, match="not a valid finite number"):
        build_eraser("uce:lamb=big")
    e = build_eraser("uce:lamb=0.2,expand_prompts=false,also_erase=crimson; scarlet")
    assert (e.lamb, e.expand_prompts, e.also_erase) == (0.2, False, ("crimson", "scarlet"))
