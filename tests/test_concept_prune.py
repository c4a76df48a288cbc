"""ConceptPrune: the skilled-neuron rule against a loop over rows, the column norms, and what the edit zeroes."""

import pytest
import torch

from safediff.concepts import resolve
from safediff.erasers.concept_prune import ColumnNorms, ConceptPrune, evenly, ffn_layers, skilled
from safediff.errors import SafediffError


def brute_force(w, on, off, rho, tau):
    """Row by row, step by step: the ⌊ρ d⌋ largest concept scores of the row that beat the base score."""
    k = int(rho * w.shape[1])
    counts = torch.zeros(w.shape, dtype=torch.int64)
    for t in range(len(on)):
        for i in range(w.shape[0]):
            s_on, s_off = w[i] * on[t], w[i] * off[t]
            for j in sorted(range(w.shape[1]), key=lambda j: -float(s_on[j]))[:k]:
                counts[i, j] += int(s_on[j] > s_off[j])
    return counts > tau * len(on)


@pytest.mark.parametrize("rho,tau", [(0.25, 0.0), (0.5, 0.4), (0.125, 0.99)])
def test_skilled_neurons_match_the_rule_row_by_row(rho, tau):
    g = torch.Generator().manual_seed(0)
    w = torch.rand(5, 16, generator=g, dtype=torch.float64)
    on, off = torch.rand(4, 16, generator=g, dtype=torch.float64), torch.rand(4, 16, generator=g, dtype=torch.float64)
    assert torch.equal(skilled(w, on, off, rho, tau), brute_force(w, on, off, rho, tau))


def test_higher_selection_ratio_prunes_a_subset():
    g = torch.Generator().manual_seed(1)
    w = torch.rand(6, 20, generator=g, dtype=torch.float64)
    on, off = torch.rand(8, 20, generator=g, dtype=torch.float64), torch.rand(8, 20, generator=g, dtype=torch.float64)
    union, half = skilled(w, on, off, 0.2, 0.0), skilled(w, on, off, 0.2, 0.5)
    assert half.any() and not (half & ~union).any() and union.sum() > half.sum()
    assert not skilled(w, on, off, 0.2, 1.0).any()  # more than T steps: never
    assert not skilled(w, on, off, 0.0, 0.0).any()  # ρ = 0: nothing


def test_column_norms_of_unit_rows():
    """‖X_j‖ over rows normalised to unit length, accumulated per step, as the reference's ColumnNormCalculator."""
    layer = torch.nn.Linear(6, 3)
    norms = ColumnNorms({"ff": layer}, steps=2)
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(2, 4, 6, generator=g), torch.randn(3, 6, generator=g)
    with norms.recording():
        layer(x0)
        norms.step = 1
        layer(x1)
        layer(x1)
    assert not layer._forward_pre_hooks
    unit0 = torch.nn.functional.normalize(x0.reshape(-1, 6).double(), dim=1)
    unit1 = torch.nn.functional.normalize(x1.double(), dim=1)
    assert torch.allclose(norms.norms("ff")[0], unit0.norm(dim=0))
    assert torch.allclose(norms.norms("ff")[1], (2 * unit1 ** 2).sum(0).sqrt())


def test_evenly_spaced_prompts():
    assert evenly(list(range(10)), 4) == [0, 3, 6, 9] and evenly([1, 2], 5) == [1, 2] and evenly([1, 2], None) == [1, 2]


def test_edit_zeroes_ffn_output_weights_only(tiny_sd):
    eraser = ConceptPrune(skill_ratio=0.1, max_prompts=3, steps=3)
    edit = eraser.fit(tiny_sd, resolve("red"), progress=False)
    layers = {f"unet.{n}.weight": m for n, m in ffn_layers(tiny_sd.unet).items()}
    assert edit.tensors and set(edit.tensors) <= set(layers)
    for name, new in edit.tensors.items():
        old = layers[name].weight.detach()
        zeroed = new == 0
        assert torch.equal(new[~zeroed], old[~zeroed]) and zeroed.any(), name
        assert zeroed.sum(1).max() <= 3 * int(0.1 * old.shape[1])  # at most ⌊ρ d⌋ per row per step, T = 3 steps
    info = edit.metadata["info"]
    assert info["pruned_weights"] == sum(int((t == 0).sum()) for t in edit.tensors.values())
    assert info["steps"] == 3 and info["prompt_pairs"] == 3


def test_multi_concept_edit_is_the_union(tiny_sd):
    kw = dict(skill_ratio=0.1, max_prompts=2, steps=2)
    red = ConceptPrune(**kw).fit(tiny_sd, resolve("red"), progress=False)
    circle = ConceptPrune(**kw).fit(tiny_sd, resolve("circle"), progress=False)
    both = ConceptPrune(**kw).fit(tiny_sd, resolve("red,circle"), progress=False)
    for name, t in both.tensors.items():
        want = torch.zeros_like(t, dtype=torch.bool)
        for e in (red, circle):
            if name in e.tensors:
                want |= e.tensors[name] == 0
        assert torch.equal(t == 0, want), name


def test_bad_ratio_is_one_clear_error():
    with pytest.raises(SafediffError):
        ConceptPrune(skill_ratio=1.5)
