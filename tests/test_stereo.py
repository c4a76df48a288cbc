"""STEREO: stage 2's target is the compositional formula recomputed from the frozen model, mining lowers the
inversion loss against the erased model, stage 2 starts from the original weights, resume carries the mined words
(stage 1 is not redone), bad input."""

import pytest
import torch
import torch.nn.functional as F

from safediff.adapters import Conditioning
from safediff.concepts import resolve
from safediff.erasers.modules import all_weights, denoiser_keys, group_parameters
from safediff.erasers.stereo import STEREO, StereoRun
from safediff.erasers.training import cycled, trainable
from safediff.errors import SafediffError
from safediff.sampling import denoiser_output

RED = resolve("red")
SMALL = dict(rounds=1, erase_iterations=2, iterations=4, erase_lr=1e-3, lr=1e-3, inversion_steps=3, n_images=2,
             ddim_steps=2, seed=4, module="kv")


def test_stage_two_target_is_the_compositional_formula(tiny_sd):
    eraser = STEREO(**SMALL, anchor_scale=0.7, negative_scale=2.5, sample_with="frozen")
    params = group_parameters(tiny_sd, eraser.module)
    original = {n: p.detach().clone() for n, p in params.items()}
    run = StereoRun(eraser, tiny_sd, RED, None, denoiser_keys(tiny_sd, original))
    mined = [[torch.randn(32, generator=torch.Generator().manual_seed(9))]]
    targets = run.targets(mined)
    state = run.generator.get_state()
    with trainable(all_weights(tiny_sd), params, original), torch.enable_grad():
        loss, _ = run.erase_once(5, targets)
    g = torch.Generator()
    g.set_state(state)
    item, anchor = cycled(4, len(targets), 5, 1)[0], cycled(5, len(run.anchors), 5, 1)[0]
    with torch.no_grad():
        c = targets[item:item + 1]
        _, t_value, x = run.trajectories.draw(g, c, run.uncond, 3.0)
        t = torch.tensor([t_value])
        e_0 = denoiser_output(tiny_sd, x, t, run.uncond)
        e_a = denoiser_output(tiny_sd, x, t, tiny_sd.adapter.encode([run.anchors[anchor]]))
        e_neg = [denoiser_output(tiny_sd, x, t, targets[j:j + 1]) for j in range(len(targets))]
        target = e_0 + 0.7 * (e_a - e_0) - 2.5 * sum(e - e_0 for e in e_neg) / len(e_neg)
        expected = F.mse_loss(denoiser_output(tiny_sd, x, t, c), target)
    assert len(targets) == 2 and run.words == ["red"]  # the keyword and the mined word
    assert torch.allclose(loss.detach(), expected, rtol=1e-4, atol=1e-7)


def test_mining_lowers_the_inversion_loss_and_stage_two_restarts_from_the_original(tiny_sd):
    eraser = STEREO(**{**SMALL, "inversion_steps": 30, "inversion_lr": 0.05, "inversion_batch": 2})
    params = group_parameters(tiny_sd, eraser.module)
    original = {n: p.detach().clone() for n, p in params.items()}
    run = StereoRun(eraser, tiny_sd, RED, None, denoiser_keys(tiny_sd, original))
    with trainable(all_weights(tiny_sd), params, original), torch.enable_grad():
        mined = run.search(params, progress=False)
        moved = any(not torch.equal(p, original[n]) for n, p in params.items())
    log = run.search_log[0]
    assert len(mined) == 1 and moved
    assert log["inversion_probe_after"] < log["inversion_probe_before"]
    edit = STEREO(**{**SMALL, "iterations": 1, "lr": 0.0}).fit(tiny_sd, RED, progress=False)
    assert not edit.tensors  # stage 1 moved the weights, but the edit is stage 2's, from the original


def test_resume_keeps_the_mined_words_and_is_bit_identical(tiny_sd, tmp_path, monkeypatch):
    straight = STEREO(**SMALL).fit(tiny_sd, RED, progress=False)
    step, search, calls = StereoRun.erase_once, StereoRun.search, {"n": 0, "search": 0}

    def interrupted(self, iteration, targets):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return step(self, iteration, targets)

    def counted(self, params, progress):
        calls["search"] += 1
        return search(self, params, progress)

    ckpt = tmp_path / "stereo.safetensors"
    monkeypatch.setattr(StereoRun, "erase_once", interrupted)
    monkeypatch.setattr(StereoRun, "search", counted)
    with pytest.raises(KeyboardInterrupt):
        STEREO(**SMALL, checkpoint=str(ckpt), checkpoint_every=2).fit(tiny_sd, RED, progress=False)
    monkeypatch.setattr(StereoRun, "erase_once", step)
    resumed = STEREO(**SMALL, checkpoint=str(ckpt), checkpoint_every=2).fit(tiny_sd, RED, progress=False)
    assert calls["search"] == 1  # stage 1 ran once: the resumed fit read its words from the checkpoint
    assert resumed.metadata["info"]["resumed_at_iteration"] == 2
    assert resumed.digest == straight.digest


@pytest.mark.parametrize("options,message", [({"module": "text_encoder"}, "trains the denoiser"),
                                             ({"module": "unet"}, "unknown module 'unet'"),
                                             ({"rounds": 101}, r"rounds must be in \[0, 100\]"),
                                             ({"inversion_steps": 0}, r"inversion_steps must be in \[1, 1e\+06\]"),
                                             ({"sample_with": "both"}, "sample_with must be one of trained, frozen")])
def test_bad_input_is_one_line(options, message):
    with pytest.raises(SafediffError, match=message) as err:
        STEREO(**options)
    assert "\n" not in str(err.value)


def test_several_concepts_erase_every_keyword(tiny_sd):
    run = StereoRun(STEREO(**SMALL), tiny_sd, resolve("red,blue"), None, {})
    assert run.words == ["red", "blue"] and isinstance(run.targets([]), Conditioning) and len(run.targets([])) == 2
