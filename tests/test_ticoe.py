"""TICoE (Li et al., CVPR 2026) on tiny random models: HVRL's multi-scale fusion and position embeddings against an
independent recomputation, the CCCM mixture, a zero negative-guidance gap changing nothing, the edit's scope."""

import math

import pytest
import torch

from safediff.adapters import Conditioning
from safediff.concepts import Concept, resolve
from safediff.erasers import build_eraser, ticoe
from safediff.erasers.ticoe import HVRL, TICoE, bank_prompts, mixture, sinusoidal
from safediff.errors import SafediffError
from safediff.registry import ERASERS

FAST = dict(iterations=2, lr=1e-3, n_images=2, resample_every=1)


def test_position_embeddings_are_the_transformer_sinusoids():
    pe = sinusoidal(6, 4)
    for p in range(6):
        for i in range(2):
            angle = p / 10000 ** (2 * i / 4)
            assert pe[p, 2 * i] == pytest.approx(math.sin(angle), abs=1e-6)
            assert pe[p, 2 * i + 1] == pytest.approx(math.cos(angle), abs=1e-6)


def test_hvrl_fuses_the_three_scales_and_is_the_identity_without_residual():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    h = HVRL(4, heads=4, depth=1, scales=(1.0, 0.75, 0.5), residual=0.5).eval()
    seen = []
    h.layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    out = h(x)
    assert out.shape == x.shape and seen[0] == (2, 64 + 36 + 16, 4)
    # independently: tokens of the three scales plus positions, the first 64 through the layer
    tokens = torch.cat([torch.nn.functional.interpolate(x, size=(int(8 * s), int(8 * s)), mode="bilinear",
                                                        align_corners=False).flatten(2).transpose(1, 2)
                        for s in (1.0, 0.75, 0.5)], 1) + sinusoidal(116, 4)
    expected = x + 0.5 * h.layers[0](tokens)[:, :64].transpose(1, 2).reshape(2, 4, 8, 8)
    assert torch.allclose(out, expected, atol=1e-6)
    h.residual = 0.0
    assert torch.equal(h(x), x)
    with pytest.raises(SafediffError):
        HVRL(6, heads=4, depth=1, scales=(1.0,), residual=0.5)


def test_cccm_is_a_layer_normalised_convex_mixture():
    bank = Conditioning(torch.randn(3, 5, 8) * 3 + 1)
    ln = torch.nn.functional.layer_norm
    one_hot = mixture(bank, torch.tensor([0.0, 1.0, 0.0]), torch.zeros(1, 5, 8))
    assert torch.allclose(one_hot.embeds[0], ln(ln(bank.embeds[1], (8,)), (8,)), atol=1e-5)
    w = torch.tensor([0.2, 0.5, 0.3])
    mixed = mixture(bank, w, torch.zeros(1, 5, 8))
    expected = ln((w.view(3, 1, 1) * ln(bank.embeds, (8,))).sum(0), (8,))
    assert torch.allclose(mixed.embeds[0], expected, atol=1e-5)
    row = mixed.embeds[0]
    assert torch.allclose(row.mean(-1), torch.zeros(5), atol=1e-5)


def test_the_bank_is_the_keyword_alone_and_in_its_contexts():
    bank = bank_prompts(resolve("red")[0])
    assert bank[0] == "red" and "a red circle" in bank and all("red" in p.split() for p in bank)


def test_first_loss_is_the_negative_guidance_target_on_the_fused_latent(tiny_sd, monkeypatch):
    calls = []
    real = ticoe.denoiser_output

    def recording(model, x, t, cond, params=None):
        calls.append((x.detach().clone(), t, cond))
        return real(model, x, t, cond, params)

    monkeypatch.setattr(ticoe, "denoiser_output", recording)
    eraser = TICoE(iterations=1, lr=1e-3, n_images=1, negative_guidance=2.0)
    eraser.fit(tiny_sd, resolve("red"), progress=False)
    fused, t, both = calls[0]  # the frozen model's call: [x̃, x̃] under [e_c, ∅]
    with torch.no_grad():
        e_c = real(tiny_sd, fused[:1], t, both[:1])
        e_u = real(tiny_sd, fused[:1], t, both[1:])
    # θ = θ* at the first step: the prediction is ε(x̃, e_c), the target ε(x̃, ∅) − η (ε(x̃, e_c) − ε(x̃, ∅))
    expected = (1 + 2.0) ** 2 * torch.nn.functional.mse_loss(e_c, e_u)
    assert eraser.losses[0] == pytest.approx(float(expected), rel=1e-3)


def test_every_unet_weight_is_trained_and_hvrl_stays_out_of_the_edit(tiny_sd):
    eraser = TICoE(**FAST)
    edit = eraser.fit(tiny_sd, resolve("red") + resolve("blue"), progress=False)
    assert edit.tensors and all(n.startswith("unet.") for n in edit.tensors)
    assert any(".attn1." in n for n in edit.tensors) and any("conv_in" in n for n in edit.tensors)
    assert edit.metadata["info"]["hvrl_parameters"] > 0 and len(edit.metadata["info"]["banks"]) == 2


def test_registry_and_bad_input(tiny_sd, tmp_path):
    assert ERASERS.get("ticoe") is TICoE
    assert build_eraser("ticoe:scales=1.0;0.5").scale_values == (1.0, 0.5)
    for bad in ({"scales": ("0.5", "1.0")}, {"scales": ("1.0", "x")}, {"temperature": 0.0}):
        with pytest.raises(SafediffError):
            TICoE(**bad)
    with pytest.raises(SafediffError, match="one concept"):
        TICoE(images=str(tmp_path), **FAST).fit(tiny_sd, resolve("red") + resolve("blue"), progress=False)
    with pytest.raises(SafediffError):
        TICoE(**FAST).fit(tiny_sd, [Concept("x", ("",))], progress=False)
