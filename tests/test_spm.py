"""SPM (Lyu et al., CVPR 2024) on tiny random models: the membrane's layers and rank, the first loss recomputed from
the frozen model, latent anchoring's surrogates, and the guard's Facilitated Transport against an independent
re-computation (the guard equals the model with γ(P)·ΔW merged)."""

import pytest
import torch

from safediff.concepts import Concept, resolve
from safediff.erasers import build_eraser
from safediff.erasers import spm as spm_module
from safediff.erasers.base import weights_set_to
from safediff.erasers.spm import SPM, Membrane, surrogate
from safediff.errors import SafediffError
from safediff.guards import build_guard
from safediff.guards.spm import token_sets, transport_rates
from safediff.registry import ERASERS, GUARDS
from safediff.sampling import denoiser_output, generate
from safediff.adapters import Conditioning
from safediff.sampling import Trajectories

RED = resolve("red")
FAST = dict(iterations=3, lr=1e-2, warmup=0, ddim_steps=2, anchors=1)


def adapted_layers(unet) -> set[str]:
    """Linear/Conv2d layers inside transformer blocks, found independently of the implementation."""
    blocks = [n for n, m in unet.named_modules() if m.__class__.__name__ == "Transformer2DModel"]
    return {n for n, m in unet.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and any(n.startswith(b + ".") for b in blocks)}


def test_membrane_covers_the_transformer_blocks_and_starts_at_zero(tiny_sd):
    g = torch.Generator().manual_seed(0)
    m = Membrane(tiny_sd.denoiser, rank=1, alpha=1.0, generator=g)
    assert set(m.layers) == adapted_layers(tiny_sd.denoiser)
    assert any(".attn1." in n for n in m.layers) and any(".attn2." in n for n in m.layers)
    assert any(n.endswith("proj_in") for n in m.layers) and any(".ff." in n for n in m.layers)
    for name, layer in m.layers.items():
        assert torch.equal(m.delta(name), torch.zeros_like(layer.weight))  # U = 0
        bound = 1.0 / (layer.weight[0].numel() ** 0.5)  # Kaiming-uniform with a = √5: U(±1/√fan_in)
        assert m.down[name].abs().max() <= bound and m.down[name].shape[0] == 1
    assert SPM(lr=0.0, iterations=2, ddim_steps=2, anchors=1).fit(tiny_sd, RED, progress=False).tensors == {}


@pytest.mark.parametrize("rank", [1, 2])
def test_the_edit_is_the_merged_membrane_of_rank_r(tiny_sd, rank):
    edit = SPM(rank=rank, **FAST).fit(tiny_sd, RED, progress=False)
    assert edit.tensors and {n.removeprefix("unet.").removesuffix(".weight") for n in edit.tensors} <= \
        adapted_layers(tiny_sd.denoiser)
    params = dict(tiny_sd.denoiser.named_parameters())
    for name, w in edit.tensors.items():
        delta = (w - params[name.removeprefix("unet.")].detach()).double().reshape(w.shape[0], -1)
        s = torch.linalg.svdvals(delta)
        assert (s[rank:] <= 1e-4 * s[0]).all(), name  # (α/r) U D has rank r (float32 rounding aside)


def test_first_loss_is_the_negative_guidance_target_of_the_frozen_model(tiny_sd, monkeypatch):
    seen = []
    draw = Trajectories.draw

    def recording(*args, **kwargs):
        out = draw(*args, **kwargs)
        seen.append(out)
        return out

    monkeypatch.setattr(Trajectories, "draw", recording)
    eraser = SPM(iterations=1, lr=1e-3, ddim_steps=3, anchors=2, negative_guidance=2.0, sample_with="frozen")
    eraser.fit(tiny_sd, [Concept("red", ("red",))], progress=False)
    _, t, x = seen[0]
    a = tiny_sd.adapter
    with torch.no_grad():
        e_c = denoiser_output(tiny_sd, x, t, a.encode(["red"]))
        e_n = denoiser_output(tiny_sd, x, t, a.encode([""]))
    # U = 0: the membrane is off at the first step, so pred = ε(x, c) and the anchoring term vanishes
    expected = (1 + 2.0) ** 2 * torch.nn.functional.mse_loss(e_c, e_n)
    assert eraser.losses[0] == pytest.approx(float(expected), rel=1e-3, abs=1e-9)


def test_surrogates_keep_the_targets_norm_band_and_are_deterministic():
    target = torch.randn(7, 5)
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    a = [surrogate(target, g1) for _ in range(20)]
    b = [surrogate(target, g2) for _ in range(20)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    ratios = torch.tensor([float(x.norm() / target.norm()) for x in a])
    assert (ratios >= 0.8 - 1e-6).all() and (ratios <= 1.2 + 1e-6).all()
    # a direction equal to the target is accepted with probability 1 − cos = 0: surrogates never point at it
    assert all(float(torch.nn.functional.cosine_similarity(x.flatten(), target.flatten(), dim=0)) < 0.9 for x in a)


@pytest.fixture
def membrane(tiny_sd, tmp_path):
    return SPM(**FAST).fit(tiny_sd, RED, progress=False).save(tmp_path / "spm.safetensors")


def test_transport_rate_is_the_best_of_embedding_cosine_and_token_overlap(tiny_sd):
    a = tiny_sd.adapter
    prompts = ["a red circle", "a blue square", "red"]
    with torch.no_grad():  # as at sampling time
        cond, red = a.encode(prompts).embeds, a.encode(["red"]).embeds.flatten()
        gamma = transport_rates(a, prompts, cond, ["red"], "clipcos_tokenuni")
        only_cos = transport_rates(a, prompts, cond, ["red"], "clipcos")
    tok = a.tokenizers[0]
    for b, p in enumerate(prompts):
        cos = float(torch.nn.functional.cosine_similarity(cond[b].flatten(), red, dim=0))
        mine, theirs = token_sets(tok, [p])[0], token_sets(tok, ["red"])[0]
        assert float(gamma[b]) == pytest.approx(max(cos, len(mine & theirs) / len(theirs)), abs=1e-6)
    assert float(gamma[0]) == pytest.approx(1.0) and float(gamma[2]) == pytest.approx(1.0)
    assert float(only_cos[2]) == pytest.approx(1.0, abs=1e-6) and float(only_cos[1]) < 1.0


@pytest.mark.parametrize("preset, power", [("paper", 1), ("reference", 2)])
def test_the_guard_is_the_membrane_scaled_by_the_prompts_transport_rate(tiny_sd, membrane, preset, power):
    from safediff.edits import Edit

    edit = Edit.load(membrane)
    g = build_guard(f"spm:{preset},edit={membrane}", "red")
    for prompt in ("a blue square", "a red circle"):
        guarded = generate(tiny_sd, [prompt], [5], steps=3, guard=g, progress=False).latents
        with torch.no_grad():
            gamma = float(transport_rates(tiny_sd.adapter, [prompt], tiny_sd.adapter.encode([prompt]).embeds,
                                          ["red"], "clipcos_tokenuni")[0]) ** power
        params = dict(tiny_sd.denoiser.named_parameters())
        scaled = {n: params[n.removeprefix("unet.")].detach() + gamma * d for n, d in edit.deltas(tiny_sd).items()}
        with weights_set_to(tiny_sd, scaled):
            merged = generate(tiny_sd, [prompt], [5], steps=3, progress=False).latents
        assert (guarded - merged).abs().max() <= 1e-4 * merged.abs().max(), prompt


def test_merged_preset_reproduces_the_applied_edit_and_strength_zero_is_plain_cfg(tiny_sd, membrane):
    from safediff.edits import Edit

    prompts, seeds = ["a blue square", "a red circle"], [1, 2]
    plain = generate(tiny_sd, prompts, seeds, steps=3, progress=False).latents
    off = generate(tiny_sd, prompts, seeds, steps=3, progress=False,
                   guard=build_guard(f"spm:edit={membrane},strength=0", "red")).latents
    assert torch.equal(off, plain)
    merged_guard = generate(tiny_sd, prompts, seeds, steps=3, progress=False,
                            guard=build_guard(f"spm:merged,edit={membrane}", "red")).latents
    edit = Edit.load(membrane).apply(tiny_sd)
    applied = generate(tiny_sd, prompts, seeds, steps=3, progress=False).latents
    edit.revert(tiny_sd)
    assert (merged_guard - applied).abs().max() <= 1e-4 * applied.abs().max()
    assert (merged_guard - plain).abs().max() > 1e-3


def test_two_membranes_stack_each_with_its_own_rate(tiny_sd, tmp_path):
    red = SPM(**FAST).fit(tiny_sd, RED, progress=False).save(tmp_path / "red.safetensors")
    blue = SPM(**FAST, seed=1).fit(tiny_sd, resolve("blue"), progress=False).save(tmp_path / "blue.safetensors")
    g = build_guard(f"spm:edit={red};{blue}", "red,blue")
    assert g.erased == [["red"], ["blue"]]
    out = generate(tiny_sd, ["a red circle"], [3], steps=3, guard=g, progress=False)
    assert torch.isfinite(out.latents).all()


def test_registry_and_bad_input_are_refused(tiny_sd, membrane, tmp_path):
    assert ERASERS.get("spm") is SPM and GUARDS.get("spm").edit_from == "spm"
    assert build_eraser("spm:rank=2,anchor_weight=0").rank == 2
    for bad in ({"sample_with": "other"}, {"rank": 0}, {"iterations": 0}, {"lr": -1.0}):
        with pytest.raises(SafediffError):
            SPM(**bad)
    with pytest.raises(SafediffError, match="edit=PATH"):
        build_guard("spm", "red")
    with pytest.raises(SafediffError, match="give --concept red"):
        build_guard(f"spm:edit={membrane}", "blue")
    uce = build_eraser("uce").fit(tiny_sd, RED, progress=False).save(tmp_path / "uce.safetensors")
    with pytest.raises(SafediffError, match="uce edit"):
        build_guard(f"spm:edit={uce}", "red")
    with pytest.raises(SafediffError, match="scaling"):
        build_guard(f"spm:edit={membrane},scaling=cubic", "red")
    with pytest.raises(SafediffError):
        SPM(**FAST).fit(tiny_sd, [Concept("x", ("",))], progress=False)


def test_the_anchoring_conditioning_is_batched_with_the_target():
    cond = Conditioning(torch.randn(1, 4, 3), torch.randn(1, 3))
    out = spm_module.anchors(cond, 3, torch.Generator().manual_seed(0))
    assert out.embeds.shape == (3, 4, 3) and out.pooled.shape == (3, 3)
