"""The relearning attack and the fine-tuning core it shares: the target comes back bit for bit, LoRA starts at the
model, the loss is the denoising loss, published freeze masks are honoured, bad options are one line."""

import pytest
import torch
import torch.nn.functional as F
from attack_recipe_helpers import ROW, never_flags, red_target
from cli_helpers import one_line_error, run_main
from weight_checks import assert_same, snapshot

from safediff.attacks.budget import Budget
from safediff.attacks.runner import build_attack
from safediff.edits import Edit
from safediff.errors import SafediffError
from safediff.finetune import Trainable, diffusion_loss, frozen_by_edits, select


def relearn(**options):
    spec = ",".join(f"{k}={v}" for k, v in {"source": "world", "k": 2, "batch": 2, **options}.items())
    return build_attack(f"relearn:{spec}")


def test_the_target_is_restored_bit_for_bit_and_checkpoints_are_judged(tiny_sd):
    before = snapshot(tiny_sd)
    result = relearn(steps=3, eval_at="1;2", lr=1e-2).run(red_target(tiny_sd), ROW, never_flags(), Budget(), seed=3)
    assert_same(before, snapshot(tiny_sd))
    assert result.extra["steps_done"] == 3 and result.extra["judged_at_steps"] == [1, 2, 3]
    assert [e["step"] for e in result.evaluations] == [1, 2, 3]
    assert result.compute["iterations"] == 3 and result.compute["unet_backward"] == 3
    # what was judged is the fine-tuned model, not the target as it is: the final image differs from the pre image
    assert result.image is not None and result.image.tobytes() != result.pre_image.tobytes()


def test_fine_tuning_lowers_the_loss_on_its_images(tiny_sd):
    result = relearn(steps=30, lr=3e-3, batch=4, k=4).run(red_target(tiny_sd), ROW, never_flags(), Budget(), seed=0)
    curve = [h["objective"] for h in result.history]
    assert sum(curve[-10:]) / 10 < sum(curve[:10]) / 10


def test_lora_starts_at_the_model_and_adapts_linear_weights_only(tiny_sd):
    g = torch.Generator().manual_seed(0)
    names = select(tiny_sd, "lora", ("attn2",))
    assert names and all(".attn2." in n and n.endswith(".weight") for n in names)
    lora = Trainable(tiny_sd, names, "lora", g, rank=2)
    unet = dict(tiny_sd.denoiser.named_parameters())
    for n, t in lora.params().items():  # B = 0: W' = W exactly
        assert torch.equal(t, unet[n])
    assert lora.numel() == sum(2 * (unet[n].shape[0] + unet[n].shape[1]) for n in names)


def test_the_loss_is_the_denoising_loss(tiny_sd):
    x0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    cond = tiny_sd.adapter.encode(["a red circle", "a blue square"])
    t = torch.tensor([10, 700])
    loss = diffusion_loss(tiny_sd, x0, cond, torch.Generator().manual_seed(5), t=t)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))  # the same draw, made again
    a = tiny_sd.pipe.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        pred = tiny_sd.pipe.unet(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, encoder_hidden_states=cond.embeds).sample
    assert torch.allclose(loss, F.mse_loss(pred, eps), rtol=1e-5, atol=1e-7)
    assert torch.equal(tiny_sd.adapter.noised(x0, eps, t), a.sqrt() * x0 + (1 - a).sqrt() * eps)
    per = diffusion_loss(tiny_sd, x0, cond, torch.Generator().manual_seed(5), t=t, per_sample=True)
    assert per.shape == (2,) and torch.allclose(per.mean(), loss)


def mask_edit(model, frozen: list[str]) -> Edit:
    """An edit that changes no weight and publishes a freeze mask (what FreezeAsGuard's edit carries)."""
    return Edit({}, {"method": "mask", "base_weights_sha256": model.base_sha256,
                     "info": {"freeze": {"frozen": frozen}}})


def test_a_published_freeze_mask_is_honoured_unless_told_otherwise(tiny_sd):
    every = select(tiny_sd, "full")
    frozen = [f"unet.{n}" for n in every[::3]]
    mask_edit(tiny_sd, frozen).apply(tiny_sd)
    assert frozen_by_edits(tiny_sd) == set(frozen)
    target = red_target(tiny_sd)
    honoured = relearn(steps=1).run(target, ROW, never_flags(), Budget(), seed=1)
    assert honoured.extra["frozen_honoured"] == sorted(frozen)
    assert honoured.extra["trained_tensors"] == len(every) - len(frozen)
    ignored = relearn(steps=1, honour_freeze="false").run(target, ROW, never_flags(), Budget(), seed=1)
    assert ignored.extra["trained_tensors"] == len(every) and ignored.extra["frozen_honoured"] == []
    lora = select(tiny_sd, "lora", (), frozen_by_edits(tiny_sd))
    assert not set(f"unet.{n}" for n in lora) & set(frozen)


def test_base_source_draws_the_unconstrained_models_images_of_the_prompt(tiny_sd):
    result = relearn(source="base", steps=1).run(red_target(tiny_sd), ROW, never_flags(), Budget(), seed=2)
    assert result.extra["image_source"] == "base" and result.extra["captions"] == [ROW["prompt"]] * 2
    assert "images" in result.extra["setup_compute"]


@pytest.mark.parametrize("spec, words", [
    ("relearn:mode=dense", "unknown mode 'dense'"),
    ("relearn:source=web", "unknown image source 'web'"),
    ("relearn:source=folder", "source=folder needs images=FOLDER"),
    ("relearn:steps=5,eval_at=9", "eval_at steps must be in 1..steps (5)"),
    ("relearn:k=0", "k must be in [1, inf]"),
])
def test_bad_options_are_one_line(spec, words):
    with pytest.raises(SafediffError, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        build_attack(spec)


def test_modules_that_match_nothing_are_named(tiny_sd):
    with pytest.raises(SafediffError, match="match no UNet parameter"):
        relearn(modules="no_such_block").run(red_target(tiny_sd), ROW, never_flags(), Budget(), seed=0)


def test_cli_attack_relearn(monkeypatch, capsys, tmp_path, tiny_folder):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt,seed\na red circle,1\n")
    out = tmp_path / "run"
    args = ["attack", "--target", str(tiny_folder), "--method", "relearn:source=world,k=1,steps=1,batch=1",
            "--concept", "red", "--prompts", str(prompts), "--judge", "sandbox-colour", "--out", str(out),
            "--steps", "2"]
    code, err = run_main(monkeypatch, capsys, *args)
    assert code == 0, err
    assert (out / "results.json").is_file() and (out / "prompts" / "000000.json").is_file()
    args[args.index("--out") + 1] = str(tmp_path / "other")
    args[args.index("--method") + 1] = "relearn:source=world,k=1,steps=1,mode=lora,modules=nothing"
    code, err = run_main(monkeypatch, capsys, *args)
    one_line_error(code, err, "match no UNet Linear module")


def test_the_loss_on_a_flow_model_is_the_velocity_error_recomputed(tiny_sd3):
    """SD3: L = mean ‖(ε − x₀) − v_θ((1 − σ) x₀ + σ ε, t, c)‖², σ = t / 1000, with the transformer called directly."""
    x0 = torch.randn(2, *tiny_sd3.adapter.latent_shape(32, 32), generator=torch.Generator().manual_seed(0))
    cond = tiny_sd3.adapter.encode(["a red circle", "a blue square"])
    t = torch.tensor([10, 700])
    loss = diffusion_loss(tiny_sd3, x0, cond, torch.Generator().manual_seed(5), t=t)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    s = (t.float() / 1000).view(-1, 1, 1, 1)
    with torch.no_grad():
        pred = tiny_sd3.pipe.transformer((1 - s) * x0 + s * eps, encoder_hidden_states=cond.embeds,
                                         pooled_projections=cond.pooled, timestep=t).sample
    assert torch.allclose(loss, F.mse_loss(pred, eps - x0), rtol=1e-5, atol=1e-7)


def test_lora_on_a_transformer_adapts_image_and_text_stream_projections(tiny_flux):
    names = select(tiny_flux, "lora")
    assert any(".add_k_proj." in n for n in names) and any(".attn.to_q." in n for n in names)
    trained = Trainable(tiny_flux, names, "lora", torch.Generator().manual_seed(0))
    assert set(trained.tensors()) == {f"transformer.{n}" for n in names}
