"""With no guard, safediff's sampler reproduces diffusers' own pipelines for the same components, prompt and seed."""

import numpy as np
import pytest
import torch

from float_bounds import assert_close
from safediff.sampling import generate

PROMPTS = ["a red circle", "a photo of a blue square on white"]
SEEDS = [3, 11]


def _diffusers_images(pipe, prompts, seeds, steps, guidance, size, **kw):
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    return pipe(prompts, generator=gens, num_inference_steps=steps, guidance_scale=guidance, height=size,
                width=size, output_type="np", **kw).images


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sdxl"])
@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_matches_diffusers_pipeline(fixture, guidance, request):
    model = request.getfixturevalue(fixture)
    ref = _diffusers_images(model.pipe, PROMPTS, SEEDS, 4, guidance, 32)
    out = generate(model, PROMPTS, SEEDS, steps=4, guidance=guidance, height=32, width=32, progress=False)
    ours = out.pixels.permute(0, 2, 3, 1).numpy()
    assert ours.shape == ref.shape
    assert_close(ours, ref, 1e-4)
    assert np.abs(ref[0] - ref[1]).max() > 1e-3  # the two images differ: the comparison is not vacuous


@pytest.mark.parametrize("scheduler", ["dpm++", "euler-a"])
def test_matches_diffusers_with_other_schedulers(tiny_sd, scheduler):
    from safediff.sampling import make_scheduler

    tiny_sd.pipe.scheduler = make_scheduler(tiny_sd, scheduler)
    ref = _diffusers_images(tiny_sd.pipe, PROMPTS, SEEDS, 4, 5.0, 32)
    ours = generate(tiny_sd, PROMPTS, SEEDS, steps=4, guidance=5.0, height=32, width=32, progress=False)
    assert_close(ours.pixels.permute(0, 2, 3, 1), ref, 1e-4)


def test_negative_prompt_matches_diffusers(tiny_sd):
    ref = _diffusers_images(tiny_sd.pipe, PROMPTS, SEEDS, 3, 5.0, 32, negative_prompt=["green", "green"])
    ours = generate(tiny_sd, PROMPTS, SEEDS, steps=3, guidance=5.0, height=32, width=32,
                    negative_prompt="green", progress=False)
    assert_close(ours.pixels.permute(0, 2, 3, 1), ref, 1e-4)
