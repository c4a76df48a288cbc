"""Concept Arithmetics: one term of weight 1 = plain CFG of that prompt; cancelling terms change nothing (also
behind another guard); term parsing; the recipe's one-generation cost and budget."""

import pytest
import torch

from float_bounds import BATCH_LATENTS, assert_close
from attack_recipe_helpers import ROW, never_flags, red_target
from safediff.attacks.budget import Budget
from safediff.attacks.concept_arithmetic import (ConceptArithmetic, ConceptArithmeticGuard, Term, describe, merge,
                                                 parse_terms)
from safediff.concepts import resolve
from safediff.errors import SafediffError
from safediff.guards.negative_prompt import NegativePromptGuard
from safediff.sampling import generate


def test_single_term_of_weight_one_is_plain_cfg_of_that_prompt(tiny_sd):
    plain = generate(tiny_sd, ["a red circle"], [3], progress=False)
    guard = ConceptArithmeticGuard([Term("a red circle", 1.0)], include_prompt=False)
    arc = generate(tiny_sd, ["an unrelated prompt"], [3], guard=guard, progress=False)
    assert torch.equal(plain.latents, arc.latents) and arc.unet_batch_per_step == plain.unet_batch_per_step


def test_weights_add_linearly(tiny_sd):
    plain = generate(tiny_sd, ["a red circle"], [3], progress=False)
    halves = ConceptArithmeticGuard([Term("a red circle", 0.5), Term("a red circle", 0.5)], include_prompt=False)
    arc = generate(tiny_sd, ["x"], [3], guard=halves, progress=False)
    assert_close(arc.latents, plain.latents, BATCH_LATENTS)  # 3 branches vs 2


@pytest.mark.parametrize("inner", [None, "negative-prompt"])
def test_cancelling_terms_leave_the_attacked_sampler_unchanged(tiny_sd, inner):
    guard = NegativePromptGuard(resolve("red")) if inner else None
    base = generate(tiny_sd, ["a red circle"], [1], guard=guard, progress=False)
    terms = [Term("a crimson circle", 0.7), Term("a crimson circle", -0.7)]
    arc = generate(tiny_sd, ["a red circle"], [1], guard=ConceptArithmeticGuard(terms, inner=guard), progress=False)
    assert arc.unet_batch_per_step == [b + 2 for b in base.unet_batch_per_step]  # one UNet call, 2 more branches
    assert_close(arc.latents, base.latents, BATCH_LATENTS)  # 2 more branches in the UNet batch
    assert arc.settings["guard"]["inner"]["name"] == (inner or "none")


def test_terms_parse_and_merge():
    terms = parse_terms("+a crimson circle; -a circle;0.5*a red disc; -2*x; a star * shape")
    assert terms == [Term("a crimson circle", 1.0), Term("a circle", -1.0), Term("a red disc", 0.5),
                     Term("x", -2.0), Term("a star * shape", 1.0)]
    assert parse_terms(describe(terms)) == terms
    assert merge([Term("a", 1.0), Term("b", 2.0), Term("a", -1.0), Term("b", 1.0)]) == [Term("b", 3.0)]
    for bad in ("+", "2*"):
        with pytest.raises(SafediffError):
            parse_terms(bad)
    with pytest.raises(SafediffError):
        ConceptArithmetic(composition="sum")


def test_recipe_costs_one_generation_and_is_seeded(tiny_sd):
    target = red_target(tiny_sd)
    runs = [ConceptArithmetic(max_pairs=4).run(target, ROW, never_flags(), Budget(), seed=s) for s in (0, 0, 1)]
    r = runs[0]
    n_terms = len(r.extra["terms"])
    assert 4 < n_terms <= 8 and r.extra["branches_per_step"] == 2 + n_terms
    assert r.compute["unet_forward"] == target.steps and r.compute["unet_backward"] == 0
    assert all(w == pytest.approx(0.25) or w < 0 for _, w in r.extra["terms"])  # mean of 4 detours, strength 1
    assert runs[0].extra["terms"] == runs[1].extra["terms"] != runs[2].extra["terms"]
    assert r.image is not None and r.adversarial_prompt.startswith("a red circle | ")


def test_budget_too_small_for_the_generation(tiny_sd):
    r = ConceptArithmetic().run(red_target(tiny_sd), ROW, never_flags(), Budget(unet_forward=2), seed=0)
    assert r.compute["unet_forward"] == 0 and r.image is None and "stopped" in r.extra
