"""SAFREE, SAFREE-released and CASG-SAFREE: projector algebra, trigger detection and projection against an
independent computation, the self-validating switch per sample, latent re-attention (hooks, where it acts), batch
independence, the released variant's negative prompt, CASG's per-token category, SDXL, bad input.

The trigger tests use a *bag-of-words* text encoder built from the tiny random one: each test word's token gets its
own basis direction, the first layer averages the causal prefix, every other block is the identity. The EOS state is
then a symmetric function of the words, so masking the concept word (and only it) moves the prompt away from the
concept subspace, and masking any other word moves it equally little.
"""

import math

import pytest
import torch
from float_bounds import BATCH_LATENTS, assert_close
from guard_checks import count_unet_calls, pipeline_state

from safediff.concepts import Concept
from safediff.errors import SafediffError
from safediff.guards import build_guard
from safediff.guards.base import GenerationContext
from safediff.guards.casg_safree import CasgSafreeGuard
from safediff.guards.latent_reattention import low_frequency_mask, reattend
from safediff.guards.safree import SafreeGuard, SafreeReleasedGuard, projector, svf_steps, trigger_mask
from safediff.adapters import Conditioning
from safediff.models import from_pipeline
from safediff.random_models import build_pipeline
from safediff.sampling import generate, initial_noise, make_scheduler

WORDS = list("abcdxyz")
STEPS = 3


def bag_of_words(model, words=WORDS):
    with torch.no_grad():
        for te, tok in zip(model.adapter.text_encoders, model.adapter.tokenizers):
            tm = getattr(te, "text_model", te)
            ids = [tok.bos_token_id, tok.eos_token_id] + tok.convert_tokens_to_ids([w + "</w>" for w in words])
            emb = tm.embeddings.token_embedding.weight
            emb.zero_()
            for n, i in enumerate(ids):
                emb[i, n] = 1.0
            tm.embeddings.position_embedding.weight.zero_()
            for n, layer in enumerate(tm.encoder.layers):
                attn = layer.self_attn
                for lin in (attn.q_proj, attn.k_proj):  # uniform attention over the causal prefix
                    lin.weight.zero_()
                    lin.bias.zero_()
                for lin in (attn.v_proj, attn.out_proj):  # first layer: the prefix mean; later layers: nothing
                    lin.weight.copy_(torch.eye(lin.weight.shape[0]) * (n == 0))
                    lin.bias.zero_()
                layer.mlp.fc2.weight.zero_()
                layer.mlp.fc2.bias.zero_()
    return model


def _model(arch):
    return bag_of_words(from_pipeline(build_pipeline(arch), spec=arch,
                                      defaults={"steps": STEPS, "guidance": 5.0, "height": 32, "width": 32}))


@pytest.fixture(scope="module")
def bow_sd():
    return _model("tiny-sd")


@pytest.fixture(scope="module")
def bow_sdxl():
    return _model("tiny-sdxl")


def concept(*words):
    return Concept(words[0], tuple(words))


def run(model, prompts, guard=None, **kw):
    return generate(model, prompts, list(range(len(prompts))), guard=guard, progress=False, **kw)


def start_session(model, guard, prompts, steps=STEPS):
    adapter = model.adapter
    scheduler = make_scheduler(model)
    scheduler.set_timesteps(steps)
    ctx = GenerationContext(model, prompts, adapter.encode(prompts), adapter.encode_negative(None, len(prompts)),
                            5.0, scheduler.timesteps, 32, 32)
    return guard.start(ctx), scheduler


def combined_eps(model, session, i, t, latents):
    """One denoising step's guided noise prediction, as the sampler computes it."""
    branches = session.branches(i)
    n = len(branches)
    c = Conditioning.cat(branches)
    with torch.no_grad():
        eps = model.denoiser(torch.cat([latents] * n), t, encoder_hidden_states=c.embeds, return_dict=False,
                             **model.adapter.unet_kwargs(c, 32, 32))[0]
    return session.combine(i, t, list(eps.chunk(n)))


# -- algebra ----------------------------------------------------------------------------------------------------
def test_projector_is_an_idempotent_symmetric_projector_onto_the_columns():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(16, 4, generator=g, dtype=torch.float64)
    c = torch.cat([c, c[:, :1] * 2 + c[:, 1:2]], dim=1)  # a dependent column: rank stays 4
    p = projector(c)
    assert torch.allclose(p @ p, p, atol=1e-10)
    assert torch.allclose(p, p.T, atol=1e-12)
    assert torch.allclose(p @ c, c, atol=1e-10)
    assert round(float(torch.trace(p))) == 4
    q, _ = torch.linalg.qr(c[:, :4])  # independent: orthonormal basis of the same span
    assert torch.allclose(p, q @ q.T, atol=1e-10)
    well = c[:, :4]  # the paper's formula, where the Gram matrix is well conditioned
    assert torch.allclose(projector(well), well @ torch.linalg.inv(well.T @ well) @ well.T, atol=1e-10)
    assert torch.count_nonzero(projector(torch.zeros(16, 0, dtype=torch.float64))) == 0


def test_trigger_rule_and_svf_schedule():
    d = torch.tensor([1.0, 1.0, 1.5, 1.0])
    assert trigger_mask(d, 0.01).tolist() == [False, False, True, False]
    assert trigger_mask(d, 0.6).tolist() == [False, False, False, False]  # 1.5 < 1.6 * 1.0
    assert trigger_mask(torch.tensor([1.0, 1.0, 1.0]), 0.0).all()  # ties count: d_i >= mean_{j≠i} d_j
    assert not trigger_mask(torch.tensor([1.0, 1.0, 1.0]), 0.01).any()
    assert not trigger_mask(torch.tensor([9.0]), 0.0).any()  # one token: no j != i
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    for beta in (0.0, 0.3, 0.5333, 0.55, 0.7, 1.5):
        assert svf_steps(beta, 10, 2.5, 5.333) == round(10 * sig(2 * 2.5 * (10 * beta - 5.333)))
    assert svf_steps(1.0, 7, 2.5, 5.333) == 7 and svf_steps(0.0, 10, 2.5, 5.333) == 0


def test_eos_row_is_clips_pooled_output(bow_sd):
    from safediff.guards.safree import pooled

    prompts = ["a x b", "c"]
    adapter = bow_sd.adapter
    ids = adapter.tokenize(prompts)
    ref = adapter.text_encoders[0](ids).pooler_output
    assert_close(pooled(adapter.encode(prompts), adapter.eos_positions(prompts)), ref, 1e-6)


# -- trigger detection and projection ----------------------------------------------------------------------------
def reference_filter(model, keyword, prompt, alpha=0.01):
    """Independent computation (SD-1.x): masked prompts through the text encoder, projectors by QR."""
    te = model.adapter.text_encoders[0]
    tok = model.adapter.tokenizers[0]
    ids = tok([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
    n = tok([prompt], return_tensors="pt").input_ids.shape[1] - 2
    with torch.no_grad():
        out = te(ids)
        kw = te(tok([keyword], padding="max_length", max_length=77, return_tensors="pt").input_ids).pooler_output
        masked = ids.repeat(n, 1)
        masked[torch.arange(n), torch.arange(1, n + 1)] = 0
        pm = te(masked).pooler_output.double()
    basis = lambda m: torch.linalg.qr(m)[0]  # noqa: E731
    qc, qi = basis(kw.double().T), basis(pm.T)
    eye = torch.eye(pm.shape[1], dtype=torch.float64)
    residual = eye - qc @ qc.T
    d = (pm @ residual).norm(dim=1)
    mean_others = torch.stack([torch.cat([d[:i], d[i + 1:]]).mean() for i in range(n)])
    trig = d >= (1 + alpha) * mean_others
    e = out.last_hidden_state[0].double()
    projected = e @ (residual @ qi @ qi.T).T
    expected = e.clone()
    expected[1:n + 1][trig] = projected[1:n + 1][trig]
    return trig, expected


def test_keyword_token_is_flagged_and_projected_others_untouched(bow_sd):
    guard = SafreeGuard([concept("x")])
    prompt = "a b x c d"
    cond = bow_sd.adapter.encode([prompt])
    res = guard.filter(bow_sd, [prompt], cond)
    assert torch.nonzero(res.triggers[0]).flatten().tolist() == [3]  # BOS a b x: position 3
    trig, expected = reference_filter(bow_sd, "x", prompt)
    assert trig.tolist() == [False, False, True, False, False]
    assert_close(res.filtered.embeds[0], expected, 1e-5)
    unchanged = torch.ones(77, dtype=torch.bool)
    unchanged[3] = False
    assert torch.equal(res.filtered.embeds[0, unchanged], cond.embeds[0, unchanged])
    assert (res.filtered.embeds[0, 3] - cond.embeds[0, 3]).abs().max() > 1e-2


def test_prompt_without_trigger_is_unchanged_and_generates_as_without_guard(bow_sd):
    guard = SafreeGuard([concept("x")])
    prompts = ["a b c", "d b"]
    cond = bow_sd.adapter.encode(prompts)
    res = guard.filter(bow_sd, prompts, cond)
    assert not res.triggers.any()
    assert torch.equal(res.filtered.embeds, cond.embeds)
    guarded = run(bow_sd, prompts, guard)
    assert guarded.unet_batch_per_step == [2] * STEPS
    assert torch.equal(guarded.pixels, run(bow_sd, prompts).pixels)


def test_svf_per_sample_switch(bow_sd):
    guard = SafreeGuard([concept("x")], lra=0)
    prompts = ["a x", "a x b"]
    session, _ = start_session(bow_sd, guard, prompts, steps=12)
    res = session.result
    assert res.t_prime == [svf_steps(b, 10, 2.5, 5.333) for b in res.beta]
    assert res.t_prime[0] != res.t_prime[1]  # the test needs two different t'
    for i in range(12):
        cond = session.branches(i)[1]
        for b in range(2):
            want = res.filtered if i <= res.t_prime[b] else session.ctx.cond
            assert torch.equal(cond.embeds[b], want.embeds[b])


def test_svf_off_filters_every_step(bow_sd):
    out = run(bow_sd, ["a x b"], SafreeGuard([concept("x")], svf=0))
    assert out.unet_batch_per_step == [3] * STEPS


# -- latent re-attention ------------------------------------------------------------------------------------------
def test_reattend_attenuates_only_low_frequencies_that_exceed_the_original():
    g = torch.Generator().manual_seed(1)
    h_orig = torch.randn(2, 3, 8, 8, generator=g)
    h_proj = torch.randn(2, 3, 8, 8, generator=g)
    out = reattend(h_proj, h_orig, 0.5, 1)
    f_out, f_proj, f_orig = (torch.fft.fft2(x.double()) for x in (out, h_proj, h_orig))
    low = low_frequency_mask(8, 8, 1, "cpu")
    assert low.sum() == 9 and low[0, 0] and low[1, 7] and not low[2, 0]
    pick = low & (f_proj.abs() > f_orig.abs())
    assert pick.any() and (low & ~pick).any()
    assert_close(f_out[pick], 0.5 * f_proj[pick], 1e-4)
    assert_close(f_out[~pick], f_proj[~pick], 1e-4)
    assert torch.equal(reattend(h_orig, h_orig, 0.5, 1), h_orig)  # nothing exceeds: bit-identical


def test_reattend_ignores_rounding_level_excess():
    """Features equal in exact arithmetic but rounded differently (two batch rows, two kernels) are not "exceeding":
    otherwise a text-independent skip feature would be scaled by s or not depending on the CPU."""
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 3, 8, 8, generator=g)
    rounded = h * (1 + 3e-7)  # a few float32 ulps larger everywhere
    assert torch.equal(reattend(rounded, h, 0.5, 1), rounded)
    assert not torch.equal(reattend(h * 1.01, h, 0.5, 1), h * 1.01)  # a real 1 % excess is attenuated


def test_reattention_acts_only_on_filtered_steps_and_hooks_are_removed(bow_sd):
    prompts = ["a x"]
    before = pipeline_state(bow_sd)
    with_lra, scheduler = start_session(bow_sd, SafreeGuard([concept("x")], lra=1), prompts, steps=12)
    without, _ = start_session(bow_sd, SafreeGuard([concept("x")], lra=0), prompts, steps=12)
    t_prime = with_lra.result.t_prime[0]
    assert 0 <= t_prime < 11
    latents, _ = initial_noise(bow_sd, [0], 32, 32)
    t = scheduler.timesteps[0]
    with with_lra.unet_hooks():
        assert pipeline_state(bow_sd)["hooks"] > before["hooks"]
        filtered_on = combined_eps(bow_sd, with_lra, 0, t, latents)
        after_on = combined_eps(bow_sd, with_lra, t_prime + 1, t, latents)
    filtered_off = combined_eps(bow_sd, without, 0, t, latents)
    after_off = combined_eps(bow_sd, without, t_prime + 1, t, latents)
    assert (filtered_on - filtered_off).abs().max() > 1e-6
    assert torch.equal(after_on, after_off)
    assert pipeline_state(bow_sd) == before
    out = run(bow_sd, prompts, SafreeGuard([concept("x")]), steps=t_prime + 3)
    assert out.unet_batch_per_step == [3] * (t_prime + 1) + [2] * 2
    no_cfg = run(bow_sd, prompts, SafreeGuard([concept("x")]), steps=t_prime + 3, guidance=1.0)
    assert no_cfg.unet_batch_per_step == [2] * (t_prime + 1) + [1] * 2 and torch.isfinite(no_cfg.latents).all()
    assert pipeline_state(bow_sd) == before


def test_batch_sample_without_trigger_matches_its_unguarded_image(bow_sd):
    prompts = ["a x", "a b c"]
    guarded = run(bow_sd, prompts, SafreeGuard([concept("x")]))
    plain = run(bow_sd, prompts)
    assert guarded.unet_batch_per_step[0] == 3
    assert_close(guarded.latents[1], plain.latents[1], BATCH_LATENTS)  # 3 branches vs 2
    assert (guarded.latents[0] - plain.latents[0]).abs().max() > 1e-2  # measured 0.21
    alone = run(bow_sd, ["a x"], SafreeGuard([concept("x")]))
    assert_close(guarded.latents[0], alone.latents[0], BATCH_LATENTS)  # batch 2 vs 1


# -- variants -----------------------------------------------------------------------------------------------------
def test_released_equals_negative_prompt_when_no_token_is_a_trigger(bow_sd):
    guard = SafreeReleasedGuard([concept("x"), concept("y")])
    assert guard.negative_text() == "x, y" and not guard.lra and guard.negative_prompt
    prompts = ["a b c", "d"]
    ours = run(bow_sd, prompts, guard)
    ref = run(bow_sd, prompts, negative_prompt="x, y")
    assert torch.equal(ours.pixels, ref.pixels)
    assert ours.unet_batch_per_step == [2] * STEPS


def test_casg_with_one_category_equals_safree(bow_sd):
    prompts = ["a x b", "x c d"]
    cond = bow_sd.adapter.encode(prompts)
    ours = CasgSafreeGuard([concept("x", "y")]).filter(bow_sd, prompts, cond)
    ref = SafreeGuard([concept("x", "y")]).filter(bow_sd, prompts, cond)
    assert ours.triggers.any() and torch.equal(ours.triggers, ref.triggers)
    assert_close(ours.filtered.embeds, ref.filtered.embeds, 1e-6)
    assert ours.t_prime == ref.t_prime


@pytest.mark.parametrize("rule, expected", [(0, {2: 1, 4: 0}), (1, {2: 0, 4: 1})])
def test_casg_projects_each_trigger_against_one_category(bow_sd, rule, expected):
    # rule 0 (the paper's): argmin_k ||(I - P_k) p_\i|| is the category closest to the prompt WITHOUT token i, so
    # with two trigger words each gets the other's category; rule 1 (removal) gives each its own category
    guard = CasgSafreeGuard([concept("x"), concept("y")], category_rule=rule)
    prompt = "a x b y"
    cond = bow_sd.adapter.encode([prompt])
    res = guard.filter(bow_sd, [prompt], cond)
    assert torch.nonzero(res.triggers[0]).flatten().tolist() == [2, 4]
    assert {pos: int(res.categories[0, pos]) for pos in (2, 4)} == expected
    assert (res.categories[0, [0, 1, 3, 5]] == -1).all()
    spaces = guard.subspaces(bow_sd)
    names = ["category:0:x", "category:1:y"]
    assert sorted(spaces) == [*names, "global"]
    from safediff.guards.safree import masked_pooled

    m = masked_pooled(bow_sd.adapter, [prompt], bow_sd.adapter.eos_positions([prompt]), 0)[0].double()
    p_input = projector(m.T)
    eye = torch.eye(p_input.shape[0], dtype=torch.float64)
    e = cond.embeds[0].double()
    for pos, k in expected.items():
        want = (eye - spaces[names[k]]) @ p_input @ e[pos]
        assert_close(res.filtered.embeds[0, pos], want, 1e-5)
        global_proj = (eye - spaces["global"]) @ p_input @ e[pos]
        assert (want - global_proj).abs().max() > 1e-3  # not the SAFREE projection
    assert guard.subspaces(bow_sd) is spaces  # cached


def test_casg_joined_subspaces_are_rank_one():
    guard = CasgSafreeGuard([concept("x", "y"), concept("z")], "released")
    texts = guard.subspace_texts()
    assert texts == {"global": ["x, y, z"], "category:0:x": ["x, y"], "category:1:z": ["z"]}
    assert guard.negative_prompt and not guard.lra
    assert CasgSafreeGuard([concept("x", "y")]).subspace_texts()["category:0:x"] == ["x", "y"]


def test_sdxl_runs_with_triggers_and_reattention(bow_sdxl):
    before = pipeline_state(bow_sdxl)
    prompts = ["a x", "a b c"]
    with count_unet_calls(bow_sdxl) as sizes:
        out = run(bow_sdxl, prompts, build_guard("safree", "x"))
    assert sizes[0] == 6 and out.pixels.shape == (2, 3, 32, 32)
    plain = run(bow_sdxl, prompts)
    assert (out.latents[0] - plain.latents[0]).abs().max() > 1e-2  # measured 0.17
    assert_close(out.latents[1], plain.latents[1], BATCH_LATENTS)  # 3 branches vs 2
    assert pipeline_state(bow_sdxl) == before
    casg = run(bow_sdxl, prompts, build_guard("casg-safree", "x,y"))
    assert torch.isfinite(casg.pixels).all()


# -- construction ---------------------------------------------------------------------------------------------------
def test_options_config_and_bad_input():
    g = build_guard("safree:released,alpha=0.05,gamma=4", "x")
    assert isinstance(g, SafreeGuard) and g.alpha == 0.05 and g.gamma == 4 and not g.lra
    cfg = g.config()
    for key in ("alpha", "gamma", "k", "t0", "svf", "lra", "negative_prompt", "b1", "b2", "s1", "s2", "lra_radius",
                "mask_token_id"):
        assert key in cfg
    assert cfg["concepts"] == [{"name": "x", "keywords": ["x"]}] and cfg["negative_prompt_text"] == "x"
    assert isinstance(build_guard("safree-released"), SafreeReleasedGuard)
    assert len(build_guard("safree").keywords) == 17
    assert len(build_guard("casg-safree").subspace_texts()) == 8  # global + 7 I2P categories
    assert SafreeGuard([concept("x")], lra=False).lra is False
    for spec in ("safree:fast", "safree:alpha=-1", "safree:s1=2", "safree:gamma=1.5", "safree:svf=3",
                 "casg-safree:joined=2", "safree:beta=1"):
        with pytest.raises(SafediffError):
            build_guard(spec, "x")
    with pytest.raises(SafediffError):
        SafreeGuard([concept("x")], k=0)
    with pytest.raises(SafediffError):
        SafreeGuard([])
