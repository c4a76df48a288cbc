"""AdvUnlearn: the fast inner step is FGSM, the upper level at warm-up is ESD + γ·retain recomputed independently,
the robust text encoder exports and plugs into another pipeline, resume carries the adversarial prompt, bad input."""

import pytest
import torch
import torch.nn.functional as F

from safediff.adapters import Conditioning
from safediff.attacks.search import SoftPrompt
from safediff.concepts import resolve
from safediff.erasers.advunlearn import AdvUnlearn, AdvUnlearnRun
from safediff.erasers.modules import all_weights, group_parameters
from safediff.erasers.training import cycled, trainable
from safediff.errors import SafediffError
from safediff.sampling import denoiser_output

RED = resolve("red")
SMALL = dict(iterations=4, warmup=0, lr=1e-3, ddim_steps=2, attack_images=1, retain_batch=2, seed=5)


def test_signed_step_is_fgsm_and_adam_first_step_matches_it():
    target = torch.tensor([[1.0, -2.0, 0.5]])
    init = [torch.zeros(1, 3)]
    sign = SoftPrompt(init, lr=0.1, update="sign")
    sign.step(((sign.embeds[0] - target) ** 2).sum())
    assert torch.equal(sign.embeds[0], -0.1 * torch.sign(-2 * target))  # δ − α sign(∇), ∇ = 2(δ − target)
    adam = SoftPrompt(init, lr=0.1, update="adam")
    adam.step(((adam.embeds[0] - target) ** 2).sum())
    assert torch.allclose(adam.embeds[0], sign.embeds[0], atol=1e-6)  # Adam's first step: lr·g/|g|
    with pytest.raises(SafediffError, match="unknown soft-prompt update"):
        SoftPrompt(init, lr=0.1, update="pgd")


def test_warm_up_loss_is_esd_plus_gamma_retain(tiny_sd):
    eraser = AdvUnlearn(**{**SMALL, "warmup": 10, "retain_weight": 0.7})
    params = group_parameters(tiny_sd, eraser.module)
    frozen = {n: p.detach().clone() for n, p in params.items()}
    run = AdvUnlearnRun(eraser, tiny_sd, RED, None, None, {})
    state = run.generator.get_state()
    with trainable(all_weights(tiny_sd), params, frozen), torch.enable_grad():
        loss, _ = run.step(0, {})
    # the same draws, recomputed from the paper's formula
    g = torch.Generator()
    g.set_state(state)
    k = int(torch.randint(len(run.prompts), (1,), generator=g))
    step, t_value = run.sampler.point(g)
    t = torch.tensor([t_value])
    r = cycled(eraser.seed, len(run.retain), 0, eraser.retain_batch)
    adapter = tiny_sd.adapter
    with torch.no_grad():
        c = adapter.encode([run.prompts[k]])
        rr = adapter.encode([run.retain[i] for i in r])
        cond = Conditioning.cat([c, rr])
        x = run.sampler.sample(cond, Conditioning.cat([run.uncond] * len(cond)), 3.0, step, g)
        e = denoiser_output(tiny_sd, torch.cat([x[:1], x[:1], x]), t,
                            Conditioning.cat([run.uncond, c, c, rr]))
        e_0, e_p, pred = e[:1], e[1:2], e[2:]
        expected = F.mse_loss(pred[:1], e_0 - 1.0 * (e_p - e_0)) + 0.7 * F.mse_loss(pred[1:], e[3:])
    assert torch.allclose(loss.detach(), expected, rtol=1e-5, atol=1e-7)


def test_text_encoder_edit_exports_and_plugs_into_another_pipeline(tiny_sd, tmp_path):
    from transformers import CLIPTextModel

    from safediff.models import from_pipeline
    from safediff.random_models import build_pipeline

    edit = AdvUnlearn(**SMALL).fit(tiny_sd, RED, progress=False)
    assert edit.tensors and all(n.startswith("text_encoder.") for n in edit.tensors)
    out = edit.export_text_encoders(tiny_sd, tmp_path / "robust")
    assert not edit.is_applied(tiny_sd)
    edit.apply(tiny_sd)
    with torch.no_grad():
        expected = tiny_sd.adapter.encode(["a red circle"]).embeds
    other = from_pipeline(build_pipeline("tiny-sd", seed=7), spec="other")  # another UNet, same encoder family
    other.pipe.text_encoder = CLIPTextModel.from_pretrained(out, subfolder="text_encoder")
    with torch.no_grad():
        assert torch.equal(other.adapter.encode(["a red circle"]).embeds, expected)
    with pytest.raises(SafediffError, match="changes no text encoder"):
        AdvUnlearn(**{**SMALL, "module": "kv"}).fit(tiny_sd, RED, progress=False).export_text_encoders(
            tiny_sd, tmp_path / "none")


def test_unet_modules_train_only_the_unet(tiny_sd):
    edit = AdvUnlearn(**{**SMALL, "module": "kv"}).fit(tiny_sd, RED, progress=False)
    assert edit.tensors and all(n.startswith("unet.") and (".to_k." in n or ".to_v." in n) for n in edit.tensors)


def test_resume_carries_the_adversarial_prompt_bit_identically(tiny_sd, tmp_path, monkeypatch):
    kwargs = {**SMALL, "iterations": 5, "attack_every": 2, "attack_init": "latest"}
    straight = AdvUnlearn(**kwargs).fit(tiny_sd, RED, progress=False)
    step, calls = AdvUnlearnRun.step, {"n": 0}

    def interrupted(self, iteration, carried):
        calls["n"] += 1
        if calls["n"] == 4:  # iteration 3 reads the δ of iteration 2's attack, saved with the checkpoint of 3
            raise KeyboardInterrupt
        return step(self, iteration, carried)

    ckpt = tmp_path / "adv.safetensors"
    monkeypatch.setattr(AdvUnlearnRun, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        AdvUnlearn(**kwargs, checkpoint=str(ckpt), checkpoint_every=3).fit(tiny_sd, RED, progress=False)
    monkeypatch.setattr(AdvUnlearnRun, "step", step)
    resumed = AdvUnlearn(**kwargs, checkpoint=str(ckpt), checkpoint_every=3).fit(tiny_sd, RED, progress=False)
    assert resumed.metadata["info"]["resumed_at_iteration"] == 3
    assert resumed.digest == straight.digest


@pytest.mark.parametrize("options,message", [
    ({"module": "text_encoder.layers"}, "unknown module 'text_encoder.layers'; accepted: text_encoder"),
    ({"attack_steps": 0}, r"attack_steps must be in \[1, 1000\]"),
    ({"attack_steps": 5000}, r"attack_steps must be in \[1, 1000\]"),
    ({"attack_update": "pgd"}, "attack_update must be one of sign, adam"),
    ({"attack_objective": "clip"}, "attack_objective must be one of denoising, matching"),
    ({"module": "text_encoder_all"}, "would train the token embeddings"),
])
def test_bad_input_is_one_line(options, message):
    with pytest.raises(SafediffError, match=message) as err:
        AdvUnlearn(**options)
    assert "\n" not in str(err.value)
