"""TRCE (Chen et al. 2025) on tiny random models: [EoT] by ids, the stage-1 mapping, parameter scope, stage 2."""

import pytest
import torch

from safediff.erasers import build_eraser
from safediff.concepts import Concept
from safediff.errors import SafediffError
from safediff.erasers.trce import TRCE, Stage2
from safediff.registry import ERASERS
from weight_checks import snapshot

GUIDE = "a person wearing clothes"
RED = [Concept("red", ("red",), guide=GUIDE, preserve=("green", "circle"))]
SMALL = dict(iterations=2, trajectories=2, uncond_trajectories=2, ddim_steps=4, lr=1e-3)


def eot_kv(model, prompt: str, index: int) -> list[torch.Tensor]:
    """Every cross-attention key/value of one token of ``prompt``, through the model's own modules."""
    with torch.no_grad():
        e = model.adapter.encode([prompt]).embeds[0, index]
        return [m(e) for _, m in model.adapter.text_kv()]


def test_eot_is_found_from_the_token_ids_not_by_counting_words(tiny_sd):
    prompts = ["a red circle", "red", "an image of a crimson square"]
    tok = tiny_sd.pipe.tokenizer
    expected = [len(tok(p).input_ids) - 1 for p in prompts]  # BOS ... EOS: EOS is the last id
    assert tiny_sd.adapter.eos_positions(prompts).tolist() == expected
    whitespace = [len(p.split()) + 1 for p in prompts]  # the reference code's index
    assert all(w != e for w, e in zip(whitespace, expected)), "byte tokens: every word is several tokens"


def test_stage1_maps_the_malicious_eot_key_values_onto_the_safe_prompts(tiny_sd):
    templates = ("{}", "a photo of {}", "a {} circle")
    eraser = TRCE(stages=(1,), templates=templates, preserve_scale=0.0, lamb=1e-6)
    edit = eraser.fit(tiny_sd, RED, progress=False)
    pairs = [(t.format("red"), t.format(GUIDE)) for t in templates]
    tok = tiny_sd.pipe.tokenizer
    eot = {p: len(tok(p).input_ids) - 1 for pair in pairs for p in pair}
    before = {p: eot_kv(tiny_sd, p, eot[p]) for pair in pairs for p in pair}
    edit.apply(tiny_sd)
    for bad, safe in pairs:
        after = eot_kv(tiny_sd, bad, eot[bad])
        for a, b0, s0 in zip(after, before[bad], before[safe]):
            # 3 pairs, 32-d embeddings, no preservation: the map is exact up to the tiny ridge
            assert (a - s0).norm() < 1e-3 * (b0 - s0).norm()
        wrong = len(bad.split()) + 1  # the reference's whitespace index lands inside "red"'s byte tokens
        assert not torch.allclose(eot_kv(tiny_sd, bad, wrong)[0], before[safe][0], atol=1e-3)
    edit.revert(tiny_sd)


def test_stage1_preservation_keeps_preserved_prompts_closer(tiny_sd):
    kept = "a green circle"
    shift = {}
    for eta in (0.0, 1.0):
        edit = TRCE(stages=(1,), templates=("{}", "a {} circle"), preserve_scale=eta).fit(tiny_sd, RED, progress=False)
        before = [eot_kv(tiny_sd, kept, i) for i in range(20)]
        edit.apply(tiny_sd)
        after = [eot_kv(tiny_sd, kept, i) for i in range(20)]
        edit.revert(tiny_sd)
        shift[eta] = sum(float((a - b).norm()) for xs, ys in zip(after, before) for a, b in zip(xs, ys))
    assert shift[1.0] < 0.5 * shift[0.0]


@pytest.mark.parametrize("stages", [(1,), (2,), (1, 2)])
def test_stages_change_exactly_their_parameters(tiny_sd, stages):
    before = snapshot(tiny_sd)
    sha = tiny_sd.weights_sha256()
    edit = TRCE(stages=stages, **SMALL).fit(tiny_sd, RED, progress=False)
    assert tiny_sd.weights_sha256() == sha, "fit must leave the model as it found it"
    edit.apply(tiny_sd)
    after = snapshot(tiny_sd)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    expected = set()
    if 1 in stages:
        expected |= {k for k in before if k.startswith("unet.") and (".attn2.to_k." in k or ".attn2.to_v." in k)}
    if 2 in stages:
        expected |= {k for k in before if k.startswith("unet.") and (".attn1." in k or ".attn2.to_q." in k)}
    assert changed == expected
    edit.revert(tiny_sd)


def test_stage2_zeroes_gradients_every_step(tiny_sd, monkeypatch):
    """One trajectory, one step, lr 0: every step sees the same loss, so each step's gradient must be the same
    (accumulating gradients, as the reference does, would double it at step 2)."""
    grads = []
    step = torch.optim.AdamW.step

    def recording(self, *args, **kwargs):
        grads.append([p.grad.clone() for g in self.param_groups for p in g["params"] if p.grad is not None])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    TRCE(stages=(2,), iterations=3, trajectories=1, uncond_trajectories=1, ddim_steps=1, lr=0.0, margin=10.0
         ).fit(tiny_sd, RED, progress=False)
    assert len(grads) == 3 and grads[0]
    assert sum(float(g.abs().sum()) for g in grads[0]) > 0
    for later in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(later, grads[0]))  # lr 0, the same draw: the same gradient


def test_stage2_resume_is_bit_identical(tiny_sd, tmp_path, monkeypatch):
    kwargs = dict(SMALL, stages=(1, 2), iterations=4, seed=5)
    straight = TRCE(**kwargs).fit(tiny_sd, RED, progress=False)
    ckpt = tmp_path / "trce.safetensors"
    draw = Stage2.draw

    def interrupted(self, iteration):
        if iteration == 3:
            raise KeyboardInterrupt
        return draw(self, iteration)

    monkeypatch.setattr(Stage2, "draw", interrupted)
    with pytest.raises(KeyboardInterrupt):
        TRCE(**kwargs, checkpoint=str(ckpt), checkpoint_every=2).fit(tiny_sd, RED, progress=False)
    monkeypatch.setattr(Stage2, "draw", draw)
    resumed = TRCE(**kwargs, checkpoint=str(ckpt), checkpoint_every=2).fit(tiny_sd, RED, progress=False)
    assert resumed.metadata["info"]["resumed_at_iteration"] == 2
    assert set(resumed.tensors) == set(straight.tensors)
    assert all(torch.equal(resumed.tensors[k], straight.tensors[k]) for k in straight.tensors)


def test_sandbox_concepts_use_the_worlds_plain_templates():
    from safediff.concepts import resolve

    malicious, safe = TRCE().prompt_pairs(resolve("red"), None)
    assert "a red circle" in malicious and "the red square" in malicious
    assert all("red" not in s.split() for s in safe)
    assert safe[malicious.index("a red circle")] == "a circle"


def test_parameters_parse_and_bad_input_is_refused(tiny_sd):
    assert ERASERS.get("trce") is TRCE
    assert build_eraser("trce:stages=1").stages == (1,)
    assert build_eraser("trce:stages=2;1,lr=2e-6").stages == (1, 2)
    assert build_eraser("trce:stages=1;2,lr=2e-6").lr == pytest.approx(2e-6)
    for bad in ({"stages": (3,)}, {"stages": ()}, {"templates": ("no placeholder",)}, {"early_fraction": 0},
                {"iterations": 0}):
        with pytest.raises(SafediffError):
            TRCE(**bad)
    with pytest.raises(SafediffError):
        TRCE().fit(tiny_sd, [Concept("x", ("",))], progress=False)
