"""The guard contract, checked for every registered guard (as diffusers' PipelineTesterMixin does for pipelines).

A guard added to ``safediff.registry.GUARDS`` is covered here without writing these tests again:
- at its ``zero_strength`` options it is plain classifier-free guidance, bit for bit (same denoiser batches);
- batch members are independent: a sample generated in a batch of two equals the sample generated alone, up to the
  rounding that differs between batch sizes (``float_bounds.BATCH_LATENTS``); the guard runs at its
  ``continuous`` options when it declares them (a hard threshold in the update can flip on rounding);
- every step is one denoiser call, and the pipeline is left as it was (hooks, processors, weights, scheduler);
- it runs on SD-1.x, SDXL, SD3 and FLUX tiny models and changes the output at its defaults;
- on a transformer (SD3, FLUX) a guard either runs or refuses in one line that says what to use instead: options
  that need UNet skip features (``transformer_options`` says which to use), a negative branch on FLUX without CFG.
"""

import pytest
import torch
from float_bounds import BATCH_LATENTS, assert_close
from guard_checks import count_unet_calls, pipeline_state

from safediff.errors import SafediffError
from safediff.guards import build_guard
from safediff.registry import GUARDS
from safediff.sampling import generate

NAMES = GUARDS.primary_names()
PROMPTS = ["a red circle", "a photo of a blue square"]
SEEDS = [3, 11]
STEPS = 4
TRANSFORMERS = ["tiny_sd3", "tiny_flux"]


def guard(name: str, options: str = "", model=None):
    """The guard with ``options``; on a transformer also with the options it declares for one."""
    cls = GUARDS.get(name)
    concept = None if name == "none" else ("red,blue" if cls.multi_category else "red")
    if model is not None and not model.adapter.skip_features and cls.transformer_options:
        options = ",".join(o for o in (options, cls.transformer_options) if o)
    return build_guard(name + (f":{options}" if options else ""), concept)


@pytest.mark.parametrize("arch", ["tiny_sd", *TRANSFORMERS])
@pytest.mark.parametrize("name", NAMES)
def test_contract_zero_strength_is_plain_cfg(request, arch, name):
    cls = GUARDS.get(name)
    if cls.zero_strength is None:
        pytest.skip(f"{name} has no zero strength: {cls.zero_strength_reason}")
    model = request.getfixturevalue(arch)
    plain = generate(model, PROMPTS, SEEDS, steps=STEPS, progress=False)
    off = generate(model, PROMPTS, SEEDS, steps=STEPS, guard=guard(name, cls.zero_strength, model), progress=False)
    assert torch.equal(off.latents, plain.latents)
    assert off.unet_batch_per_step == plain.unet_batch_per_step


@pytest.mark.parametrize("arch", ["tiny_sd", "tiny_flux"])
@pytest.mark.parametrize("name", NAMES)
def test_contract_batch_members_are_independent(request, arch, name):
    model = request.getfixturevalue(arch)
    g = guard(name, GUARDS.get(name).continuous, model)
    together = generate(model, PROMPTS, SEEDS, steps=STEPS, guard=g, progress=False)
    for b in range(len(PROMPTS)):
        alone = generate(model, PROMPTS[b:b + 1], SEEDS[b:b + 1], steps=STEPS, guard=g, progress=False)
        assert_close(together.latents[b], alone.latents[0], BATCH_LATENTS)


@pytest.mark.parametrize("arch", ["tiny_sd", "tiny_sdxl", *TRANSFORMERS])
@pytest.mark.parametrize("name", NAMES)
def test_contract_one_unet_call_per_step_and_pipeline_untouched(request, arch, name):
    model = request.getfixturevalue(arch)
    before = pipeline_state(model)
    with count_unet_calls(model) as calls:
        out = generate(model, PROMPTS, SEEDS, steps=STEPS, guard=guard(name, model=model), progress=False)
    assert len(calls) == STEPS
    assert calls == [n * len(PROMPTS) for n in out.unet_batch_per_step]
    assert torch.isfinite(out.latents).all() and out.pixels.shape[0] == len(PROMPTS)
    assert pipeline_state(model) == before
    assert out.settings["guard"]["name"] == name


@pytest.mark.parametrize("arch", ["tiny_sd", *TRANSFORMERS])
@pytest.mark.parametrize("name", [n for n in NAMES if n != "none"])
def test_contract_the_guard_acts_at_its_defaults(request, arch, name):
    model = request.getfixturevalue(arch)
    steps = 12  # past every default preset's warm-up (SLD medium: 10)
    plain = generate(model, PROMPTS, SEEDS, steps=steps, progress=False)
    out = generate(model, PROMPTS, SEEDS, steps=steps, guard=guard(name, model=model), progress=False)
    assert (out.latents - plain.latents).abs().max() > 1e-3


@pytest.mark.parametrize("name", [n for n in NAMES if GUARDS.get(n).transformer_options])
def test_contract_options_that_need_unet_features_are_refused_on_a_transformer(tiny_sd3, name):
    with pytest.raises(SafediffError) as err:
        generate(tiny_sd3, PROMPTS, SEEDS, steps=2, guard=guard(name), progress=False)
    message = str(err.value)
    assert "\n" not in message and GUARDS.get(name).transformer_options in message


@pytest.mark.parametrize("name", NAMES)
def test_contract_without_cfg_on_flux_a_guard_runs_or_asks_for_cfg(tiny_flux, name):
    g = guard(name, model=tiny_flux)
    if not GUARDS.get(name).needs_cfg:
        assert generate(tiny_flux, PROMPTS, SEEDS, steps=2, guidance=1.0, guard=g, progress=False).unet_batch_per_step
        return
    with pytest.raises(SafediffError, match="guidance > 1") as err:
        generate(tiny_flux, PROMPTS, SEEDS, steps=2, guidance=1.0, guard=g, progress=False)
    assert "\n" not in str(err.value)
