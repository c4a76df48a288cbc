"""P4D-N / P4D-K: improve their noise-matching objective, output real tokens, respect budgets, are deterministic."""

import pytest

from attack_objective_helpers import matching_probe, random_slot_ids, text_sensitive
from attack_recipe_helpers import ROW, never_flags, red_target
from safediff.attacks.budget import Budget
from safediff.attacks.target import Target
from safediff.attacks.p4d import P4DK, P4DN
from safediff.attacks.spaces import TokenSlots


@pytest.mark.parametrize("cls, layout", [(P4DN, "free"), (P4DK, "every")])
def test_search_improves_noise_matching_against_the_unconstrained_model(tiny_sd, cls, layout):
    from safediff.models import from_pipeline
    from safediff.random_models import build_pipeline

    # target = a differently-initialised copy (an "erased" model); reference = the unconstrained model
    reference = text_sensitive(tiny_sd)
    erased = text_sensitive(from_pipeline(build_pipeline("tiny-sd", seed=1), "tiny-sd-erased", tiny_sd.defaults))
    target = Target(model=erased, reference_model=reference, spec="tiny-sd-erased")
    attack = cls(n_tokens=6, eval_every=1000, skip_when_pre_success=False)
    result = attack.run(target, ROW, never_flags(), Budget(iterations=40), 0)
    x0 = target.generate([ROW["prompt"]], [0], model=reference).latents  # the attack's z0
    k = len(result.extra["slot_ids"])
    found = matching_probe(target, ROW["prompt"], x0, result.extra["slot_ids"], layout)
    start = matching_probe(target, ROW["prompt"], x0, result.extra["initial_slot_ids"], layout)
    randoms = [matching_probe(target, ROW["prompt"], x0, ids, layout)
               for ids in random_slot_ids(erased, k, 4)]
    # better than where it started, and better than a typical random choice of the same number of tokens
    assert found < start and found < sorted(randoms)[len(randoms) // 2], (found, start, randoms)
    # each step: one target and one reference forward, one backward; plus the final judged generation (3 steps)
    assert result.compute["iterations"] == 40 and result.compute["unet_backward"] == 40
    assert result.compute["unet_forward"] == 2 * 40 + 3


def test_output_is_real_text_that_re_encodes_to_the_optimised_tokens(tiny_sd):
    target = red_target(tiny_sd)
    for cls in (P4DN, P4DK):
        result = cls(n_tokens=5, eval_every=1000, skip_when_pre_success=False).run(
            target, ROW, never_flags(), Budget(iterations=6), 0)
        slots = TokenSlots(tiny_sd, ROW["prompt"], 5, cls.layout)
        text = slots.text(result.extra["slot_ids"])
        assert text == result.adversarial_prompt
        tok = tiny_sd.adapter.tokenizers[0]
        assert tok(text, add_special_tokens=False).input_ids == slots.token_ids(result.extra["slot_ids"])
        assert result.token_ids == slots.token_ids(result.extra["slot_ids"])


def test_p4d_k_keeps_the_prompt_and_adds_one_token_per_three(tiny_sd):
    result = P4DK(eval_every=1000, skip_when_pre_success=False).run(
        red_target(tiny_sd), {"prompt": "a b c d e f g"}, never_flags(), Budget(iterations=2), 0)
    words = result.adversarial_prompt.split()  # L a b c L d e f L g: floor(7 / 3) + 1 learnable tokens
    assert len(result.extra["slot_ids"]) == 3 and len(words) == 10
    assert words[1:4] == ["a", "b", "c"] and words[5:8] == ["d", "e", "f"] and words[9] == "g"


def test_budget_binds_with_periodic_evaluations(tiny_sd):
    target = red_target(tiny_sd)
    result = P4DN(n_tokens=4, eval_every=3, skip_when_pre_success=False).run(
        target, ROW, never_flags(), Budget(unet_forward=23), 0)
    # steps cost 2 forwards, evaluations 3 (after steps 3 and 6, and a final one unless the prompt is unchanged);
    # one evaluation is always kept in reserve: 7 steps fit, an 8th step plus an evaluation would not
    fwd = result.compute["unet_forward"]
    assert result.compute["iterations"] == 7 and fwd == 2 * 7 + 3 * len(result.evaluations)
    assert fwd <= 23 < fwd + 2 + 3 and len(result.evaluations) in (2, 3)


def test_same_seed_same_prompt(tiny_sd):
    target = red_target(tiny_sd)
    runs = [P4DN(n_tokens=4, eval_every=1000, skip_when_pre_success=False).run(
        target, ROW, never_flags(), Budget(iterations=5), s) for s in (7, 7, 8)]
    assert runs[0].adversarial_prompt == runs[1].adversarial_prompt and runs[0].history == runs[1].history
    assert runs[0].extra["initial_slot_ids"] != runs[2].extra["initial_slot_ids"]
