"""The attack contract, checked for every registered attack at its ``sandbox["smoke"]`` settings on tiny models.

An attack added to ``safediff.registry.ATTACKS`` is covered here without writing these tests again:
- the compute it spends, as the meter measures it, never exceeds its budget (the meter refuses any counted unit
  beyond it, so a recipe that does not ask ``afford`` fails here), also under a budget too tight for its plan;
- the same seed gives the same result (prompt, tokens, embedding, success, score, compute counts);
- what it judged is recorded: every evaluation has a score and a verdict, and the returned image is a judged one;
- it runs against an unguarded and a guarded target, on SD-1.x, SDXL, SD3 and FLUX tiny models (text searches
  over T5's vocabulary there, objectives with the flow-matching velocity target).
"""

import pytest
import torch
from attack_recipe_helpers import ROW, never_flags, red_target

from safediff.attacks.budget import COUNTED, Budget
from safediff.attacks.runner import build_attack
from safediff.guards import build_guard
from safediff.registry import ATTACKS

NAMES = ATTACKS.primary_names()


def smoke(name: str):
    tier = ATTACKS.get(name).sandbox.get("smoke", {})
    attack = build_attack(f"{name}:{tier['params']}" if tier.get("params") else name)
    return attack, Budget.parse(tier.get("budget"), attack.default_budget)


def comparable(result) -> dict:
    out = result.record()
    out["compute"] = {k: v for k, v in out["compute"].items() if k != "seconds"}
    out["pre_compute"] = {k: v for k, v in out["pre_compute"].items() if k != "seconds"}
    out["extra"] = {k: v for k, v in out["extra"].items() if k != "setup_compute"}  # holds seconds
    out["embedding"] = None if result.embedding is None else result.embedding.tolist()
    return out


def within(compute: dict, budget: Budget) -> bool:
    return all(getattr(budget, k) is None or compute[k] <= getattr(budget, k) for k in COUNTED)


@pytest.mark.parametrize("arch, guarded", [("tiny_sd", False), ("tiny_sd", True), ("tiny_sd3", False),
                                           ("tiny_flux", True)])
@pytest.mark.parametrize("name", NAMES)
def test_contract_within_budget_deterministic_and_judged(request, arch, name, guarded):
    model = request.getfixturevalue(arch)
    target = red_target(model, build_guard("sld:max", "red") if guarded else None)
    attack, budget = smoke(name)
    first = attack.run(target, ROW, never_flags(), budget, seed=5)
    second = attack.run(target, ROW, never_flags(), budget, seed=5)
    assert within(first.compute, budget), (first.compute, budget)
    assert comparable(first) == comparable(second)
    for ev in first.evaluations:
        assert isinstance(ev["score"], float) and isinstance(ev["success"], bool)
    if first.image is not None:
        assert first.score is not None and first.evaluations
        assert any(abs(ev["score"] - round(first.score, 6)) < 1e-9 for ev in first.evaluations)


@pytest.mark.parametrize("name", NAMES)
def test_contract_a_budget_too_tight_for_the_plan_is_respected(tiny_sd, name):
    target = red_target(tiny_sd)
    attack, budget = smoke(name)
    planned = attack.run(target, ROW, never_flags(), budget, seed=5).compute
    tight = Budget(**{k: max(1, planned[k] // 3) for k in COUNTED if planned[k] > 0})  # a third of each unit used
    result = attack.run(target, ROW, never_flags(), tight, seed=5)
    assert within(result.compute, tight), (result.compute, tight)


@pytest.mark.parametrize("name", NAMES)
def test_contract_runs_on_sdxl(tiny_sdxl, name):
    attack, budget = smoke(name)
    result = attack.run(red_target(tiny_sdxl), ROW, never_flags(), budget, seed=1)
    assert within(result.compute, budget)
    assert result.embedding is None or torch.isfinite(result.embedding).all()
