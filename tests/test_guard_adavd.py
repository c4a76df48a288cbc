"""AdaVD: the value decomposition against per-token recomputation, its projection limit, and the guard's hooks."""

import pytest
import torch

from guard_checks import pipeline_state
from safediff.guards import build_guard
from safediff.guards.adavd import AdaVDParams, decompose, gram_schmidt, shift_factor
from safediff.errors import SafediffError
from safediff.sampling import generate

PAPER = AdaVDParams(a=100.0, b=0.93, c=2.0, decomp_timestep=0)


def test_one_target_matches_the_per_token_rule():
    """v' = v − σ(cos(v, t)) (vᵀt / tᵀt) t at every position but BOS, token by token."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(1, 8, generator=g)
    v = torch.randn(2, 5, 8, generator=g)
    v[0, 2] = 3.0 * t[0] + 0.01 * v[0, 2]  # a value close to the target
    got = decompose(v, t, PAPER)
    for b in range(2):
        assert torch.equal(got[b, 0], v[b, 0])
        for pos in range(1, 5):
            x = v[b, pos].double()
            cos = torch.dot(x, t[0].double()) / (x.norm() * t[0].double().norm())
            sigma = 2.0 / (1.0 + torch.exp(-100.0 * (cos - 0.93)))
            want = x - sigma * torch.dot(x, t[0].double()) / torch.dot(t[0].double(), t[0].double()) * t[0].double()
            assert torch.allclose(got[b, pos].double(), want, atol=1e-5)
    near = got[0, 2].double()
    assert (near + v[0, 2]).norm() < 0.02 * near.norm()  # cos ≈ 1: σ ≈ c = 2, the value is reflected


def test_unit_shift_factor_is_the_orthogonal_complement():
    """With σ ≡ 1 (a = 0, c = 2) the multi-target rule projects onto the complement of span{t_i}."""
    g = torch.Generator().manual_seed(1)
    t = torch.randn(3, 10, generator=g, dtype=torch.float64)
    v = torch.randn(4, 6, 10, generator=g, dtype=torch.float64)
    got = decompose(v, t, AdaVDParams(a=0.0, b=0.0, c=2.0, decomp_timestep=0)).double()
    q, _ = torch.linalg.qr(t.T)
    want = v - (v @ q) @ q.T
    assert torch.allclose(got[:, 1:], want[:, 1:], atol=1e-4)
    assert (got[:, 1:] @ t.T).abs().max() < 1e-3


def test_gram_schmidt_orthogonalises_and_drops_repeats():
    t = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [2.0, 2.0, 0.0]], dtype=torch.float64)
    g, keep = gram_schmidt(t)
    u = g @ t
    assert keep.tolist() == [True, True, False]
    assert abs(float(u[0] @ u[1])) < 1e-12 and torch.allclose(torch.tril(g), g)
    v = torch.randn(1, 3, 3)
    assert torch.isfinite(decompose(v, t.float(), PAPER)).all()


def test_shift_factor_is_the_reference_sigmoid():
    cos = torch.tensor([0.93, 1.0, 0.0])
    assert torch.allclose(shift_factor(cos, PAPER), 2.0 / (1.0 + torch.exp(-100.0 * (cos - 0.93))))
    assert float(shift_factor(cos, PAPER)[0]) == pytest.approx(1.0)


def test_guard_changes_values_only_during_the_loop_and_skips_late_timesteps(tiny_sd):
    prompts, seeds = ["a red circle"], [5]
    before = pipeline_state(tiny_sd)
    plain = generate(tiny_sd, prompts, seeds, steps=6, progress=False)
    guarded = generate(tiny_sd, prompts, seeds, steps=6, guard=build_guard("adavd:paper,b=0.5", "red"),
                       progress=False)
    assert (guarded.latents - plain.latents).abs().max() > 1e-3
    assert pipeline_state(tiny_sd) == before  # hooks removed
    skipped = generate(tiny_sd, prompts, seeds, steps=6, guard=build_guard("adavd:paper,decomp_timestep=999", "red"),
                       progress=False)
    assert torch.equal(skipped.latents, plain.latents)  # every timestep <= 999: nothing decomposed


def test_config_and_bad_options():
    g = build_guard("adavd", "red,circle")
    assert g.config()["keywords"] == ["red", "circle"] and g.config()["c"] == 2.0
    with pytest.raises(SafediffError):
        build_guard("adavd:paper,c=-1", "red")
    with pytest.raises(SafediffError):
        build_guard("adavd:strong", "red")
