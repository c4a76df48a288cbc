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
    r = cycled(eraser.seed, len(run.retain), 0, eraser.retain_batch)
    adapter = tiny_sd.adapter
    with torch.no_grad():
        c = adapter.encode([run.prompts[k]])
        rr = adapter.encode([run.retain[i] for i in r])
        cond = Conditioning.cat([c, rr])
        _, t_value, x = run.trajectories.draw(g, cond, Conditioning.cat([run.uncond] * len(cond)), 3.0)
        t = torch.tensor([t_value])
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


@pytest.mark.parametrize("arch,trained", [("tiny_sd3", {"text_encoder", "text_encoder_2"}),
                                          ("tiny_flux", {"text_encoder"})])
def test_on_sd3_and_flux_the_clip_encoders_train_and_t5_stays(request, arch, trained):
    model = request.getfixturevalue(arch)
    t5 = type(model.adapter.text_encoders[model.adapter.t5_index]).__name__
    edit = AdvUnlearn(**SMALL).fit(model, RED, progress=False)
    assert {n.partition(".")[0] for n in edit.tensors} == trained  # SD3: CLIP-L and CLIP-G; FLUX: CLIP-L
    assert t5 == "T5EncoderModel" and not any(".block." in n or "shared" in n for n in edit.tensors)
    assert all(".encoder.layers." in f".{n}" or "final_layer_norm" in n for n in edit.tensors)


def test_the_adversary_prefixes_soft_tokens_in_every_encoder(tiny_sd3):
    """δ sits right after each encoder's BOS (CLIPs) or first (T5); with δ = the embedding of the slot's own token
    id the conditioning is that of the ids themselves."""
    from safediff.erasers.advunlearn import SoftPrefix

    adapter = tiny_sd3.adapter
    prefix = SoftPrefix(adapter, "a red circle", 2)
    deltas = [adapter.token_embedding(j).weight[ids[0, prefix.starts[j]:prefix.starts[j] + 2]]
              for j, ids in enumerate(prefix.ids)]
    with torch.no_grad():
        assert torch.equal(prefix.encode(deltas).embeds, adapter.encode_ids(prefix.ids).embeds)
    assert prefix.starts == [adapter.bos_offset(j) for j in range(3)] and prefix.starts[2] == 0


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
