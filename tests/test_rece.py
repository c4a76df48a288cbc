"""RECE: adversarial embedding solve, re-alignment, epoch selection by the validator, model left untouched."""

import torch

from safediff.erasers import build_eraser
from safediff.concepts import resolve
from safediff.erasers.closed_form import adversarial_map, kv_projections
from safediff.erasers.prompts import build_rows
from safediff.erasers.rece import RECE, concept_type_of
from safediff.erasers.uce import UCE
from weight_checks import snapshot


def test_adversarial_embedding_solves_the_regularised_least_squares():
    """c' = argmin Σ_l ‖W'_l c' − W_l c‖² + λ‖c'‖², checked against lstsq on the stacked system."""
    gen = torch.Generator().manual_seed(0)
    d, reg = 8, 0.1
    original = {f"w{i}": torch.randn(5 + i, d, generator=gen, dtype=torch.float64) for i in range(3)}
    current = {k: w + 0.3 * torch.randn(w.shape, generator=gen, dtype=torch.float64) for k, w in original.items()}
    c = torch.randn(d, generator=gen, dtype=torch.float64)
    got = adversarial_map(current, original, reg) @ c
    a = torch.cat([*current.values(), reg ** 0.5 * torch.eye(d, dtype=torch.float64)])
    b = torch.cat([*(w @ c for w in original.values()), torch.zeros(d, dtype=torch.float64)])
    want = torch.linalg.lstsq(a, b[:, None]).solution[:, 0]
    assert torch.allclose(got, want, atol=1e-10)
    assert torch.allclose(adversarial_map(original, original, 0.0) @ c, c)  # unedited: c itself


def test_epoch_zero_is_uce_and_fit_leaves_the_model_alone(tiny_sd):
    before = snapshot(tiny_sd)
    uce = UCE().fit(tiny_sd, resolve("red"), progress=False)
    rece0 = RECE(epochs=0).fit(tiny_sd, resolve("red"), progress=False)
    assert uce.digest == rece0.digest
    rece = RECE(epochs=2).fit(tiny_sd, resolve("red"), progress=False)
    after = snapshot(tiny_sd)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert set(rece.tensors) == set(kv_projections(tiny_sd))
    assert rece.digest != uce.digest
    assert rece.metadata["info"]["chosen_epoch"] == 2  # no validator (not the sandbox): the last epoch


def test_validator_picks_the_lowest_rate_epoch(tiny_sd):
    seen = []
    rates = iter([0.5, 0.2, 0.3, 0.2])

    def validator(model):
        seen.append({n: m.weight.detach().clone() for n, m in kv_projections(model).items()})
        return next(rates)

    before = snapshot(tiny_sd)
    chosen = RECE(epochs=3, validator=validator).fit(tiny_sd, resolve("red"), progress=False)
    assert chosen.metadata["info"]["validation_rates"] == [0.5, 0.2, 0.3, 0.2]
    assert chosen.metadata["info"]["chosen_epoch"] == 1  # lowest; the earlier one on ties
    assert "validator" not in chosen.metadata["hyperparameters"]
    one_epoch = RECE(epochs=1).fit(tiny_sd, resolve("red"), progress=False)
    assert chosen.digest == one_epoch.digest
    assert len(seen) == 4 and all(torch.equal(seen[1][n], one_epoch.tensors[n]) for n in one_epoch.tensors)
    assert not torch.equal(seen[0][next(iter(seen[0]))], seen[1][next(iter(seen[1]))])
    after = snapshot(tiny_sd)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_realignment_maps_the_adversarial_embeddings_toward_the_guide(tiny_sd):
    concepts = resolve("red")
    rows = build_rows(tiny_sd, concepts, None, [], "last", False)
    original = {n: m.weight.detach().double() for n, m in kv_projections(tiny_sd).items()}
    uce = UCE(tokens="last", expand_prompts=False).fit(tiny_sd, concepts, preserve=[], progress=False)
    start = {n: t.double() for n, t in uce.tensors.items()}
    adversarial = rows.erase @ adversarial_map(start, original, 0.1).T
    rece = RECE(tokens="last", expand_prompts=False, epochs=1).fit(tiny_sd, concepts, preserve=[], progress=False)

    def objective(c):  # what c' minimises: the edited model's K/V of c' against the original K/V of the concept
        return sum(((c @ w.T - rows.erase @ original[n].T) ** 2).sum() for n, w in start.items()) \
            + 0.1 * (c ** 2).sum()

    assert objective(adversarial) < 0.5 * objective(rows.erase)  # c' brings the concept back where c no longer does
    for name, w in start.items():
        target = rows.guide @ w.T  # v* = W' c^guide
        after = (adversarial @ rece.tensors[name].double().T - target).norm()
        assert after < 0.5 * (adversarial @ w.T - target).norm(), name


def test_keep_erased_holds_the_original_erase_rows_at_their_erased_mapping(tiny_sd):
    concepts = resolve("red")
    rows = build_rows(tiny_sd, concepts, None, None, "to_end", True)
    uce = UCE().fit(tiny_sd, concepts, progress=False)

    def drift(edit):  # how far one epoch moves the erase rows' keys/values from where UCE put them
        return sum((rows.erase.double() @ (edit.tensors[n].double() - uce.tensors[n].double()).T).norm()
                   for n in uce.tensors)

    plain = RECE(epochs=1).fit(tiny_sd, concepts, progress=False)
    kept = RECE(epochs=1, keep_erased=True).fit(tiny_sd, concepts, progress=False)
    assert kept.metadata["hyperparameters"]["keep_erased"] is True and kept.digest != plain.digest
    # held, not pinned (weight λ2 against c' at s_e): 6 % less drift with red's 22 preserved values, 10 % with 6
    assert drift(kept) < 0.97 * drift(plain)


def test_concept_types_pick_the_readme_defaults():
    assert concept_type_of(resolve("sexual")) == "nudity"
    assert concept_type_of(resolve("violence")) == "unsafe"
    assert concept_type_of(resolve("red")) == "object"
    e = build_eraser("rece:concept_type=art,reg=none,epochs=2")
    assert (e.concept_type, e.reg, e.epochs) == ("art", None, 2)
