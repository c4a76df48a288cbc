"""ESD (Gandikota et al. 2023) on tiny random models: parameter scope, loss, learning rate, native size, resume."""

import pytest
import torch

from float_bounds import assert_close
from safediff.erasers import build_eraser
from safediff.concepts import Concept
from safediff.errors import SafediffError
from safediff.erasers.esd import ESD, ESDU, ESDX, ESDRun, ESDXStrict
from safediff.registry import ERASERS
from weight_checks import snapshot

RED = [Concept("red", ("red",))]


def claimed(variant: str, name: str) -> bool:
    """The parameters each variant says it trains, written out independently of the implementation."""
    if not name.startswith("unet."):
        return False
    n = name.removeprefix("unet.")
    if variant == "x":
        return ".attn2." in n
    if variant == "x-strict":
        return ".attn2.to_k." in n or ".attn2.to_v." in n
    head = ("time_embedding", "add_embedding", "conv_norm_out", "conv_out")
    return ".attn2." not in n and n.split(".")[0] not in head


@pytest.mark.parametrize("cls", [ESDX, ESDU, ESDXStrict])
def test_each_variant_changes_exactly_the_parameters_it_claims(tiny_sd, cls):
    before = snapshot(tiny_sd)
    sha = tiny_sd.weights_sha256()
    tiny_sd.denoiser.conv_in.weight.requires_grad_(False)
    flags = [p.requires_grad for p in tiny_sd.denoiser.parameters()]
    edit = cls(iterations=2, lr=1e-3).fit(tiny_sd, RED, progress=False)
    assert tiny_sd.weights_sha256() == sha, "fit must leave the model as it found it"
    assert [p.requires_grad for p in tiny_sd.denoiser.parameters()] == flags
    edit.apply(tiny_sd)
    after = snapshot(tiny_sd)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    expected = {k for k in before if claimed(cls().variant, k)}
    assert changed == expected
    assert set(edit.tensors) == expected
    edit.revert(tiny_sd)
    assert tiny_sd.weights_sha256() == sha


def test_esd_u_on_sdxl_leaves_time_and_added_embeddings(tiny_sdxl):
    edit = ESDU(iterations=1, lr=1e-3).fit(tiny_sdxl, RED, progress=False)
    names = set(edit.tensors)
    assert any(k.startswith("add_embedding.") for k, _ in tiny_sdxl.denoiser.named_parameters())
    assert not any(n.startswith(("unet.add_embedding.", "unet.time_embedding.", "unet.conv_out.")) for n in names)
    assert not any(".attn2." in n for n in names)
    assert any(".attn1." in n for n in names) and "unet.conv_in.weight" in names


def test_loss_decreases_on_a_fixed_batch(tiny_sd):
    eraser = ESDX(lr=1e-3)
    run = ESDRun(eraser, tiny_sd, ["red"])
    batch = run.draw()
    params = list(run.params.values())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=eraser.lr)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = run.loss(batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


def test_first_loss_is_the_negative_guidance_target_of_the_frozen_model(tiny_sd):
    """At θ = θ*, L = ‖ε_c − (ε∅ − η(ε_c − ε∅))‖² = (1+η)² ‖ε_c − ε∅‖², checked with plain UNet calls."""
    eta = 2.5
    run = ESDRun(ESDX(negative_guidance=eta), tiny_sd, ["red"])
    batch = run.draw()
    with torch.no_grad():
        loss = run.loss(batch)
        cond = tiny_sd.adapter.encode(["red"]).embeds
        uncond = tiny_sd.adapter.encode([""]).embeds
        t = torch.tensor([batch.t])
        e_c = tiny_sd.denoiser(batch.x, t, encoder_hidden_states=cond).sample
        e_u = tiny_sd.denoiser(batch.x, t, encoder_hidden_states=uncond).sample
    expected = ((1 + eta) ** 2) * ((e_c - e_u) ** 2).mean()
    assert_close(loss, expected, 1e-4, relative=True)  # one 2-row UNet call vs two 1-row calls: max 4.6e-6
    ts = run.trajectories.scheduler.timesteps
    lo, hi = int(ts[batch.step]), (
        int(ts[batch.step - 1]) if batch.step else 1000)
    assert lo <= batch.t < hi, "t lies in the DDIM step's DDPM bin"


def test_zero_learning_rate_gives_an_empty_edit(tiny_sd):
    sha = tiny_sd.weights_sha256()
    edit = ESDX(iterations=3, lr=0.0).fit(tiny_sd, RED, progress=False)
    assert edit.tensors == {}
    edit.apply(tiny_sd)
    assert tiny_sd.weights_sha256() == sha


def test_learning_rate_is_a_float_and_used_as_given(tiny_sd):
    assert build_eraser("esd-x:lr=3e-5").lr == pytest.approx(3e-5)
    assert ESDX(lr="2.5e-5").lr == pytest.approx(2.5e-5)
    for bad in ("abc", -1e-5):
        with pytest.raises(SafediffError):
            ESDX(lr=bad)
    before = snapshot(tiny_sd)
    edit = ESDXStrict(iterations=1, lr=3e-5).fit(tiny_sd, RED, progress=False)
    step = max(float((t - before[k]).abs().max()) for k, t in edit.tensors.items())
    # Adam's first step moves every element by lr * g / (|g| + eps): the largest move is lr itself.
    assert step == pytest.approx(3e-5, rel=1e-2)


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sdxl"])
def test_samples_at_the_models_native_size(request, fixture):
    model = request.getfixturevalue(fixture)
    model.defaults = {**model.defaults, "height": 48, "width": 32}
    seen = []

    def hook(module, args, kwargs):
        seen.append(tuple(args[0].shape[-2:]))
        added = kwargs.get("added_cond_kwargs")
        if added is not None:
            seen.append(tuple(int(v) for v in added["time_ids"][0, :2]))

    handle = model.denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        ESDX(iterations=3, lr=1e-4, ddim_steps=4).fit(model, RED, progress=False)
    finally:
        handle.remove()
    f = model.pipe.vae_scale_factor
    latent = (48 // f, 32 // f)
    assert seen and all(s in (latent, (48, 32)) for s in seen)
    assert latent in seen


def test_resume_after_interruption_is_bit_identical(tiny_sd, tmp_path, monkeypatch):
    kwargs = dict(iterations=6, lr=1e-3, ddim_steps=4, seed=3)
    straight = ESDX(**kwargs).fit(tiny_sd, RED, progress=False)

    sha = tiny_sd.weights_sha256()
    ckpt = tmp_path / "esd.safetensors"
    draw = ESDRun.draw
    calls = {"n": 0}

    def interrupted(self):
        calls["n"] += 1
        if calls["n"] == 5:  # during iteration 5, after the checkpoint of iteration 3
            raise KeyboardInterrupt
        return draw(self)

    monkeypatch.setattr(ESDRun, "draw", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ESDX(**kwargs, checkpoint=str(ckpt), checkpoint_every=3).fit(tiny_sd, RED, progress=False)
    monkeypatch.setattr(ESDRun, "draw", draw)
    assert ckpt.is_file() and tiny_sd.weights_sha256() == sha

    eraser = ESDX(**kwargs, checkpoint=str(ckpt), checkpoint_every=3)
    resumed = eraser.fit(tiny_sd, RED, progress=False)
    assert resumed.metadata["info"]["resumed_at_iteration"] == 3
    assert set(resumed.tensors) == set(straight.tensors)
    assert all(torch.equal(resumed.tensors[k], straight.tensors[k]) for k in straight.tensors)
    assert "checkpoint" not in resumed.metadata["hyperparameters"]

    with pytest.raises(SafediffError, match="different run"):
        ESDX(**{**kwargs, "lr": 2e-3}, checkpoint=str(ckpt)).fit(tiny_sd, RED, progress=False)


def test_sampling_with_the_trained_model_is_an_option(tiny_sd):
    """Default: x_t from the frozen model; sample_with="trained": from the parameters being trained."""
    assert ESD().sample_with == "frozen"
    runs = {mode: ESDRun(ESDX(ddim_steps=4, sample_with=mode), tiny_sd, ["red"]) for mode in ("frozen", "trained")}
    untouched = ESDRun(ESDX(ddim_steps=4), tiny_sd, ["red"])
    params = runs["trained"].params
    with torch.no_grad():
        for p in params.values():
            p.add_(0.05 * torch.randn_like(p))  # as if training had moved them
    draws = {mode: [run.draw() for _ in range(6)] for mode, run in runs.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(untouched.frozen[n])
    reference = [untouched.draw() for _ in range(6)]
    sampled = [i for i, b in enumerate(reference) if b.step > 0]
    assert sampled, "some draws run DDIM steps"
    assert all(torch.equal(draws["frozen"][i].x, reference[i].x) for i in range(6))
    assert not any(torch.allclose(draws["trained"][i].x, reference[i].x) for i in sampled)
    with pytest.raises(SafediffError):
        ESDX(sample_with="other")


def test_registry_and_bad_input():
    assert ERASERS.get("esd-x") is ESDX and ERASERS.get("esd-u") is ESDU and ERASERS.get("esd") is ESDU
    assert ERASERS.get("esd-x-strict") is ESDXStrict
    with pytest.raises(SafediffError):
        ESD(variant="y")
    with pytest.raises(SafediffError):
        ESDX(iterations=0)
