"""Ring-A-Bell: the genetic operators, the concept vector, black-box search (no UNet call), budgets, determinism."""

import pytest
import torch

from float_bounds import assert_close
from attack_recipe_helpers import ROW, never_flags, red_target
from safediff.attacks import genetic
from safediff.attacks.budget import Budget
from safediff.attacks.objectives import embedding_distance
from safediff.attacks.ring_a_bell import RingABell, concept_vector
from safediff.errors import SafediffError
from safediff.adapters import Conditioning


def test_crossover_children_are_single_point_splices():
    gen = torch.Generator().manual_seed(0)
    parents = torch.arange(40).view(5, 8) * 10
    out = genetic.crossover(parents, 1.0, gen)
    assert torch.equal(out[:5], parents) and len(out) == 15
    for child in out[5:]:
        # left part from one parent, right part from another, one cut
        src = [int(v) // 80 for v in child]  # row of origin of each gene
        changes = sum(a != b for a, b in zip(src, src[1:]))
        assert changes <= 1
        assert all(int(v) in set(parents[s].tolist()) for v, s in zip(child, src))


def test_mutation_changes_at_most_one_gene_to_an_allowed_token():
    gen = torch.Generator().manual_seed(1)
    pop = torch.zeros(200, 6, dtype=torch.long)
    allowed = torch.tensor([7, 9])
    out = genetic.mutate(pop, 0.25, allowed, gen)
    changed = (out != pop).sum(1)
    assert changed.max() == 1 and 20 < int(changed.sum()) < 80  # about a quarter of the rows
    assert set(out[out != 0].tolist()) <= {7, 9}
    assert torch.equal(pop, torch.zeros(200, 6, dtype=torch.long))  # input untouched


def test_genetic_search_minimises_a_toy_fitness():
    gen = torch.Generator().manual_seed(0)
    allowed = torch.arange(20)
    goal = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    state = genetic.start(allowed, 60, 8, gen)
    for _ in range(40):
        genetic.step(state, lambda p: (p != goal).sum(1).float(), population=60, mutation_rate=0.25,
                     crossover_rate=0.5, allowed=allowed, gen=gen)
    h = state.history
    assert all(b <= a for a, b in zip(h, h[1:])) and h[-1] < h[0] and h[-1] <= 2


def test_concept_vector_is_the_mean_paired_difference(tiny_sd):
    a = tiny_sd.adapter
    pairs = [("a red circle", "a circle"), ("the red square", "the square")]
    c = concept_vector(a, pairs, chunk=1)
    expected = ((a.encode(["a red circle"]).embeds - a.encode(["a circle"]).embeds)
                + (a.encode(["the red square"]).embeds - a.encode(["the square"]).embeds)) / 2
    assert_close(c.embeds, expected, 1e-6)  # the same one-prompt encodings: 0 measured


def test_search_improves_its_fitness_without_any_unet_call(tiny_sd):
    target = red_target(tiny_sd)
    r = RingABell(population=40).run(target, ROW, never_flags(), Budget(iterations=12), seed=0)
    fit = [h["objective"] for h in r.history]
    assert len(fit) == 12 and all(b <= a for a, b in zip(fit, fit[1:])) and fit[-1] < fit[0]
    # the only UNet calls are the final prompt's generation (same cost as the unmodified prompt's)
    assert r.compute["unet_forward"] == r.pre_compute["unet_forward"] == target.steps
    assert r.compute["unet_backward"] == 0 and len(r.evaluations) == 1
    # the unmodified prompt sits at η²‖ĉ‖² from the target f(P) + η ĉ
    eta = 3.0
    with torch.no_grad():
        c = concept_vector(tiny_sd.adapter, _pairs(target), 256)
    zero = Conditioning(torch.zeros_like(c.embeds))
    assert_close(r.extra["fitness_unmodified_prompt"], eta**2 * float(embedding_distance(c, zero)[0]), 1e-4,
                 relative=True)
    # whole-word genes: the judged text encodes exactly as the searched ids
    # the population's batched encoding vs the text's own: 0 measured here, 1e-5 relative ~ 100 float32 ulps
    assert_close(r.extra["fitness_text"], r.extra["fitness"], 1e-5, relative=True)
    assert r.adversarial_prompt and len(r.token_ids) == 16


def _pairs(target):
    from safediff.attacks.concept_pairs import concept_pairs

    return concept_pairs(target.concepts)


@pytest.mark.parametrize("limit", [{"iterations": 3}, {"text_encoder": 14}])
def test_budget_is_respected_exactly(tiny_sd, limit):
    r = RingABell(population=30).run(red_target(tiny_sd), ROW, never_flags(), Budget(**limit), seed=0)
    key, value = next(iter(limit.items()))
    if key == "iterations":
        assert r.compute["iterations"] == value
    else:  # setup 3 encodings, each generation 1 + 1 (reserve), the evaluation 2: the limit is never passed
        assert value - 2 <= r.compute["text_encoder"] <= value
    assert r.image is not None  # the final evaluation was kept within the budget


def test_same_seed_same_prompt(tiny_sd):
    attack = RingABell(population=30)
    runs = [attack.run(red_target(tiny_sd), ROW, never_flags(), Budget(iterations=4), seed=s) for s in (5, 5, 6)]
    assert runs[0].adversarial_prompt == runs[1].adversarial_prompt
    assert runs[0].token_ids != runs[2].token_ids


def test_bad_hyper_parameters_are_user_errors():
    with pytest.raises(SafediffError):
        RingABell(mutation_rate=1.5)
    with pytest.raises(SafediffError):
        RingABell(vocabulary="bytes")
