"""Guards on edited models (``concept_weights=base``, ``safediff.guards.unedited``): the concept branches are the
unedited model's predictions and every other branch the edited model's, exactly, in one UNet call per step; the
default is untouched, stacks read the loaded weights, bad input is one line."""

import pytest
import torch
from guard_checks import count_unet_calls, pipeline_state

from safediff.adapters import Conditioning
from safediff.attacks.target import Target
from safediff.concepts import resolve
from safediff.erasers import build_eraser
from safediff.errors import SafediffError
from safediff.guards import build_guard
from safediff.guards.base import GenerationContext
from safediff.guards.unedited import base_weights
from safediff.sampling import denoiser_output, generate, make_scheduler

PROMPTS = ["a red circle", "a blue square"]


def based(spec: str) -> str:
    """``spec`` with ``concept_weights=base`` added (after the preset, or as the first option)."""
    return spec + ("," if ":" in spec else ":") + "concept_weights=base"


def step_predictions(model, guard, i: int = 0) -> list[torch.Tensor]:
    """The noise prediction of every branch of step i of one session, from the session's own UNet call."""
    scheduler = make_scheduler(model)
    scheduler.set_timesteps(3)
    cond, uncond = model.adapter.encode(PROMPTS), model.adapter.encode_negative(None, len(PROMPTS))
    session = guard.start(GenerationContext(model, PROMPTS, cond, uncond, 5.0, scheduler.timesteps, 32, 32))
    branches = session.branches(i)
    x = torch.randn(len(PROMPTS), 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with session.unet_hooks():
        eps = denoiser_output(model, torch.cat([x] * len(branches)), scheduler.timesteps[i], Conditioning.cat(branches))
    return list(eps.chunk(len(branches)))


@pytest.fixture(params=["uce", "des"])
def edit(request, tiny_sd):
    """A K/V edit (UCE) and a text-encoder edit (DES), fitted for red (not applied)."""
    settings = {"uce": {}, "des": {"epochs": 1, "lr": 1e-2, "batch": 8}}[request.param]
    return build_eraser(request.param, **settings).fit(tiny_sd, resolve("red"), progress=False)


@pytest.mark.parametrize("spec,concept,concept_rows", [("sld:max", "red", [2]), ("casg-sld:max", "red,blue", [2, 3]),
                                                       ("negative-prompt", "red", [0])])
def test_concept_rows_are_the_unedited_model_and_the_others_the_edited_one(tiny_sd, edit, spec, concept,
                                                                           concept_rows):
    edit.apply(tiny_sd)
    base = step_predictions(tiny_sd, build_guard(based(spec), concept))
    edited = step_predictions(tiny_sd, build_guard(spec, concept))
    edit.revert(tiny_sd)
    unedited = step_predictions(tiny_sd, build_guard(spec, concept))
    for k in range(len(base)):
        expected = unedited[k] if k in concept_rows else edited[k]
        assert torch.equal(base[k], expected), k  # row for row the same computation: exact
    assert all((edited[k] - unedited[k]).abs().max() > 1e-4 for k in concept_rows)  # the edit matters there


def test_stacked_edits_read_the_weights_as_loaded(tiny_sd):
    loaded = {n: p.detach().clone() for n, p in tiny_sd.denoiser.named_parameters()}
    first = build_eraser("uce").fit(tiny_sd, resolve("red"), progress=False).apply(tiny_sd)
    second = build_eraser("uce").fit(tiny_sd, resolve("blue"), progress=False).apply(tiny_sd)
    base = base_weights(tiny_sd)
    assert set(base) == set(first.tensors) | set(second.tensors)
    for name, value in base.items():
        assert torch.equal(value, loaded[name.removeprefix("unet.")]), name
    stacked = step_predictions(tiny_sd, build_guard("sld:max,concept_weights=base", "red"))
    second.revert(tiny_sd)
    first.revert(tiny_sd)
    assert torch.equal(stacked[2], step_predictions(tiny_sd, build_guard("sld:max", "red"))[2])


def test_without_edits_base_is_the_default_bit_for_bit(tiny_sd):
    plain = generate(tiny_sd, PROMPTS, [3, 4], steps=4, guard=build_guard("sld:max", "red"), progress=False)
    base = generate(tiny_sd, PROMPTS, [3, 4], steps=4, guard=build_guard("sld:max,concept_weights=base", "red"),
                    progress=False)
    assert torch.equal(plain.latents, base.latents)
    assert "concept_weights" not in plain.settings["guard"] and base.settings["guard"]["concept_weights"] == "base"


def test_one_unet_call_per_step_hooks_removed_and_the_output_changes(tiny_sd):
    build_eraser("uce").fit(tiny_sd, resolve("red"), progress=False).apply(tiny_sd)
    before = pipeline_state(tiny_sd)
    with count_unet_calls(tiny_sd) as calls:
        out = generate(tiny_sd, PROMPTS, [3, 4], steps=4,
                       guard=build_guard("sld:max,concept_weights=base", "red"), progress=False)
    edited = generate(tiny_sd, PROMPTS, [3, 4], steps=4, guard=build_guard("sld:max", "red"), progress=False)
    assert calls == [n * len(PROMPTS) for n in out.unet_batch_per_step] and len(calls) == 4
    assert pipeline_state(tiny_sd) == before
    assert (out.latents - edited.latents).abs().max() > 1e-4


def test_attack_targets_predict_through_the_unedited_concept(tiny_sd):
    build_eraser("uce").fit(tiny_sd, resolve("red"), progress=False).apply(tiny_sd)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500])
    cond = tiny_sd.adapter.encode(["a red circle"])
    outs = [Target(model=tiny_sd, guard=build_guard(spec, "red"), concepts=resolve("red")).noise(x, t, cond)
            for spec in ("sld:max", "sld:max,concept_weights=base")]
    assert (outs[0] - outs[1]).abs().max() > 1e-5


@pytest.mark.parametrize("spec,message", [("sld:max,concept_weights=original", "must be one of edited, base"),
                                          ("safree:concept_weights=base", "has no concept branches")])
def test_bad_input_is_one_line(spec, message):
    with pytest.raises(SafediffError, match=message) as err:
        build_guard(spec, "red")
    assert "\n" not in str(err.value)


def adavd_targets(model, spec: str) -> list[torch.Tensor]:
    scheduler = make_scheduler(model)
    scheduler.set_timesteps(3)
    cond, uncond = model.adapter.encode(PROMPTS), model.adapter.encode_negative(None, len(PROMPTS))
    session = build_guard(spec, "red").start(GenerationContext(model, PROMPTS, cond, uncond, 5.0, scheduler.timesteps,
                                                               32, 32))
    return [t.detach() for t in session.targets]


def test_adavd_reads_its_value_targets_through_the_unedited_weights(tiny_sd, edit):
    """AdaVD reads its concept once, in start(): with ``concept_weights=base`` its targets t_k = W_v e_k are the
    unedited model's (text encoder and value projections), its hooks act on the edited model's values."""
    edit.apply(tiny_sd)
    base, edited = adavd_targets(tiny_sd, "adavd:concept_weights=base"), adavd_targets(tiny_sd, "adavd")
    loaded = pipeline_state(tiny_sd)
    images = [generate(tiny_sd, PROMPTS, [3, 4], steps=3, guard=build_guard(spec, "red"), progress=False).latents
              for spec in ("adavd", "adavd:concept_weights=base")]
    assert pipeline_state(tiny_sd) == loaded  # the edited weights are back after start()
    edit.revert(tiny_sd)
    unedited = adavd_targets(tiny_sd, "adavd")
    assert all(torch.equal(b, u) for b, u in zip(base, unedited))
    assert max((e - u).abs().max() for e, u in zip(edited, unedited)) > 1e-4  # the edit moves them
    assert (images[0] - images[1]).abs().max() > 1e-5


def test_adavd_without_edits_base_is_the_default_bit_for_bit(tiny_sd):
    runs = [generate(tiny_sd, PROMPTS, [3, 4], steps=3, guard=build_guard(spec, "red"), progress=False)
            for spec in ("adavd", "adavd:concept_weights=base")]
    assert torch.equal(runs[0].latents, runs[1].latents)
    assert runs[1].settings["guard"]["concept_weights"] == "base"
