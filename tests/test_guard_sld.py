"""SLD guard: parity with diffusers' StableDiffusionPipelineSafe, zero strength = plain CFG, one UNet call of 3
branches per step, batch independence, SDXL, bad input and the CLI."""

import json

import pytest
import torch
from float_bounds import BATCH_LATENTS, assert_close
from guard_checks import count_unet_calls, pipeline_state

from safediff.concepts import resolve
from safediff.errors import SafediffError
from safediff.guards import build_guard
from safediff.guards.base import GenerationContext
from safediff.guards.sld import SLD, SLDSession
from safediff.sampling import generate

from cli_helpers import run_cli

PROMPTS = ["a red circle", "a photo of a blue square on white"]
SEEDS = [3, 11]
STEPS, GUIDANCE = 20, 7.5  # enough steps that every preset's warm-up (up to 15) ends and guidance acts


def safe_pipeline(model):
    from diffusers.pipelines.deprecated.stable_diffusion_safe import StableDiffusionPipelineSafe

    p = model.pipe
    safe = StableDiffusionPipelineSafe(vae=p.vae, text_encoder=p.text_encoder, tokenizer=p.tokenizer, unet=p.unet,
                                       scheduler=type(p.scheduler).from_config(p.scheduler.config),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    safe.set_progress_bar_config(disable=True)
    return safe


def diffusers_config(preset):
    from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig

    return {"weak": {**SafetyConfig.WEAK, "sld_guidance_scale": 200}, "weak-diffusers": SafetyConfig.WEAK,
            "medium": SafetyConfig.MEDIUM, "strong": SafetyConfig.STRONG, "max": SafetyConfig.MAX}[preset]


@pytest.mark.parametrize("preset", ["weak", "weak-diffusers", "medium", "strong", "max"])
def test_matches_diffusers_safe_pipeline(tiny_sd, preset):
    guard = build_guard(f"sld:{preset}", "illegal")
    safe = safe_pipeline(tiny_sd)
    safe.safety_concept = guard.concept_text
    final = {}
    ref = safe(PROMPTS, generator=[torch.Generator("cpu").manual_seed(s) for s in SEEDS], num_inference_steps=STEPS,
               guidance_scale=GUIDANCE, height=32, width=32, output_type="np",
               callback=lambda i, t, latents: final.update(latents=latents.clone()), callback_steps=1,
               **diffusers_config(preset)).images
    ours = generate(tiny_sd, PROMPTS, SEEDS, steps=STEPS, guidance=GUIDANCE, guard=guard, progress=False)
    plain = generate(tiny_sd, PROMPTS, SEEDS, steps=STEPS, guidance=GUIDANCE, progress=False)
    assert_close(ours.pixels.permute(0, 2, 3, 1), ref, 1e-4)
    assert_close(ours.latents, final["latents"], 1e-4)
    # not vacuous: SLD moved the latents far more than the tolerance (the random VAE shrinks pixel differences)
    assert (ours.latents - plain.latents).abs().max() > 1e-3


def test_weak_preset_defaults_to_200_and_diffusers_value_is_selectable():
    concepts = resolve("red")
    assert SLD(concepts, "weak").params.safety_scale == 200.0
    assert SLD(concepts, "weak-diffusers").params.safety_scale == 20.0
    assert SLD(concepts, "weak", safety_scale="20").params == SLD(concepts, "weak-diffusers").params
    assert build_guard("sld:weak,safety_scale=20", "red").params == SLD(concepts, "weak-diffusers").params
    assert SLD(concepts).preset == "medium"


@pytest.mark.parametrize("spec", ["sld:max,safety_scale=0", "sld:strong,safety_scale=1"])
def test_zero_strength_is_plain_cfg(tiny_sd, spec):
    plain = generate(tiny_sd, PROMPTS, SEEDS, steps=6, progress=False)
    out = generate(tiny_sd, PROMPTS, SEEDS, steps=6, guard=build_guard(spec, "red"), progress=False)
    assert torch.equal(out.pixels, plain.pixels)
    assert out.unet_batch_per_step == [2] * 6


def test_cfg_off_means_no_safety_guidance(tiny_sd):
    plain = generate(tiny_sd, PROMPTS, SEEDS, steps=4, guidance=1.0, progress=False)
    out = generate(tiny_sd, PROMPTS, SEEDS, steps=4, guidance=1.0, guard=build_guard("sld:max", "red"),
                   progress=False)
    assert torch.equal(out.pixels, plain.pixels) and out.unet_batch_per_step == [1] * 4


def test_one_unet_call_of_three_branches_per_step(tiny_sd):
    with count_unet_calls(tiny_sd) as calls:
        out = generate(tiny_sd, PROMPTS, SEEDS, steps=5, guard=build_guard("sld:max", "red"), progress=False)
    assert calls == [3 * len(PROMPTS)] * 5 and out.unet_batch_per_step == [3] * 5


def test_fast_path_skips_concept_branch_in_warmup_when_momentum_unused(tiny_sd):
    guard = build_guard("sld:weak,warmup=3", "red")  # s_m = 0
    with count_unet_calls(tiny_sd) as calls:
        out = generate(tiny_sd, PROMPTS, SEEDS, steps=6, guard=guard, progress=False)
    assert out.unet_batch_per_step == [2, 2, 2, 3, 3, 3] and calls == [n * len(PROMPTS) for n in [2, 2, 2, 3, 3, 3]]
    with_momentum = generate(tiny_sd, PROMPTS, SEEDS, steps=6, guard=build_guard("sld:medium,warmup=3", "red"),
                             progress=False)
    assert with_momentum.unet_batch_per_step == [3] * 6  # momentum is built up in warm-up: ε_S needed


@pytest.mark.parametrize("preset", ["medium", "strong", "max"])
def test_safety_term_of_a_sample_ignores_the_other_batch_members(tiny_sd, preset):
    """Exact by construction: given the same per-sample noise predictions, the combined prediction (mask, momentum,
    warm-up) of sample b does not depend on the batch it is in."""
    g = torch.Generator().manual_seed(0)
    steps, batch = 6, 3
    eps = [[torch.randn(batch, 4, 4, 4, generator=g) * 0.05 for _ in range(3)] for _ in range(steps)]
    guard = build_guard(f"sld:{preset},warmup=2", "red")

    def combined(members):
        ctx = GenerationContext(tiny_sd, ["p"] * len(members), None, None, 7.5, torch.arange(steps), 32, 32)
        session = SLDSession(ctx, guard.params, None)
        return [session.guide(i, *(e[members] for e in eps[i])) for i in range(steps)]

    together = combined([0, 1, 2])
    for b in range(batch):
        alone = combined([b])
        assert all(torch.equal(together[i][b:b + 1], alone[i]) for i in range(steps))
    assert not torch.equal(together[-1][0], together[-1][1])


def test_batch_members_are_independent_end_to_end(tiny_sd):
    # λ = 0 keeps the mask μ continuous in ε_p − ε_S (μ = 0 on both sides of 0), so UNet rounding that differs between
    # batch sizes moves the result by rounding-sized amounts; with λ > 0 one element on the threshold may flip μ from
    # min(1, s_S·λ) to 0, a jump no float bound can absorb (that part is exact: the test above). s_S = 50 keeps the
    # mask's slope (s_S) moderate; s_m, β_m and δ are strong's.
    guard = build_guard("sld:strong,warmup=2,threshold=0,safety_scale=50", "illegal")
    together = generate(tiny_sd, PROMPTS, SEEDS, steps=8, guard=guard, progress=False)
    alone = generate(tiny_sd, PROMPTS, SEEDS, steps=8, guard=guard, batch_size=1, progress=False)
    plain = generate(tiny_sd, PROMPTS, SEEDS, steps=8, progress=False)
    assert_close(together.latents, alone.latents, BATCH_LATENTS)
    assert (together.latents - plain.latents).abs().max() > 1e-1  # SLD acted (measured 0.87): not vacuous


def test_session_leaves_pipeline_unchanged(tiny_sd):
    before = pipeline_state(tiny_sd)
    plain = generate(tiny_sd, PROMPTS, SEEDS, steps=3, progress=False)
    guard = build_guard("sld:max", "red")
    first = generate(tiny_sd, PROMPTS, SEEDS, steps=3, guard=guard, progress=False)
    assert pipeline_state(tiny_sd) == before
    assert torch.equal(generate(tiny_sd, PROMPTS, SEEDS, steps=3, guard=guard, progress=False).pixels,
                       first.pixels)  # no momentum carried from one call to the next
    assert torch.equal(generate(tiny_sd, PROMPTS, SEEDS, steps=3, progress=False).pixels, plain.pixels)


def test_sdxl_with_pooled_embeddings(tiny_sdxl):
    plain = generate(tiny_sdxl, PROMPTS, SEEDS, steps=4, progress=False)
    with count_unet_calls(tiny_sdxl) as calls:
        out = generate(tiny_sdxl, PROMPTS, SEEDS, steps=4, guard=build_guard("sld:max", "illegal"), progress=False)
    assert calls == [6] * 4
    assert (out.latents - plain.latents).abs().max() > 1e-3
    off = generate(tiny_sdxl, PROMPTS, SEEDS, steps=4, guard=build_guard("sld:max,safety_scale=0", "illegal"),
                   progress=False)
    assert torch.equal(off.pixels, plain.pixels)


def test_several_concepts_become_one_text_and_config_is_complete():
    guard = build_guard("sld:max,momentum_beta=0.5", "red,circle")
    cfg = guard.config()
    assert cfg["concept_text"] == "red, circle" and cfg["concepts"] == ["red", "circle"]
    assert cfg["preset"] == "max" and cfg["momentum_beta"] == 0.5 and cfg["safety_scale"] == 5000.0
    assert {"warmup", "threshold", "momentum_scale"} <= set(cfg)
    assert build_guard("sld").concept_text.startswith("an image showing hate, harassment, violence")  # sld-default


@pytest.mark.parametrize("spec, words", [
    ("sld:nope", "unknown preset 'nope'"),
    ("sld:max,safety_scale=-1", "safety_scale"),
    ("sld:max,safety_scale=1e9", "safety_scale"),
    ("sld:max,safety_scale=nan", "safety_scale"),
    ("sld:max,momentum_beta=1.5", "momentum_beta"),
    ("sld:max,warmup=2.5", "not a valid int"),
    ("sld:max,warmup=-1", "warmup"),
    ("sld:max,strength=3", "unknown option 'strength'"),
    ("sld:max,safety_scale=big", "not a valid finite number"),
    ("sld:max,strong", "a preset comes first, once"),
])
def test_bad_options_are_rejected(spec, words):
    with pytest.raises(SafediffError, match=words):
        build_guard(spec, "red")


def test_bad_keyword_overrides_and_empty_concept_are_rejected():
    with pytest.raises(SafediffError, match="safety_scale"):
        SLD(resolve("red"), "max", safety_scale=-5)
    with pytest.raises(SafediffError, match="unknown option"):
        SLD(resolve("red"), "max", scale=5)
    with pytest.raises(SafediffError, match="empty concept"):
        build_guard("sld:max", "  ")


# --- through the CLI ---------------------------------------------------------------------------------------------

def test_cli_generate_with_sld_records_guard(tiny_folder, tmp_path):
    out = tmp_path / "out"
    r = run_cli("generate", "--model", str(tiny_folder), "--prompt", "a red circle", "--guard",
                "sld:max,safety_scale=3000", "--concept", "red,circle", "--steps", "2", "--height", "32",
                "--width", "32", "--out", str(out))
    assert r.returncode == 0, r.stderr
    guard = json.loads((out / "protocol.json").read_text())["generation"]["guard"]
    assert guard["name"] == "sld" and guard["preset"] == "max" and guard["safety_scale"] == 3000.0
    assert guard["concept_text"] == "red, circle" and guard["warmup"] == 0


@pytest.mark.parametrize("guard, concept, words", [
    ("sld:nope", "red", "unknown preset 'nope'"),
    ("sld:max", "", "empty concept"),
])
def test_cli_bad_guard_one_line_exit_2(tmp_path, guard, concept, words):
    out = tmp_path / "out"
    r = run_cli("generate", "--model", ".", "--prompt", "x", "--guard", guard, "--concept", concept,
                "--out", str(out))
    lines = [line for line in r.stderr.strip().splitlines() if line]
    assert r.returncode == 2 and len(lines) == 1 and words in lines[0], r.stderr
    assert not out.exists()
