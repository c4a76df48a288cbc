"""DoCo: the concept-preserving gradient removes exactly the conflicting component (the reference's unit-vector
variant as the code writes it), x̂₀ inverts the forward process, the discriminator fits any latent size, warm-up
trains the discriminator alone, resume, bad input."""

import pytest
import torch

from safediff.concepts import resolve
from safediff.erasers.doco import DoCo, DoCoRun, PatchDiscriminator, adjusted, discriminator_blocks, predicted_x0
from safediff.errors import SafediffError

RED = resolve("red")
SMALL = dict(iterations=4, warmup=1, n_images=4, batch=2, lr=1e-2, d_lr=1e-3, seed=3)


def test_projection_removes_the_conflicting_component_only():
    g_p = torch.tensor([1.0, 0.0, 0.0])
    g_a = torch.tensor([-2.0, 3.0, 1.0])
    out = adjusted(g_a, g_p, 1.0, "projection")
    assert torch.allclose(out, torch.tensor([0.0, 3.0, 1.0])) and float(out @ g_p) == 0.0
    assert torch.equal(adjusted(-g_a, g_p, 1.0, "projection"), -g_a)  # no conflict: untouched
    assert torch.allclose(adjusted(g_a, g_p, 0.5, "projection"), torch.tensor([-1.0, 3.0, 1.0]))
    cos = float(g_a @ g_p / g_a.norm())
    assert torch.allclose(adjusted(g_a, g_p, 1.0, "reference"), g_a - cos * g_p, atol=1e-6)  # λ cos ĝ_p
    assert torch.equal(adjusted(g_a, g_p, 1.0, "none"), g_a)


@pytest.mark.parametrize("arch", ["tiny_sd", "tiny_sd3", "tiny_flux"])
def test_predicted_x0_inverts_the_forward_process(request, arch):
    """The exact prediction (ε, or the flow models' velocity ε − x₀) gives x₀ back: x̂₀ = x_σ − σ v̂ on SD3/FLUX."""
    model = request.getfixturevalue(arch)
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 500, 990])
    exact = model.adapter.training_target(x0, eps, t)
    assert torch.allclose(predicted_x0(model, model.adapter.noised(x0, eps, t), exact, t), x0, atol=1e-4)
    if arch != "tiny_sd":
        sigma = (t / 1000).view(-1, 1, 1, 1)
        assert torch.allclose(predicted_x0(model, model.adapter.noised(x0, eps, t), exact, t),
                              model.adapter.noised(x0, eps, t) - sigma * exact, atol=1e-5)


@pytest.mark.parametrize("size,blocks", [(64, 4), (16, 2), (8, 1), (4, 1)])
def test_discriminator_fits_every_latent_size(size, blocks):
    assert discriminator_blocks(size) == blocks
    out = PatchDiscriminator(4, blocks)(torch.zeros(2, 4, size, size))
    assert out.shape[0] == 2 and out.shape[1] == 1 and min(out.shape[-2:]) >= 1


def test_warm_up_trains_the_discriminator_alone(tiny_sd):
    assert not DoCo(**{**SMALL, "iterations": 2, "warmup": 2}).fit(tiny_sd, RED, progress=False).tensors
    edit = DoCo(**SMALL).fit(tiny_sd, RED, progress=False)
    assert edit.tensors and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in edit.tensors)


def test_resume_is_bit_identical(tiny_sd, tmp_path, monkeypatch):
    straight = DoCo(**SMALL).fit(tiny_sd, RED, progress=False)
    step, calls = DoCoRun.step, {"n": 0}

    def interrupted(self, iteration, params):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return step(self, iteration, params)

    ckpt = tmp_path / "doco.safetensors"
    monkeypatch.setattr(DoCoRun, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        DoCo(**SMALL, checkpoint=str(ckpt), checkpoint_every=2).fit(tiny_sd, RED, progress=False)
    monkeypatch.setattr(DoCoRun, "step", step)
    resumed = DoCo(**SMALL, checkpoint=str(ckpt), checkpoint_every=2).fit(tiny_sd, RED, progress=False)
    assert resumed.metadata["info"]["resumed_at_iteration"] == 2
    assert resumed.digest == straight.digest


@pytest.mark.parametrize("options,message", [({"module": "text_encoder"}, "trains the denoiser"),
                                             ({"module": "cross-attn"}, "unknown module 'cross-attn'"),
                                             ({"surgery": "pcgrad"}, "surgery must be one of projection"),
                                             ({"batch": 0}, r"batch must be in \[1, 4096\]")])
def test_bad_input_is_one_line(options, message):
    with pytest.raises(SafediffError, match=message) as err:
        DoCo(**options)
    assert "\n" not in str(err.value)
