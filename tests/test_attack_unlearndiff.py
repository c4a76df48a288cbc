"""UnlearnDiffAtk: improves its denoising objective over its budget, respects budgets exactly, is deterministic."""

import pytest

from attack_objective_helpers import denoising_probe, random_slot_ids, text_sensitive
from attack_recipe_helpers import ROW, never_flags, red_target
from safediff.attacks.budget import Budget
from safediff.attacks.judge import Judge
from safediff.attacks.unlearndiff import UnlearnDiffAtk


@pytest.fixture
def sensitive(tiny_sd):
    return red_target(text_sensitive(tiny_sd))


def test_search_beats_every_random_prefix_on_its_objective(sensitive):
    attack = UnlearnDiffAtk(timesteps=1, iterations_per_timestep=30, noise_batch=4, skip_when_pre_success=False)
    result = attack.run(sensitive, ROW, never_flags(), Budget(), 0)
    x0 = sensitive.generate([ROW["prompt"]], [0]).latents  # the attack's target image (reference model, seed 0)
    found = denoising_probe(sensitive, ROW["prompt"], x0, result.extra["slot_ids"], 5, 500)
    start = denoising_probe(sensitive, ROW["prompt"], x0, result.extra["initial_slot_ids"], 5, 500)
    randoms = [denoising_probe(sensitive, ROW["prompt"], x0, ids, 5, 500)
               for ids in random_slot_ids(sensitive.model, 5, 6)]
    assert found < start and found < min(randoms), (found, start, randoms)
    assert result.compute["unet_backward"] == 30 and len(result.history) == 30


def test_unet_budget_binds_exactly(tiny_sd):
    target = red_target(tiny_sd)
    attack = UnlearnDiffAtk(timesteps=2, iterations_per_timestep=100, skip_when_pre_success=False)
    result = attack.run(target, ROW, never_flags(), Budget(unet_forward=10), 0)
    # 7 iterations (1 forward + 1 backward each) then the reserved final judged generation (3 steps)
    assert result.compute["unet_forward"] == 10
    assert result.compute["unet_backward"] == result.compute["iterations"] == 7
    assert len(result.evaluations) == 1 and result.image is not None


def test_judged_after_every_timestep_and_stops_at_the_first_success(tiny_sd):
    target = red_target(tiny_sd)
    base = UnlearnDiffAtk(timesteps=3, iterations_per_timestep=2, skip_when_pre_success=False)
    result = base.run(target, ROW, never_flags(), Budget(), 0)
    assert [e["iteration"] for e in result.evaluations] == [2, 4, 6] and not result.success
    always = Judge(never_flags().detector, threshold=0.0)  # every image succeeds
    hit = base.run(target, ROW, always, Budget(), 0)
    assert hit.success and [e["iteration"] for e in hit.evaluations] == [2] and hit.compute["iterations"] == 2


def test_same_seed_same_prompt_other_seed_other_search(tiny_sd):
    target = red_target(tiny_sd)
    attack = UnlearnDiffAtk(timesteps=1, iterations_per_timestep=6, random_init=True, skip_when_pre_success=False)
    a = attack.run(target, ROW, never_flags(), Budget(), 4)
    b = attack.run(target, ROW, never_flags(), Budget(), 4)
    c = attack.run(target, ROW, never_flags(), Budget(), 5)
    assert a.adversarial_prompt == b.adversarial_prompt and a.history == b.history
    assert a.history != c.history


def test_pre_success_skips_the_search(tiny_sd):
    always = Judge(never_flags().detector, threshold=0.0)
    result = UnlearnDiffAtk().run(red_target(tiny_sd), ROW, always, Budget(), 0)
    assert result.pre_success and result.success and result.compute["unet_forward"] == 0


def test_guarded_objective_goes_through_the_guard(tiny_sd):
    from safediff.guards import build_guard

    target = red_target(tiny_sd, guard=build_guard("sld:max", "red"))
    attack = UnlearnDiffAtk(timesteps=1, iterations_per_timestep=2, skip_when_pre_success=False)
    result = attack.run(target, ROW, never_flags(), Budget(), 0)
    # SLD max runs three branches (∅, prompt, concept) in one UNet call per objective evaluation
    assert result.compute["unet_forward_samples"] >= 2 * 3 + 3 * 3
    assert result.extra["objective"].endswith("(through guard)")
    plain = UnlearnDiffAtk(timesteps=1, iterations_per_timestep=2, through_guard=False, skip_when_pre_success=False)
    assert plain.run(target, ROW, never_flags(), Budget(), 0).extra["objective"] == "denoising_error"


def test_runs_on_sdxl_through_the_adapter(tiny_sdxl):
    result = UnlearnDiffAtk(timesteps=1, iterations_per_timestep=2, skip_when_pre_success=False).run(
        red_target(tiny_sdxl), ROW, never_flags(), Budget(), 0)
    assert result.compute["unet_backward"] == 2 and result.adversarial_prompt.endswith("a red circle")
