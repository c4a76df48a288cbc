"""SPEED: the null-space update against an independent reduced-coordinate solve, its invariants, the fitted edit."""

import pytest
import torch

from safediff.concepts import resolve
from safediff.erasers.closed_form import kv_projections, null_space_delta, null_space_projector, reader_projections
from safediff.erasers.prompts import build_rows, encode_prompts, last_token_rows, preserve_prompts
from safediff.erasers.speed import SPEED, kmeans
from safediff.errors import SafediffError

D, OUT = 12, 7


def problem(seed=0, n_retain=5, n_inv=2):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    w, c_t, c_a = r(OUT, D), r(3, D), r(3, D)
    retain, invariants = r(n_retain, D), r(D, n_inv)
    return w, c_t, c_a, retain, invariants


def reduced_solve(w, c_t, c_a, projector, invariants, alpha):
    """min_X ‖X C_tᵀ − W (C_a − C_t)ᵀ‖² + α‖X‖² over X with rows in range(P) and X K = 0, in coordinates of an
    orthonormal basis of that feasible row space (ridge regression there)."""
    values, vectors = torch.linalg.eigh(projector)
    u = vectors[:, values > 0.5]  # range(P)
    q, s, _ = torch.linalg.svd(u.T @ invariants, full_matrices=True)
    v = q[:, (s > 1e-9).sum():]  # directions of range(P) orthogonal to every invariant
    basis = u @ v
    r = w @ (c_a - c_t).T
    z = torch.linalg.solve(basis.T @ c_t.T @ c_t @ basis + alpha * torch.eye(basis.shape[1], dtype=torch.float64),
                           (r @ c_t @ basis).T).T
    return z @ basis.T


def test_update_is_the_constrained_minimiser():
    """Δ = W(S_at − S_tt)P(I − MK(KᵀPMK)⁻¹KᵀP)M equals the ridge solution on the feasible rows (λ = 0)."""
    w, c_t, c_a, retain, invariants = problem()
    p = null_space_projector(retain.T @ retain, 1e-8)
    got = null_space_delta(w, c_t.T @ c_t, c_a.T @ c_t, p, invariants, 0.7, 0.0)
    want = reduced_solve(w, c_t, c_a, p, invariants, 0.7)
    assert torch.allclose(got, want, atol=1e-9)


def test_retained_and_invariant_rows_keep_their_image():
    w, c_t, c_a, retain, invariants = problem(1)
    p = null_space_projector(retain.T @ retain, 1e-8)
    delta = null_space_delta(w, c_t.T @ c_t, c_a.T @ c_t, p, invariants, 1.0, 0.0)
    assert (delta @ retain.T).abs().max() < 1e-9  # retain rows: Δ r = 0
    assert (delta @ invariants).abs().max() < 1e-9  # IEC: Δ K = 0
    assert delta.abs().max() > 1e-3
    soft = null_space_delta(w, c_t.T @ c_t, c_a.T @ c_t, p, invariants, 1.0, 1e6)  # λ large: constraint released
    free = null_space_delta(w, c_t.T @ c_t, c_a.T @ c_t, p, invariants[:, :0], 1.0, 0.0)
    assert torch.allclose(soft, free, atol=1e-5)


def test_without_retain_or_invariants_it_is_ridge_regression():
    """P = I, no K: Δ = W (S_at − S_tt)(S_tt + α I)⁻¹."""
    w, c_t, c_a, _, _ = problem(2)
    s_tt, s_at = c_t.T @ c_t, c_a.T @ c_t
    got = null_space_delta(w, s_tt, s_at, torch.eye(D, dtype=torch.float64), torch.zeros(D, 0, dtype=torch.float64),
                           0.5, 0.0)
    want = w @ (s_at - s_tt) @ torch.linalg.inv(s_tt + 0.5 * torch.eye(D, dtype=torch.float64))
    assert torch.allclose(got, want, atol=1e-10)


def test_projector_spans_the_small_eigenvalues():
    _, _, _, retain, _ = problem(3, n_retain=4)
    p = null_space_projector(retain.T @ retain, 1e-8)
    assert torch.allclose(p @ p, p, atol=1e-10) and round(float(torch.trace(p))) == D - 4
    assert (p @ retain.T).abs().max() < 1e-9


def test_kmeans_is_deterministic_and_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    rows = torch.cat([torch.randn(10, 3, generator=g, dtype=torch.float64) * 0.01 + c for c in (0.0, 5.0, 10.0)])
    centres = kmeans(rows, 3)
    assert torch.equal(centres, kmeans(rows, 3))
    assert sorted(round(float(c.mean())) for c in centres) == [0, 5, 10]


@pytest.mark.parametrize("arch", ["tiny_sd", "tiny_sd3", "tiny_flux"])
def test_fit_keeps_retained_concepts_and_invariants_and_moves_the_concept(request, arch):
    """No filtering or augmentation, a tiny threshold: every retain row and every invariant keeps its value (UNet:
    the cross-attention K/V; SD3/FLUX: the context embedder, over every segment's rows)."""
    model = request.getfixturevalue(arch)
    concepts = resolve("red")
    eraser = SPEED(params="KV", filter=False, n_aug=0, threshold=1e-10)
    edit = eraser.fit(model, concepts, progress=False)
    rows = build_rows(model, concepts, None, [], "last", False)
    kept = preserve_prompts(list(concepts[0].preserve), ["red"], False)
    retain = last_token_rows(model, kept)
    assert len(retain) == len(kept) * len(model.adapter.segments)
    empty = encode_prompts(model, [""])[0]
    invariants = torch.cat([empty[:1], kmeans(empty[1:], 3)])
    projections = kv_projections(model) if arch == "tiny_sd" else reader_projections(model)["tokens"]
    assert set(edit.tensors) == set(projections)
    for name, module in projections.items():
        old, new = module.weight.detach().double(), edit.tensors[name].double()
        delta = new - old
        assert (retain @ delta.T).abs().max() <= 1e-4 * (retain @ old.T).abs().max(), name
        assert (invariants @ delta.T).abs().max() <= 1e-4 * (invariants @ old.T).abs().max(), name
        target = rows.guide @ old.T
        assert (rows.erase @ new.T - target).norm() < (rows.erase @ old.T - target).norm(), name


def test_on_a_transformer_it_edits_the_context_embedder_only(tiny_sd3):
    edit = SPEED(params="V").fit(tiny_sd3, resolve("red"), progress=False)
    assert set(edit.tensors) == {"transformer.context_embedder.weight"}
    assert SPEED().touches("transformer.context_embedder.weight")
    assert not SPEED().touches("transformer.transformer_blocks.0.attn.add_v_proj.weight")


def test_default_edits_values_only_and_takes_many_concepts(tiny_sd):
    edit = SPEED().fit(tiny_sd, resolve("red,circle,striped"), progress=False)
    assert edit.tensors and all(".attn2.to_v." in n for n in edit.tensors)
    assert edit.metadata["info"]["erase_words"] == ["red", "circle", "striped"]


@pytest.mark.parametrize("bad", [{"params": "Q"}, {"retain_scale": 0.0}, {"threshold": -1.0}, {"tokens": "all"}])
def test_bad_options_are_one_clear_error(bad):
    with pytest.raises(SafediffError):
        SPEED(**bad)


def test_to_end_rows_take_the_word_and_every_later_row_and_keep_those_of_retained_prompts(tiny_sd):
    concepts = resolve("red")
    kept = preserve_prompts(list(concepts[0].preserve), ["red"], False)
    positions = [int(p) for p in tiny_sd.adapter.eos_positions(kept) - 1]
    length = tiny_sd.adapter.segments[0].length
    retain = last_token_rows(tiny_sd, kept, to_end=True)
    assert len(retain) == sum(length - max(p, 0) for p in positions) > len(last_token_rows(tiny_sd, kept))
    assert torch.equal(retain[0], last_token_rows(tiny_sd, kept[:1])[0])  # each prompt's block starts at its last token
    eraser = SPEED(params="KV", filter=False, n_aug=0, threshold=1e-10, tokens="to_end")
    edit = eraser.fit(tiny_sd, concepts, progress=False)
    assert edit.metadata["info"]["token_convention"] == "to_end"
    assert len(build_rows(tiny_sd, concepts, None, [], "to_end", False).erase) > \
        len(build_rows(tiny_sd, concepts, None, [], "last", False).erase)
    for name, module in kv_projections(tiny_sd).items():
        old = module.weight.detach().double()
        delta = edit.tensors[name].double() - old
        assert (retain @ delta.T).abs().max() <= 1e-4 * (retain @ old.T).abs().max(), name
