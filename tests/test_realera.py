"""RealEra: mined neighbours obey the paper's bounds, the closed form against the per-layer formula, the LoRA noise
alignment trains, resumes bit-identically, and bad bounds are refused."""

import pytest
import torch

from float_bounds import assert_close
from safediff.concepts import resolve
from safediff.erasers.closed_form import kv_projections
from safediff.erasers.prompts import build_rows
from safediff.erasers.realera import NoiseAlignment, RealEra, perturb
from safediff.errors import SafediffError

RED = resolve("red")


def test_mined_embeddings_obey_the_distance_and_cosine_bounds():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(7, 32, generator=g, dtype=torch.float64)
    out = perturb(rows, 3, (0.0, 0.3), (0.95, 0.99), torch.Generator().manual_seed(1))
    base = rows.repeat_interleave(3, dim=0)
    assert out.shape == (21, 32)
    assert ((out - base).norm(dim=1) <= 0.3 * base.norm(dim=1) + 1e-12).all()
    cos = torch.nn.functional.cosine_similarity(out, base, dim=1)
    assert ((cos >= 0.95) & (cos <= 0.99)).all()
    assert torch.equal(out, perturb(rows, 3, (0.0, 0.3), (0.95, 0.99), torch.Generator().manual_seed(1)))
    far = perturb(rows, 2, (0.3, 0.6), (-1.0, 1.0), torch.Generator().manual_seed(2))
    d = (far - rows.repeat_interleave(2, dim=0)).norm(dim=1) / rows.repeat_interleave(2, dim=0).norm(dim=1)
    assert ((d >= 0.3) & (d <= 0.6)).all()
    with pytest.raises(SafediffError):
        perturb(rows, 2, (0.0, 0.01), (0.0, 0.5), torch.Generator().manual_seed(3))  # too close for that cosine


def test_closed_form_matches_the_per_layer_formula(tiny_sd):
    """W₁ = (λW + s_e Σ W g cᵀ + s_p Σ W p pᵀ + s_b Σ W b bᵀ)(λI + s_e Σ c cᵀ + s_p Σ p pᵀ + s_b Σ b bᵀ)⁻¹ over
    the concept rows and their neighbours (c, paired with the concept row's guide g), preserve rows p, beyond rows b."""
    eraser = RealEra(iterations=0, lamb=0.4, erase_scale=1.5, preserve_scale=0.7, beyond_scale=2.0, neighbours=2,
                     beyond=1, seed=5)
    edit = eraser.fit(tiny_sd, RED, progress=False)
    rows = build_rows(tiny_sd, RED, None, None, "to_end", True)
    near, far = eraser.mined(rows.erase, torch.Generator().manual_seed(5))
    c = torch.cat([rows.erase, near])
    guide = torch.cat([rows.guide, rows.guide.repeat_interleave(2, dim=0)])
    d = c.shape[1]
    for name, module in kv_projections(tiny_sd).items():
        w = module.weight.detach().double()
        mat1 = 0.4 * w + 1.5 * (guide @ w.T).T @ c + 0.7 * w @ rows.preserve.T @ rows.preserve + 2.0 * w @ far.T @ far
        mat2 = 0.4 * torch.eye(d, dtype=torch.float64) + 1.5 * c.T @ c + 0.7 * rows.preserve.T @ rows.preserve \
            + 2.0 * far.T @ far
        assert_close(edit.tensors[name].double(), mat1 @ torch.inverse(mat2), 1e-5, relative=True)
    info = edit.metadata["info"]
    assert info["mined_neighbours"] == 2 * len(rows.erase) and info["beyond_rows"] == len(rows.erase)


def test_noise_alignment_lowers_its_loss_on_a_fixed_batch(tiny_sd, monkeypatch):
    """With the draw and the perturbations fixed, Adam on the LoRA lowers the loss."""
    fixed = {}
    draw, moved = NoiseAlignment.draw, NoiseAlignment.moved

    def fixed_draw(self):
        if "draw" not in fixed:
            fixed["draw"] = draw(self)
        return fixed["draw"]

    def fixed_moved(self, j, radius, cosine):
        if radius not in fixed:
            fixed[radius] = moved(self, j, radius, cosine)
        return fixed[radius]

    monkeypatch.setattr(NoiseAlignment, "draw", fixed_draw)
    monkeypatch.setattr(NoiseAlignment, "moved", fixed_moved)
    eraser = RealEra(iterations=15, lr=1e-3, neighbours=1, beyond=1, ddim_steps=3)
    eraser.fit(tiny_sd, RED, progress=False)
    assert len(eraser.losses) == 15 and eraser.losses[-1] < 0.7 * eraser.losses[0]


def test_resume_after_interruption_is_bit_identical(tiny_sd, tmp_path, monkeypatch):
    kwargs = dict(iterations=5, lr=1e-2, neighbours=1, beyond=1, ddim_steps=3, seed=4)
    straight = RealEra(**kwargs).fit(tiny_sd, RED, progress=False)
    ckpt = tmp_path / "realera.safetensors"
    draw = NoiseAlignment.draw
    calls = {"n": 0}

    def interrupted(self):
        calls["n"] += 1
        if calls["n"] == 4:  # during iteration 4, after the checkpoint of iteration 2
            raise KeyboardInterrupt
        return draw(self)

    monkeypatch.setattr(NoiseAlignment, "draw", interrupted)
    with pytest.raises(KeyboardInterrupt):
        RealEra(**kwargs, checkpoint=str(ckpt), checkpoint_every=2).fit(tiny_sd, RED, progress=False)
    monkeypatch.setattr(NoiseAlignment, "draw", draw)
    resumed = RealEra(**kwargs, checkpoint=str(ckpt), checkpoint_every=2).fit(tiny_sd, RED, progress=False)
    assert resumed.metadata["info"]["resumed_at_iteration"] == 2
    assert set(resumed.tensors) == set(straight.tensors)
    assert all(torch.equal(resumed.tensors[k], straight.tensors[k]) for k in straight.tensors)


@pytest.mark.parametrize("bad", [{"cos_low": 0.99, "cos_high": 0.9}, {"beyond_distance": 0.2},
                                 {"tokens": "surrounding"}, {"neighbours": -1}])
def test_bad_bounds_are_one_clear_error(bad):
    with pytest.raises(SafediffError):
        RealEra(**bad)
