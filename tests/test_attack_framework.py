"""The attack framework: budgets, the compute meter, soft-token encoding, token slots, simplex projection, targets."""

import pytest
import torch

from float_bounds import BATCH_NOISE, assert_close
from attack_recipe_helpers import ROW, never_flags, red_target
from safediff.attacks.base import Attack
from safediff.attacks.budget import Budget, BudgetExceeded, ComputeMeter
from safediff.attacks.context import Found
from safediff.attacks.objectives import uniform_timesteps
from safediff.attacks.search import project_simplex
from safediff.attacks.spaces import TokenSlots, vocabulary
from safediff.errors import SafediffError
from safediff.guards.base import NoGuard


def simplex_by_sorting(v: torch.Tensor) -> torch.Tensor:
    """Independent reference: the sort-based Euclidean projection onto the simplex (Duchi et al. 2008)."""
    u, _ = torch.sort(v, descending=True, dim=-1)
    css = u.cumsum(-1) - 1
    idx = torch.arange(1, v.shape[-1] + 1, dtype=v.dtype)
    rho = ((u - css / idx) > 0).sum(-1, keepdim=True)
    theta = css.gather(-1, rho - 1) / rho
    return (v - theta).clamp_min(0)


def test_simplex_projection_matches_the_sorting_algorithm():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(6, 50, generator=g, dtype=torch.float64) * 3
    p = project_simplex(v)
    assert torch.allclose(p.sum(-1), torch.ones(6, dtype=torch.float64), atol=1e-9) and (p >= 0).all()
    assert torch.allclose(p, simplex_by_sorting(v), atol=1e-9)
    point = simplex_by_sorting(v)
    assert torch.allclose(project_simplex(point), point, atol=1e-9)  # points on the simplex stay


@pytest.mark.parametrize("text, words", [("iterations=0", "> 0"), ("seconds=-1", "> 0"), ("wings=3", "accepted"),
                                         ("iterations=x", "not a valid int"), ("iterations", "not KEY=VALUE")])
def test_bad_budgets_are_rejected(text, words):
    with pytest.raises(SafediffError, match=words):
        Budget.parse(text)


def test_budget_parse_overrides_defaults():
    b = Budget.parse("unet_forward=7,seconds=2.5", {"iterations": 3})
    assert (b.iterations, b.unet_forward, b.seconds, b.unet_backward) == (3, 7, 2.5, None)


def test_meter_counts_unet_and_text_encoder_calls(tiny_sd):
    meter = ComputeMeter()
    with meter.watch(tiny_sd, tiny_sd), torch.no_grad():
        tiny_sd.adapter.encode(["a", "b"])
        red_target(tiny_sd).generate(["a", "b"], [0, 1])
    # 2 encodes (prompt + the empty prompt of CFG) + 1; 3 steps, one UNet call each with 2 branches x 2 images
    assert meter.counts["text_encoder"] == 3
    assert meter.counts["unet_forward"] == 3 and meter.counts["unet_forward_samples"] == 12
    tiny_sd.adapter.encode(["c"])  # outside watch: not counted, hooks removed
    assert meter.counts["text_encoder"] == 3


def test_soft_token_encoding_equals_text_encoding(tiny_sd, tiny_sdxl):
    for model in (tiny_sd, tiny_sdxl):
        a = model.adapter
        ids = [a.tokenize(["a red circle"], k) for k in range(len(a.tokenizers))]
        embeds = [a.token_embedding(k)(i) for k, i in enumerate(ids)]
        got, want = a.encode_token_embeddings(ids, embeds), a.encode(["a red circle"])
        assert torch.equal(got.embeds, want.embeds)
        assert (got.pooled is None) == (want.pooled is None)
        if want.pooled is not None:
            assert torch.equal(got.pooled, want.pooled)
        # hooks are gone afterwards, and gradients reach the substituted embeddings
        soft = embeds[0].detach().requires_grad_(True)
        a.encode_token_embeddings(ids, [soft, *embeds[1:]]).embeds.sum().backward()
        assert soft.grad is not None and soft.grad.abs().sum() > 0
        assert torch.equal(a.encode(["a red circle"]).embeds, want.embeds)


def test_token_slots_layouts_and_text(tiny_sd):
    tok = tiny_sd.adapter.tokenizers[0]
    words = tok("a red circle", add_special_tokens=False).input_ids
    vocab = vocabulary(tok, "words")
    fill = vocab[:3]
    pre = TokenSlots(tiny_sd, "a red circle", 3, "prefix")
    assert pre.token_ids(fill) == fill.tolist() + words and pre.slots.tolist() == [1, 2, 3]
    assert TokenSlots(tiny_sd, "a red circle", 3, "suffix").token_ids(fill) == words + fill.tolist()
    assert TokenSlots(tiny_sd, "a red circle", 2, "free").token_ids(fill[:2]) == fill[:2].tolist()
    every = TokenSlots(tiny_sd, "a red circle", 0, "every", every=3)
    ids = every.token_ids(vocab[:every.k])
    assert [i for i in ids if i not in vocab[:every.k].tolist()] == words  # the prompt's tokens, in order
    # slots sit at word boundaries: the token before each slot is BOS or ends a word
    tokens = ["<bos>"] + tok.convert_ids_to_tokens(ids)
    assert every.slots[0] == 1 and all(tokens[p - 1].endswith("</w>") for p in every.slots.tolist()[1:])
    # the prefix's encoding with the real tokens' embeddings equals encoding its text
    cond = pre.encode(pre.embeddings_of(fill), fill)
    assert_close(cond.embeds, tiny_sd.adapter.encode([pre.text(fill)]).embeds, 1e-6)  # same shapes: 0 measured


def test_word_vocabulary_round_trips(tiny_sd):
    tok = tiny_sd.adapter.tokenizers[0]
    vocab = vocabulary(tok, "words")
    g = torch.Generator().manual_seed(0)
    ids = vocab[torch.randint(len(vocab), (12,), generator=g)].tolist()
    assert tok(tok.decode(ids), add_special_tokens=False).input_ids == ids
    assert not set(tok.all_special_ids) & set(vocabulary(tok, "all").tolist())


def test_uniform_timesteps_are_unlearndiff_schedule():
    assert uniform_timesteps(50)[:3] == [10, 30, 50] and uniform_timesteps(50)[-1] == 990
    assert uniform_timesteps(1) == [500]


def test_guarded_noise_without_guard_is_cfg(tiny_sd):
    target = red_target(tiny_sd)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=g)
    t = target.timesteps()[1:2]
    cond = tiny_sd.adapter.encode(["a red circle"])
    with torch.no_grad():
        cfg = target.noise(x, t, cond, guided=True)
        eps_c = target.noise(x, t, cond, guided=False)
        eps_u = target.noise(x, t, tiny_sd.adapter.encode([""]), guided=False)
    assert_close(cfg, eps_u + target.guidance * (eps_c - eps_u), BATCH_NOISE)  # one call of 2 rows vs 2 of 1
    assert isinstance(target.guard, NoGuard) and not target.guarded


def test_generate_from_conditioning_equals_generate_from_text(tiny_sd):
    target = red_target(tiny_sd)
    cond = tiny_sd.adapter.encode(["a red circle"])
    a = target.generate(["a red circle"], [3]).pixels
    b = target.generate(["any label"], [3], conditioning=cond).pixels
    assert torch.equal(a, b)


class CountingAttack(Attack):
    """One text encoding per iteration, until the budget says no."""

    name = "counting"

    def search(self, ctx):
        while ctx.afford(ctx.step_cost(encode=1)):
            with torch.no_grad():
                ctx.target.model.adapter.encode([ctx.prompt])
            ctx.tick(0.0)
        return Found(prompt=ctx.prompt, evaluation=ctx.evaluate(ctx.prompt))


@pytest.mark.parametrize("budget, iterations", [(Budget(text_encoder=9), 7), (Budget(iterations=4), 4)])
def test_budget_binds_exactly_and_keeps_room_for_the_final_evaluation(tiny_sd, budget, iterations):
    result = CountingAttack(skip_when_pre_success=False).run(red_target(tiny_sd), ROW, never_flags(), budget, 0)
    # the final evaluation encodes the prompt and the empty prompt (2 calls) and runs 3 UNet steps
    assert result.compute["iterations"] == iterations
    assert result.compute["text_encoder"] == iterations + 2 and result.compute["unet_forward"] == 3
    assert result.image is not None and result.pre_compute["unet_forward"] == 3


class GreedyAttack(Attack):
    """Encodes without asking ``afford``: the meter must refuse the unit that overspends."""

    name = "greedy"

    def search(self, ctx):
        for _ in range(100):
            with torch.no_grad():
                ctx.target.model.adapter.encode([ctx.prompt])
        return Found(prompt=ctx.prompt)


def test_the_meter_refuses_compute_beyond_the_budget(tiny_sd):
    with pytest.raises(BudgetExceeded, match="text_encoder"):
        GreedyAttack(skip_when_pre_success=False).run(red_target(tiny_sd), ROW, never_flags(),
                                                      Budget(text_encoder=5), 0)


def test_reference_images_of_a_guarded_target_are_unguarded(tiny_sd):
    from safediff.guards import build_guard

    guarded = red_target(tiny_sd, guard=build_guard("sld:max", "red"))
    plain = red_target(tiny_sd)
    reference = guarded.generate(["a red circle"], [2], model=guarded.reference).pixels
    assert guarded.reference is tiny_sd  # no edits: the unconstrained model is the target model itself
    assert torch.equal(reference, plain.generate(["a red circle"], [2]).pixels)
    assert not torch.equal(reference, guarded.generate(["a red circle"], [2]).pixels)
