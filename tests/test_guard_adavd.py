"""AdaVD: the value decomposition against per-token recomputation, its projection limit, and the guard's hooks."""

import pytest
import torch

from guard_checks import pipeline_state
from safediff.guards import build_guard
from safediff.guards.adavd import AdaVDParams, bos_positions, decompose, gram_schmidt, hooked_layers, shift_factor
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


def test_gradients_through_the_rule_are_finite_far_from_the_targets():
    """Attacks (concept inversion) differentiate through the guard: a value anti-aligned with its target puts
    exp(−a (cos − b)) = exp(193) beyond float32, and the quotient form of σ then had a NaN gradient."""
    t = torch.tensor([[1.0, 0.0, 0.0]])
    v = torch.tensor([[[0.0, 1.0, 0.0], [-1.0, 0.2, 0.0], [1.0, 0.01, 0.0]]], requires_grad=True)
    decompose(v, t, PAPER, fixed=()).square().sum().backward()
    assert torch.isfinite(v.grad).all()


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


def test_fixed_positions_are_left_alone():
    g = torch.Generator().manual_seed(2)
    t, v = torch.randn(1, 8, generator=g), torch.randn(2, 6, 8, generator=g)
    v[:, 3] = 2.0 * t[0]
    unit = AdaVDParams(a=0.0, b=0.0, c=2.0, decomp_timestep=0)  # σ ≡ 1: every other position is projected
    got = decompose(v, t, unit, fixed=(0, 3))
    assert torch.equal(got[:, [0, 3]], v[:, [0, 3]])
    assert (got[:, [1, 2, 4, 5]] @ t[0]).abs().max() < 1e-4 * (v @ t[0]).abs().max()
    assert (decompose(v, t, unit, fixed=())[:, 0] @ t[0]).abs().max() < 1e-4 * (v @ t[0]).abs().max()


def test_on_a_transformer_readers_space_hooks_the_context_embedder_and_keeps_bos(tiny_sd3, tiny_flux):
    """SD3/FLUX: ``space=readers`` decomposes the context embedder's output (SD3 keeps CLIP's BOS at 0; FLUX's T5
    has no BOS); UNet readers are the cross-attention K and V."""
    for model in (tiny_sd3, tiny_flux):
        assert hooked_layers(model.adapter, "readers") == [model.denoiser.context_embedder]
    assert bos_positions(tiny_sd3.adapter) == (0,) and bos_positions(tiny_flux.adapter) == ()
    seen = []
    handle = tiny_sd3.denoiser.context_embedder.register_forward_hook(lambda m, a, out: seen.append(out.clone()))
    try:
        plain = generate(tiny_sd3, ["a red circle"], [5], steps=3, progress=False)
        n_plain = len(seen)
        guarded = generate(tiny_sd3, ["a red circle"], [5], steps=3, progress=False,
                           guard=build_guard("adavd:paper,space=readers,b=0.5", "red"))
    finally:
        handle.remove()
    assert (guarded.latents - plain.latents).abs().max() > 1e-3
    assert len(seen) == 2 * n_plain
    with pytest.raises(SafediffError, match="space=readers"):
        generate(tiny_sd3, ["a red circle"], [5], steps=2, guard=build_guard("adavd", "red"), progress=False)


def test_config_and_bad_options():
    g = build_guard("adavd", "red,circle")
    assert g.config()["keywords"] == ["red", "circle"] and g.config()["c"] == 2.0
    with pytest.raises(SafediffError):
        build_guard("adavd:paper,c=-1", "red")
    with pytest.raises(SafediffError):
        build_guard("adavd:strong", "red")
    with pytest.raises(SafediffError, match="space"):
        build_guard("adavd:paper,space=keys", "red")
