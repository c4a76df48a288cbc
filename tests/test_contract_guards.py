"""The guard contract, checked for every registered guard (as diffusers' PipelineTesterMixin does for pipelines).

A guard added to ``safediff.registry.GUARDS`` is covered here without writing these tests again:
- at its ``zero_strength`` options it is plain classifier-free guidance, bit for bit (same UNet batches);
- batch members are independent: a sample generated in a batch of two equals the sample generated alone, up to the
  rounding that differs between UNet batch sizes (``float_bounds.BATCH_LATENTS``); the guard runs at its
  ``continuous`` options when it declares them (a hard threshold in the update can flip on rounding);
- every step is one UNet call, and the pipeline is left as it was (hooks, processors, weights, scheduler);
- it runs on SD-1.x and SDXL tiny models and changes the output at its defaults.
A guard that applies an eraser's edit (``edit_from``, e.g. SPM's membrane) gets that eraser's edit for "red", fitted
once per model at the eraser's smoke settings.
"""

import pytest
import torch
from float_bounds import BATCH_LATENTS, assert_close
from guard_checks import count_unet_calls, pipeline_state

from safediff.concepts import resolve
from safediff.erasers import build_eraser
from safediff.guards import build_guard
from safediff.registry import ERASERS, GUARDS
from safediff.sampling import generate

NAMES = GUARDS.primary_names()
PROMPTS = ["a red circle", "a photo of a blue square"]
SEEDS = [3, 11]
STEPS = 4


@pytest.fixture(scope="session")
def edits(tmp_path_factory):
    """``edits(cls, model)`` -> the ``edit=PATH`` option of a guard that applies an eraser's edit ("" otherwise)."""
    folder, paths = tmp_path_factory.mktemp("guard-edits"), {}

    def option(cls, model) -> str:
        if cls.edit_from is None:
            return ""
        key = (cls.edit_from, model.base_sha256)
        if key not in paths:
            settings = ERASERS.get(cls.edit_from).sandbox["smoke"]
            edit = build_eraser(cls.edit_from, **settings).fit(model, resolve("red"), progress=False)
            paths[key] = edit.save(folder / f"{cls.edit_from}-{len(paths)}.safetensors")
        return f"edit={paths[key]}"
    return option


def guard(name: str, model, edits, options: str = ""):
    cls = GUARDS.get(name)
    concept = None if name == "none" else ("red,blue" if cls.multi_category else "red")
    options = ",".join(o for o in (options, edits(cls, model)) if o)
    return build_guard(name + (f":{options}" if options else ""), concept)


@pytest.mark.parametrize("name", NAMES)
def test_contract_zero_strength_is_plain_cfg(tiny_sd, edits, name):
    cls = GUARDS.get(name)
    if cls.zero_strength is None:
        pytest.skip(f"{name} has no zero strength: {cls.zero_strength_reason}")
    plain = generate(tiny_sd, PROMPTS, SEEDS, steps=STEPS, progress=False)
    off = generate(tiny_sd, PROMPTS, SEEDS, steps=STEPS, guard=guard(name, tiny_sd, edits, cls.zero_strength),
                   progress=False)
    assert torch.equal(off.latents, plain.latents)
    assert off.unet_batch_per_step == plain.unet_batch_per_step


@pytest.mark.parametrize("name", NAMES)
def test_contract_batch_members_are_independent(tiny_sd, edits, name):
    g = guard(name, tiny_sd, edits, GUARDS.get(name).continuous)
    together = generate(tiny_sd, PROMPTS, SEEDS, steps=STEPS, guard=g, progress=False)
    for b in range(len(PROMPTS)):
        alone = generate(tiny_sd, PROMPTS[b:b + 1], SEEDS[b:b + 1], steps=STEPS, guard=g, progress=False)
        assert_close(together.latents[b], alone.latents[0], BATCH_LATENTS)


@pytest.mark.parametrize("arch", ["tiny_sd", "tiny_sdxl"])
@pytest.mark.parametrize("name", NAMES)
def test_contract_one_unet_call_per_step_and_pipeline_untouched(request, edits, arch, name):
    model = request.getfixturevalue(arch)
    g = guard(name, model, edits)
    before = pipeline_state(model)
    with count_unet_calls(model) as calls:
        out = generate(model, PROMPTS, SEEDS, steps=STEPS, guard=g, progress=False)
    assert len(calls) == STEPS
    assert calls == [n * len(PROMPTS) for n in out.unet_batch_per_step]
    assert torch.isfinite(out.latents).all() and out.pixels.shape[0] == len(PROMPTS)
    assert pipeline_state(model) == before
    assert out.settings["guard"]["name"] == name


@pytest.mark.parametrize("name", [n for n in NAMES if n != "none"])
def test_contract_the_guard_acts_at_its_defaults(tiny_sd, edits, name):
    steps = 12  # past every default preset's warm-up (SLD medium: 10)
    plain = generate(tiny_sd, PROMPTS, SEEDS, steps=steps, progress=False)
    out = generate(tiny_sd, PROMPTS, SEEDS, steps=steps, guard=guard(name, tiny_sd, edits), progress=False)
    assert (out.latents - plain.latents).abs().max() > 1e-3
