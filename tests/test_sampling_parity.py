"""With no guard, safediff's sampler reproduces diffusers' own pipelines for the same components, prompt and seed:
StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline and FluxPipeline (dev with its embedded
guidance, schnell without; true CFG with a negative prompt = our guidance)."""

import numpy as np
import pytest
import torch

from float_bounds import assert_close
from safediff.sampling import generate

PROMPTS = ["a red circle", "a photo of a blue square on white"]
SEEDS = [3, 11]


def _diffusers_images(model, prompts, seeds, steps, guidance, size, negative=None, **kw):
    """diffusers' pipeline of the model's architecture at our settings (FLUX: our guidance is ``true_cfg_scale``, its
    negative branch the negative prompt or "", and the embedded guidance is ``guidance_scale``)."""
    arch = model.adapter.arch
    if arch == "flux":
        kw.update(true_cfg_scale=guidance, guidance_scale=model.defaults.get("embedded_guidance", 0.0),
                  negative_prompt=negative or [""] * len(prompts))
    else:
        kw.update(guidance_scale=guidance, negative_prompt=negative)
    if arch in ("sd3", "flux"):
        kw["max_sequence_length"] = model.adapter.t5_length
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    return model.pipe(prompts, generator=gens, num_inference_steps=steps, height=size, width=size, output_type="np",
                      **kw).images


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sdxl", "tiny_sd3", "tiny_flux", "tiny_flux_schnell"])
@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_matches_diffusers_pipeline(fixture, guidance, request):
    model = request.getfixturevalue(fixture)
    ref = _diffusers_images(model, PROMPTS, SEEDS, 4, guidance, 32)
    out = generate(model, PROMPTS, SEEDS, steps=4, guidance=guidance, height=32, width=32, progress=False)
    ours = out.pixels.permute(0, 2, 3, 1).numpy()
    assert ours.shape == ref.shape
    assert_close(ours, ref, 1e-4)
    assert np.abs(ref[0] - ref[1]).max() > 1e-3  # the two images differ: the comparison is not vacuous


@pytest.mark.parametrize("scheduler", ["dpm++", "euler-a"])
def test_matches_diffusers_with_other_schedulers(tiny_sd, scheduler):
    from safediff.sampling import make_scheduler

    tiny_sd.pipe.scheduler = make_scheduler(tiny_sd, scheduler)
    ref = _diffusers_images(tiny_sd, PROMPTS, SEEDS, 4, 5.0, 32)
    ours = generate(tiny_sd, PROMPTS, SEEDS, steps=4, guidance=5.0, height=32, width=32, progress=False)
    assert_close(ours.pixels.permute(0, 2, 3, 1), ref, 1e-4)


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sd3", "tiny_flux"])
def test_negative_prompt_matches_diffusers(fixture, request):
    model = request.getfixturevalue(fixture)
    ref = _diffusers_images(model, PROMPTS, SEEDS, 3, 5.0, 32, negative=["green", "green"])
    ours = generate(model, PROMPTS, SEEDS, steps=3, guidance=5.0, height=32, width=32, negative_prompt="green",
                    progress=False)
    assert_close(ours.pixels.permute(0, 2, 3, 1), ref, 1e-4)


def test_flux_embedded_guidance_matches_diffusers(tiny_flux):
    """FLUX.1 dev's guidance input, not the default one: the transformer reads what the settings say."""
    tiny_flux.defaults["embedded_guidance"] = 1.5
    ref = _diffusers_images(tiny_flux, PROMPTS, SEEDS, 3, 1.0, 32)
    ours = generate(tiny_flux, PROMPTS, SEEDS, steps=3, guidance=1.0, height=32, width=32, progress=False)
    assert_close(ours.pixels.permute(0, 2, 3, 1), ref, 1e-4)
    other = generate(tiny_flux, PROMPTS, SEEDS, steps=3, guidance=1.0, height=32, width=32, embedded_guidance=5.0,
                     progress=False)
    assert (other.pixels - ours.pixels).abs().max() > 1e-3  # the input matters: the check is not vacuous
    assert other.settings["embedded_guidance"] == 5.0
