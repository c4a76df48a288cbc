"""FreezeAsGuard: the published mask has the freezing ratio asked for, the mask gradient is the reference's chain
rule, the relearning attack honours the mask, the base eraser's tensors are what the edit holds, bad input is one
line."""

import math

import pytest
import torch
from cli_helpers import one_line_error, run_main
from weight_checks import assert_same, snapshot

from safediff.concepts import resolve
from safediff.edits import Edit
from safediff.erasers import build_eraser
from safediff.erasers.freezeasguard import FreezeAsGuard, user_view
from safediff.errors import SafediffError
from safediff.finetune import frozen_by_edits, select

SMOKE = {**FreezeAsGuard.sandbox["smoke"], "base": ""}


def fit(model, **options):
    return FreezeAsGuard(**{**SMOKE, **options}).fit(model, resolve("red"), preserve=["blue", "green"],
                                                      progress=False)


@pytest.mark.parametrize("ratio", [0.0, 0.2, 0.5])
def test_the_published_mask_freezes_the_ratio_asked_for(tiny_sd, ratio):
    before = snapshot(tiny_sd)
    edit = fit(tiny_sd, ratio=ratio)
    assert_same(before, snapshot(tiny_sd))
    freeze = edit.metadata["info"]["freeze"]
    names = [f"unet.{n}" for n, _ in tiny_sd.denoiser.named_parameters()]
    assert freeze["tensors"] == len(names) and set(freeze["frozen"]) <= set(names)
    assert len(freeze["frozen"]) == math.ceil(ratio * len(names) - 1e-9)
    scores = freeze["scores"]
    kept = [scores[n] for n in names if n not in freeze["frozen"]]
    assert all(scores[n] >= max(kept, default=0.0) for n in freeze["frozen"])  # the largest m are frozen
    assert edit.tensors == {} and edit.metadata["info"]["images"]["legal_concepts"] == ["blue", "green"]


def test_threshold_binarisation_freezes_the_tensors_with_m_above_one_half(tiny_sd):
    freeze = fit(tiny_sd, binarize="threshold").metadata["info"]["freeze"]
    assert sorted(freeze["frozen"]) == sorted(n for n, m in freeze["scores"].items() if m > 0.5)


def test_mask_gradient_is_the_references_chain_rule():
    """∂L/∂x_i = ⟨θ_pre,i − θ_ft,i, ∂L/∂θ_i⟩ · m_i (1 − m_i) / T, as mask_learner.py writes it by hand."""
    g = torch.Generator().manual_seed(0)
    names = ["a", "b", "c"]
    pre = {n: torch.randn(4, 3, generator=g) for n in names}
    ft = {n: torch.randn(4, 3, generator=g) for n in names}
    target = {n: torch.randn(4, 3, generator=g) for n in names}
    temperature = 0.2
    x = torch.rand(3, generator=g).requires_grad_(True)
    m = torch.sigmoid(x / temperature)
    theta = {n: t.detach().requires_grad_(True) for n, t in user_view(pre, ft, m.detach(), names).items()}
    loss_of = lambda p: sum(((p[n] - target[n]) ** 2).sum() for n in names)  # noqa: E731
    (grad_x,) = torch.autograd.grad(loss_of(user_view(pre, ft, m, names)), [x])
    grads = torch.autograd.grad(loss_of(theta), [theta[n] for n in names])
    mm = m.detach()
    by_hand = torch.stack([((pre[n] - ft[n]) * d).sum() for n, d in zip(names, grads)]) * mm * (1 - mm) / temperature
    assert torch.allclose(grad_x, by_hand, rtol=1e-5, atol=1e-6)


def test_the_relearning_attack_honours_the_published_mask(tiny_sd):
    edit = fit(tiny_sd, ratio=0.3)
    edit.apply(tiny_sd)
    frozen = set(edit.metadata["info"]["freeze"]["frozen"])
    assert frozen_by_edits(tiny_sd) == frozen
    trained = {f"unet.{n}" for n in select(tiny_sd, "full", (), frozen_by_edits(tiny_sd))}
    assert trained and not trained & frozen and len(trained) + len(frozen) == len(select(tiny_sd, "full"))


def test_a_base_eraser_runs_first_and_its_tensors_are_published(tiny_sd):
    edit = fit(tiny_sd, base="uce")
    uce = build_eraser("uce").fit(tiny_sd, resolve("red"), preserve=["blue", "green"], progress=False)
    assert edit.tensors.keys() == uce.tensors.keys()
    assert all(torch.equal(edit.tensors[k], uce.tensors[k]) for k in uce.tensors)
    assert edit.metadata["info"]["base"]["method"] == "uce" and edit.metadata["info"]["freeze"]["frozen"]


def test_without_legal_concepts_it_says_what_to_give(tiny_sd):
    with pytest.raises(SafediffError, match="needs legal concepts"):
        FreezeAsGuard(**SMOKE).fit(tiny_sd, resolve("red"), preserve=[], progress=False)


@pytest.mark.parametrize("options, words", [
    ({"binarize": "median"}, "binarize must be one of top, threshold"),
    ({"base": "freezeasguard"}, "base must be another eraser"),
    ({"ratio": 1.5}, "ratio must be in [0, 1]"),
    ({"source": "folder", "images": "x"}, "needs legal_images=FOLDER"),
])
def test_bad_options_are_one_line(options, words):
    with pytest.raises(SafediffError) as e:
        FreezeAsGuard(**options)
    assert words in str(e.value)


def test_cli_erase_freezeasguard_writes_the_mask(monkeypatch, capsys, tmp_path, tiny_folder):
    out = tmp_path / "fag.safetensors"
    spec = "freezeasguard:source=world,n_images=2,batch=2,relearn_steps=1,iterations=2,ratio=0.25"
    code, err = run_main(monkeypatch, capsys, "erase", "--model", str(tiny_folder), "--method", spec, "--concept",
                         "red", "--preserve", "blue", "--out", str(out))
    assert code == 0, err
    freeze = Edit.load(out).metadata["info"]["freeze"]
    assert freeze["frozen"] and freeze["ratio"] == pytest.approx(len(freeze["frozen"]) / freeze["tensors"])
    code, err = run_main(monkeypatch, capsys, "erase", "--model", str(tiny_folder), "--method",
                         "freezeasguard:binarize=half", "--concept", "red", "--out", str(tmp_path / "x.safetensors"))
    one_line_error(code, err, "binarize must be one of")


def test_resume_after_interruption_is_bit_identical(tiny_sd, tmp_path, monkeypatch):
    """Interrupted in the bi-level phase, after a checkpoint that holds θ_ft, the AdamW moments of the relearning
    steps, the generator and the mask logits: the resumed fit publishes the same scores as an uninterrupted one."""
    import safediff.erasers.freezeasguard as module

    kwargs = dict(relearn_steps=3, iterations=6, user_interval=2, ratio=0.25)
    straight = fit(tiny_sd, **kwargs).metadata["info"]
    ckpt = tmp_path / "fag.checkpoint.safetensors"
    loss = module.diffusion_loss
    calls = {"n": 0}

    def interrupted(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 6:  # iteration 5 (the third bi-level step), after the checkpoint of iteration 4
            raise KeyboardInterrupt
        return loss(*args, **kw)

    monkeypatch.setattr(module, "diffusion_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_sd, **kwargs, checkpoint=str(ckpt), checkpoint_every=2)
    monkeypatch.setattr(module, "diffusion_loss", loss)
    assert ckpt.is_file()
    resumed = fit(tiny_sd, **kwargs, checkpoint=str(ckpt), checkpoint_every=2).metadata["info"]
    assert resumed["resumed_at_iteration"] == 4 and straight["resumed_at_iteration"] is None
    assert resumed["freeze"] == straight["freeze"]
    for key in ("relearn_loss", "loss_illegal", "loss_legal"):
        assert resumed[key] == straight[key]
    with pytest.raises(SafediffError, match="different run"):
        fit(tiny_sd, **{**kwargs, "ratio": 0.5}, checkpoint=str(ckpt))
