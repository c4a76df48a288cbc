"""SD3 and FLUX.1 as models: loading saved folders, defaults, latent layout, SD3 without T5, size and scheduler
checks, the memory options, and the one premise of the closed-form erasers (``context_embedder`` reads the encoder
output itself)."""

import numpy as np
import pytest
import torch

from float_bounds import assert_close
from safediff.adapters.flux import pack, unpack
from safediff.errors import SafediffError
from safediff.sampling import denoiser_output, generate

PROMPTS = ["a red circle", "a photo of a blue square on white"]
SEEDS = [3, 11]


@pytest.fixture(scope="module")
def dit_folders(tmp_path_factory):
    """Tiny SD3 and FLUX.1-dev pipelines saved with ``save_pretrained`` (what ``--model DIR`` reads)."""
    from safediff.random_models import build_pipeline

    root = tmp_path_factory.mktemp("dit")
    folders = {}
    for arch in ("tiny-sd3", "tiny-flux"):
        build_pipeline(arch).save_pretrained(root / arch)
        folders[arch] = root / arch
    return folders


@pytest.mark.parametrize("arch, adapter, defaults", [
    ("tiny-sd3", "sd3", {"steps": 28, "guidance": 7.0, "height": 32, "width": 32}),
    ("tiny-flux", "flux", {"steps": 28, "guidance": 1.0, "height": 256, "width": 256, "embedded_guidance": 3.5}),
])
def test_saved_folders_load_with_the_pipelines_defaults(dit_folders, arch, adapter, defaults):
    from safediff.models import load_pipeline
    from safediff.random_models import build_pipeline

    model = load_pipeline(str(dit_folders[arch]))
    assert model.adapter.arch == adapter and model.defaults == defaults
    assert model.protocol()["architecture"] == adapter
    fresh = build_pipeline(arch)  # same seed: the loaded weights are the saved ones
    assert model.base_sha256 and torch.equal(model.denoiser.proj_out.weight, fresh.transformer.proj_out.weight)
    out = generate(model, PROMPTS[:1], SEEDS[:1], steps=2, height=32, width=32, progress=False)
    assert out.pixels.shape == (1, 3, 32, 32) and torch.isfinite(out.latents).all()


def test_flux_packing_is_a_permutation_of_the_latents():
    x = torch.randn(2, 4, 6, 8)
    packed = pack(x)
    assert packed.shape == (2, 3 * 4, 16)
    assert torch.equal(unpack(packed, 6, 8), x)
    assert torch.equal(packed.sort(dim=-1).values.sort(dim=1).values.flatten().sort().values,
                       x.flatten().view(2, -1).flatten().sort().values)


def test_sd3_without_t5_matches_diffusers(tiny_sd3):
    """The memory option diffusers documents for SD3: no T5, its 256 tokens are zeros."""
    pipe = tiny_sd3.pipe
    pipe.text_encoder_3, pipe.tokenizer_3 = None, None
    assert len(tiny_sd3.adapter.text_encoders) == 2 and tiny_sd3.adapter.search_segment.encoders == (0, 1)
    cond = tiny_sd3.adapter.encode(PROMPTS)
    assert cond.embeds.shape == (2, 77 + 256, 64) and not cond.embeds[:, 77:].any()
    gens = [torch.Generator("cpu").manual_seed(s) for s in SEEDS]
    ref = pipe(PROMPTS, generator=gens, num_inference_steps=3, guidance_scale=5.0, height=32, width=32,
               output_type="np").images
    ours = generate(tiny_sd3, PROMPTS, SEEDS, steps=3, guidance=5.0, height=32, width=32, progress=False)
    assert_close(ours.pixels.permute(0, 2, 3, 1), ref, 1e-4)
    assert np.abs(ref[0] - ref[1]).max() > 1e-3


@pytest.mark.parametrize("fixture", ["tiny_sd3", "tiny_flux"])
def test_sizes_and_schedulers_the_model_cannot_take_are_refused(request, fixture):
    model = request.getfixturevalue(fixture)
    with pytest.raises(SafediffError, match="multiple of 4"):  # VAE factor 2 x 2x2 patches
        generate(model, PROMPTS[:1], SEEDS[:1], steps=2, height=34, width=32, progress=False)
    with pytest.raises(SafediffError, match="does not accept the scheduler 'ddim'; accepted: euler"):
        generate(model, PROMPTS[:1], SEEDS[:1], steps=2, scheduler="ddim", progress=False)
    assert generate(model, PROMPTS[:1], SEEDS[:1], steps=2, scheduler="euler", progress=False).latents.shape[0] == 1


def test_embedded_guidance_is_refused_where_there_is_none(tiny_sd3, tiny_flux_schnell):
    for model in (tiny_sd3, tiny_flux_schnell):
        with pytest.raises(SafediffError, match="no embedded guidance"):
            generate(model, PROMPTS[:1], SEEDS[:1], steps=2, embedded_guidance=3.5, progress=False)


@pytest.mark.parametrize("fixture", ["tiny_sd3", "tiny_flux"])
def test_context_embedder_reads_the_encoder_output_itself(request, fixture):
    """Why the closed forms edit it: its input is exactly ``adapter.encode`` (its context K/V read something else)."""
    model = request.getfixturevalue(fixture)
    seen = {}
    readers = model.adapter.text_readers()
    (_, tokens), = readers["tokens"]
    (_, pooled), = readers["pooled"]
    (_, first_kv), *_ = model.adapter.text_kv()
    hooks = [m.register_forward_pre_hook(lambda mod, args, key=key: seen.setdefault(key, args[0].clone()))
             for key, m in (("tokens", tokens), ("pooled", pooled), ("kv", first_kv))]
    cond = model.adapter.encode(PROMPTS)
    with torch.no_grad():
        denoiser_output(model, torch.randn(2, *model.adapter.latent_shape(32, 32)), torch.tensor(500.0), cond)
    for h in hooks:
        h.remove()
    assert torch.equal(seen["tokens"], cond.embeds) and torch.equal(seen["pooled"], cond.pooled)
    kv = seen["kv"]  # the context K/V of block 0 read the normalised, modulated, embedded text stream instead
    assert kv.shape != cond.embeds.shape or (kv - cond.embeds).abs().max() > 1e-2


def test_cached_text_is_reused_until_the_weights_change(dit_folders):
    from safediff.models import load_pipeline

    model = load_pipeline(str(dit_folders["tiny-flux"]), cache_text=True, text_encoder_device="cpu")
    with torch.no_grad():
        first = model.adapter.encode(PROMPTS)
        assert model.adapter.encode(PROMPTS) is first  # identical token batch: computed once
        assert model.adapter.encode(PROMPTS[:1]) is not first
        t5 = model.adapter.text_encoders[1]
        t5.shared.weight.mul_(2.0)  # a weight changes in place (an edit): the cache must not answer
        changed = model.adapter.encode(PROMPTS)
    assert changed is not first and not torch.equal(changed.embeds, first.embeds)
    assert model.adapter.encode(PROMPTS) is not model.adapter.encode(PROMPTS)  # with gradients on: never cached
