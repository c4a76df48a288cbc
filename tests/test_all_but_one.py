"""All but One (Hong et al., AAAI 2024; implemented from the paper) on tiny random models: the first loss recomputed
from the frozen model, a concept replaced by itself changing nothing, the unconditional drift held by λ, the scope."""

import pytest
import torch

from safediff.adapters import Conditioning
from safediff.concepts import Concept, resolve
from safediff.erasers.all_but_one import AllButOne
from safediff.errors import SafediffError
from safediff.registry import ERASERS
from safediff.sampling import denoiser_output
from safediff.sampling import Trajectories

FAST = dict(iterations=2, lr=1e-3, ddim_steps=2)


def record_draws(monkeypatch) -> list:
    seen = []
    draw = Trajectories.draw

    def recording(*args, **kwargs):
        out = draw(*args, **kwargs)
        seen.append(out)
        return out

    monkeypatch.setattr(Trajectories, "draw", recording)
    return seen


def test_first_loss_is_the_guidance_gap_to_the_replacement(tiny_sd, monkeypatch):
    seen = record_draws(monkeypatch)
    eraser = AllButOne(iterations=1, lr=1e-3, ddim_steps=3, preserve_weight=5.0)
    eraser.fit(tiny_sd, [Concept("red", ("red",), guide="blue")], progress=False)
    _, t, x = seen[0]
    a = tiny_sd.adapter
    with torch.no_grad():
        u, e, r = denoiser_output(tiny_sd, torch.cat([x] * 3), t, Conditioning.cat(
            [a.encode_negative(None, 1), a.encode(["red"]), a.encode(["blue"])])).chunk(3)
    # θ = θ* at the first step: the drift term is 0 and the guidance terms differ by ε(c_e) − ε(c_r)
    expected = torch.nn.functional.mse_loss(e - u, r - u)
    assert eraser.losses[0] == pytest.approx(float(expected), rel=1e-3, abs=1e-10)


def test_replacing_a_concept_by_itself_changes_nothing(tiny_sd):
    assert AllButOne(**FAST).fit(tiny_sd, [Concept("red", ("red",), guide="red")], progress=False).tensors == {}


def test_the_unconditional_drift_is_held_by_its_weight(tiny_sd):
    x, t = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1)), torch.tensor(400)
    uncond = tiny_sd.adapter.encode_negative(None, 2)
    with torch.no_grad():
        before = denoiser_output(tiny_sd, x, t, uncond)
    drift = {}
    for weight in (0.0, 100.0):
        edit = AllButOne(iterations=8, lr=3e-3, ddim_steps=2, preserve_weight=weight).fit(
            tiny_sd, resolve("red"), progress=False)
        edit.apply(tiny_sd)
        with torch.no_grad():
            drift[weight] = float((denoiser_output(tiny_sd, x, t, uncond) - before).norm())
        edit.revert(tiny_sd)
    assert drift[100.0] < drift[0.0]


@pytest.mark.parametrize("variant, inside", [("x", lambda n: ".attn2." in n),
                                             ("x-strict", lambda n: ".attn2.to_k." in n or ".attn2.to_v." in n)])
def test_each_variant_changes_only_its_parameters(tiny_sd, variant, inside):
    edit = AllButOne(variant=variant, **FAST).fit(tiny_sd, resolve("red"), progress=False)
    assert edit.tensors and all(inside(n) for n in edit.tensors)


def test_registry_and_bad_input(tiny_sd):
    assert ERASERS.get("all-but-one") is AllButOne
    with pytest.raises(SafediffError):
        AllButOne(variant="everything")
    with pytest.raises(SafediffError):
        AllButOne(**FAST).fit(tiny_sd, [Concept("x", ("",))], progress=False)
