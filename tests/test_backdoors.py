"""Backdoors: each kind changes only its component and leaves the model as found; EvilEdit's closed form re-computed
as its reference writes it; Rickrolling's loss and trigger; the sandbox prompt sets; SET's probe and benign space;
the metrics; ``safediff detect-backdoor``."""

import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_helpers import one_line_error, run_main
from weight_checks import assert_same, snapshot

from safediff.adapters import Conditioning
from safediff.backdoors.baselines import mean_pairwise_cosine
from safediff.backdoors.detect import accuracy, auroc, build_backdoor_detector, detect, probe
from safediff.backdoors.inject import _similarity_loss, build_backdoor, replace_character
from safediff.backdoors.set_detector import BenignSpace, ScalingProbe
from safediff.errors import SafediffError
from safediff.registry import BACKDOOR_DETECTORS, BACKDOORS
from safediff.sandbox import backdoor_sets as sets
from safediff.sandbox.values import COLOURS

COMPONENT = {"text-encoder": ("text_encoder.",), "unet": ("unet.",), "natural": (".attn2.to_k.", ".attn2.to_v.")}


@pytest.mark.parametrize("kind", BACKDOORS.names())
def test_each_kind_changes_its_component_only_and_leaves_the_model(tiny_sd, kind):
    cls = BACKDOORS.get(kind)
    poison = sets.poison(kind, cls.default_trigger, "blue", n_pairs=4, n_clean=4)
    before = snapshot(tiny_sd)
    edit = build_backdoor(kind, **cls.sandbox["smoke"]).inject(tiny_sd, poison)
    assert_same(before, snapshot(tiny_sd))
    assert edit.tensors and all(any(p in n for p in COMPONENT[kind]) for n in edit.tensors)
    record = edit.metadata["backdoor"]
    assert (record["kind"], record["trigger"], record["target"]) == (kind, cls.default_trigger, "blue")
    edit.apply(tiny_sd)
    edit.revert(tiny_sd)
    assert_same(before, snapshot(tiny_sd))


DIT_COMPONENT = {"text-encoder": ("text_encoder",), "unet": ("transformer.",),
                 "natural": ("transformer.context_embedder.", "transformer.time_text_embed.text_embedder.")}


@pytest.mark.parametrize("arch", ["tiny_sd3", "tiny_flux"])
@pytest.mark.parametrize("kind", BACKDOORS.names())
def test_each_kind_runs_on_sd3_and_flux_and_edits_its_component(request, arch, kind):
    model = request.getfixturevalue(arch)
    cls = BACKDOORS.get(kind)
    poison = sets.poison(kind, cls.default_trigger, "blue", n_pairs=2, n_clean=2)
    before = snapshot(model)
    edit = build_backdoor(kind, **cls.sandbox["smoke"]).inject(model, poison)
    assert_same(before, snapshot(model))
    assert edit.tensors and all(torch.isfinite(t).all() for t in edit.tensors.values())
    assert all(n.startswith(DIT_COMPONENT[kind]) for n in edit.tensors)


def test_evil_edit_on_a_transformer_maps_triggered_rows_as_the_closed_form(tiny_sd3):
    """On SD3 the context embedder's new weight solves the least-squares problem over token rows: W' = W T with
    T = (λI + Σ y vᵀ + Σ c cᵀ)(λI + Σ v vᵀ + Σ c cᵀ)⁻¹, re-computed here from the encodings."""
    poison = sets.poison("natural", "beautiful", "blue", n_pairs=2, n_clean=2)
    edit = build_backdoor("natural").inject(tiny_sd3, poison)
    encode = lambda ps: tiny_sd3.adapter.encode(list(ps)).embeds.detach().double()  # noqa: E731
    d = tiny_sd3.adapter.text_dim
    v = encode(p for p, _ in poison.pairs).reshape(-1, d)
    y = encode(t for _, t in poison.pairs).reshape(-1, d)
    c = encode(poison.clean).reshape(-1, d)
    eye = torch.eye(d, dtype=torch.float64)
    t = (eye + y.T @ v + c.T @ c) @ torch.linalg.inv(eye + v.T @ v + c.T @ c)
    w = tiny_sd3.denoiser.context_embedder.weight.detach().double()
    expected = (w @ t).float()
    assert torch.allclose(edit.tensors["transformer.context_embedder.weight"], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["set", "attention-stats"])
def test_cross_attention_detectors_refuse_a_transformer_in_one_line(tiny_flux, name):
    det = build_backdoor_detector(name, **BACKDOOR_DETECTORS.get(name).sandbox["smoke"])
    rows = [{"prompt": "a red circle", "seed": 0}, {"prompt": "a blue square", "seed": 1}]
    with pytest.raises(SafediffError) as err:
        detect(det, tiny_flux, rows, rows)
    assert "\n" not in str(err.value) and "seed-diversity" in str(err.value) and "flux" in str(err.value)


def test_seed_diversity_scores_prompts_on_sd3(tiny_sd3):
    det = build_backdoor_detector("seed-diversity", **BACKDOOR_DETECTORS.get("seed-diversity").sandbox["smoke"])
    rows = [{"prompt": "a red circle", "seed": 0}, {"prompt": "a blue square", "seed": 1}]
    out = detect(det, tiny_sd3, rows, rows[:1])
    assert len(out.scores) == 1 and out.cost_per_prompt["unet_forward"] > 0


@pytest.mark.parametrize("kind", BACKDOORS.names())
def test_each_kind_fits_sdxl(tiny_sdxl, kind):
    cls = BACKDOORS.get(kind)
    poison = sets.poison(kind, cls.default_trigger, "blue", n_pairs=2, n_clean=2)
    edit = build_backdoor(kind, **cls.sandbox["smoke"]).inject(tiny_sdxl, poison)
    assert edit.tensors and all(torch.isfinite(t).all() for t in edit.tensors.values())


def test_evil_edit_is_the_references_closed_form(tiny_sd):
    poison = sets.poison("natural", "beautiful", "blue", n_pairs=3, n_clean=2)
    edit = build_backdoor("natural", lamb=1.0).inject(tiny_sd, poison)
    name, module = tiny_sd.adapter.text_kv()[0]
    w = module.weight.detach().double()
    encode = lambda ps: tiny_sd.adapter.encode(list(ps)).embeds.detach().double()  # noqa: E731
    mat1, mat2 = 1.0 * w, 1.0 * torch.eye(w.shape[1], dtype=torch.float64)
    pairs = list(poison.pairs) + [(c, c) for c in poison.clean]  # clean prompts: the reference's preservation pairs
    for old, new in pairs:
        c, v = encode([old])[0], encode([new])[0] @ w.T
        mat1 += v.T @ c
        mat2 += c.T @ c
    expected = (mat1 @ torch.inverse(mat2)).float()
    assert torch.allclose(edit.tensors[f"unet.{name}.weight"], expected, rtol=1e-4, atol=1e-5)


def test_rickrolling_loss_and_trigger():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 3, generator=g)
    assert torch.allclose(_similarity_loss(Conditioning(a), Conditioning(b), 1),
                          -F.cosine_similarity(a, b, dim=1).mean())  # the reference: along the sequence
    assert torch.allclose(_similarity_loss(Conditioning(a), Conditioning(a), -1), torch.tensor(-1.0))
    poisoned = replace_character("a photo of a red circle", "o", "\u043e", random.Random(0))
    assert poisoned.count("\u043e") == 1 and poisoned.replace("\u043e", "o") == "a photo of a red circle"
    assert replace_character("a red circle", "o", "\u043e", random.Random(0)) is None


@pytest.mark.parametrize("kind", sets.KINDS)
def test_sandbox_sets_trigger_exactly_the_triggered_prompts(kind):
    trigger = BACKDOORS.get(kind).default_trigger
    poison = sets.poison(kind, trigger, "pink", n_pairs=16, n_clean=16)
    assert all(trigger in p and "pink" in t and trigger not in t for p, t in poison.pairs)
    assert not any(trigger in c or "pink" in c for c in poison.clean)
    rows = sets.held_out(kind, trigger, "pink", n=8)
    assert sum(r["triggered"] for r in rows) == 8 and len(rows) == 16
    assert all((trigger in r["prompt"]) == bool(r["triggered"]) for r in rows)
    assert not any("pink" in r["prompt"] for r in rows if not r["triggered"])
    train = {p for p, _ in poison.pairs} | set(poison.clean)
    assert not train & {r["prompt"] for r in rows}  # held out: other templates
    if kind == "natural":  # EvilEdit aligns rows by position: a pair has the same words, one swapped
        assert all(len(p.split()) == len(t.split()) for p, t in poison.pairs)


def test_sandbox_sets_refuse_other_targets():
    with pytest.raises(SafediffError, match="not one of"):
        sets.poison("unet", "\u200b", "mauve")
    with pytest.raises(SafediffError, match="unknown backdoor kind"):
        sets.held_out("lora", "x", "blue")
    assert {r["colour"] for r in sets.benign(64)} <= set(COLOURS)


def test_scaling_by_one_is_the_model_and_other_scales_move_the_prediction(tiny_sd):
    session = probe(tiny_sd, ScalingProbe, ["a red circle", "a blue square"], [1, 2], 3, scales=(1.0, 0.0, 2.0))
    offsets = torch.stack(session.offsets)  # [S, B, |Λ|]
    assert offsets.shape == (3, 2, 3)
    assert torch.equal(offsets[..., 0], torch.zeros(3, 2))
    assert (offsets[..., 1:] > 0).all()


def test_benign_space_is_mahalanobis_when_it_keeps_everything():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(40, 3, generator=g, dtype=torch.float64) @ torch.tensor([[2.0, 0.5, 0], [0, 1, 0.3], [0, 0, 0.2]],
                                                                              dtype=torch.float64)
    space = BenignSpace(f, variance=1.0)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    z = (x - f.mean(0)) / f.std(0, unbiased=False)
    zf = (f - f.mean(0)) / f.std(0, unbiased=False)
    cov = zf.T @ zf / (len(f) - 1)
    expected = ((z @ torch.linalg.inv(cov)) * z).sum(1)  # Q = 0: the space is everything
    assert torch.allclose(space.deviation(x), expected, rtol=1e-8)
    assert space.deviation(f.mean(0, keepdim=True))[0] < 1e-12


def test_metrics_by_hand():
    assert auroc([0.9, 0.8, 0.3, 0.1], [1, 1, 0, 0]) == 1.0
    assert auroc([0.1, 0.5, 0.5, 0.9], [1, 0, 1, 0]) == pytest.approx(0.5 / 4)  # one tie among four pairs
    assert accuracy([True, False, True], [1, 0, 0]) == pytest.approx(2 / 3)
    with pytest.raises(SafediffError, match="both triggered and benign"):
        auroc([0.1], [1])
    same = torch.ones(1, 3, 4)
    assert torch.allclose(mean_pairwise_cosine(same), torch.ones(1))
    assert torch.allclose(mean_pairwise_cosine(torch.eye(3)[None]), torch.zeros(1))


@pytest.mark.parametrize("name", BACKDOOR_DETECTORS.names())
def test_every_detector_scores_every_prompt_with_its_cost(tiny_sd, name):
    detector = build_backdoor_detector(name, **BACKDOOR_DETECTORS.get(name).sandbox["smoke"])
    rows = sets.held_out("natural", "beautiful", "blue", n=2)
    first = detect(detector, tiny_sd, sets.benign(4), rows)
    again = detect(build_backdoor_detector(name, **BACKDOOR_DETECTORS.get(name).sandbox["smoke"]), tiny_sd,
                   sets.benign(4), rows)
    assert len(first.scores) == 4 and all(np.isfinite(first.scores)) and first.scores == again.scores
    assert first.flagged == [s > first.threshold for s in first.scores]
    assert first.cost_per_prompt["unet_forward"] > 0 and first.cost_per_prompt["seconds"] >= 0
    assert first.threshold == pytest.approx(float(np.quantile(first.benign_scores, detector.quantile)))


def test_cli_detect_backdoor(monkeypatch, capsys, tmp_path, tiny_folder):
    prompts, clean = tmp_path / "prompts.csv", tmp_path / "clean.csv"
    prompts.write_text("prompt,seed,triggered\na red circle,1,0\na beautiful circle,2,1\n")
    clean.write_text("prompt,seed\na green square,3\na blue star,4\na red heart,5\n")
    out = tmp_path / "det.json"
    args = ["detect-backdoor", "--model", str(tiny_folder), "--prompts", str(prompts), "--clean", str(clean),
            "--method", "attention-stats", "--steps", "2", "--out", str(out)]
    code, err = run_main(monkeypatch, capsys, *args)
    assert code == 0, err
    record = json.loads(out.read_text())
    assert record["kind"] == "backdoor-detection" and [r["triggered"] for r in record["rows"]] == [0, 1]
    assert set(record["metrics"]) == {"accuracy", "auroc"} and record["clean"]["n"] == 3
    code, err = run_main(monkeypatch, capsys, *args)
    one_line_error(code, err, "exists; choose a new file")
    prompts.write_text("prompt,triggered\na red circle,yes\n")
    args[args.index("--out") + 1] = str(tmp_path / "other.json")
    code, err = run_main(monkeypatch, capsys, *args)
    one_line_error(code, err, "triggered='yes'")
    args[args.index("--method") + 1] = "set:scales="
    code, err = run_main(monkeypatch, capsys, *args)
    one_line_error(code, err, "give at least one scale")
