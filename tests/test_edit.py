"""Edit: apply/revert bit-exact, stacking, save/load, base-hash and chain checks, corrupt files, exports."""

import pytest
import torch
from safetensors.torch import load_file

from float_bounds import assert_close
from safediff.concepts import resolve
from safediff.errors import SafediffError
from safediff.edits import Edit
from safediff.erasers.uce import UCE
from safediff.sampling import generate
from weight_checks import assert_same, changed, snapshot


@pytest.fixture
def red_edit(tiny_sd):
    return UCE().fit(tiny_sd, resolve("red"), progress=False)


def test_apply_changes_only_the_edit_and_revert_is_bit_exact(tiny_sd, red_edit):
    before = snapshot(tiny_sd)
    red_edit.apply(tiny_sd)
    after = snapshot(tiny_sd)
    assert changed(before, after) == set(red_edit.tensors) and red_edit.tensors
    assert tiny_sd.edits == [red_edit]
    assert tiny_sd.protocol()["edits"][0]["method"] == "uce"
    assert red_edit.metadata["provenance"]["torch_threads"] == torch.get_num_threads()
    assert red_edit.metadata["device"] == "cpu"
    red_edit.revert(tiny_sd)
    assert_same(before, snapshot(tiny_sd))
    assert tiny_sd.edits == [] and tiny_sd.weights_sha256() == tiny_sd.base_sha256
    with pytest.raises(SafediffError, match="not applied"):
        red_edit.revert(tiny_sd)


def test_save_load_apply_reproduces_images(tiny_sd, red_edit, tmp_path):
    from safediff.models import from_pipeline
    from safediff.random_models import build_pipeline

    path = red_edit.save(tmp_path / "red.safetensors")
    red_edit.apply(tiny_sd)
    want = generate(tiny_sd, ["a red circle", "a blue square"], [1, 2], progress=False).pixels
    fresh = from_pipeline(build_pipeline("tiny-sd"), spec="tiny-sd", defaults=tiny_sd.defaults)
    loaded = Edit.load(path)
    assert loaded.digest == red_edit.digest and loaded.metadata == red_edit.metadata
    loaded.apply(fresh)
    got = generate(fresh, ["a red circle", "a blue square"], [1, 2], progress=False).pixels
    assert torch.equal(want, got)


def test_stack_two_edits_and_revert_in_reverse_order(tiny_sd, red_edit):
    before = snapshot(tiny_sd)
    red_edit.apply(tiny_sd)
    middle = snapshot(tiny_sd)
    circle = UCE().fit(tiny_sd, resolve("circle"), progress=False)
    assert circle.metadata["parents"] == [red_edit.digest]
    assert_same(middle, snapshot(tiny_sd))  # fit left the model as it was
    circle.apply(tiny_sd)
    assert changed(middle, snapshot(tiny_sd)) == set(circle.tensors)
    with pytest.raises(SafediffError, match="reverse order"):
        red_edit.revert(tiny_sd)
    circle.revert(tiny_sd)
    assert_same(middle, snapshot(tiny_sd))
    red_edit.revert(tiny_sd)
    assert_same(before, snapshot(tiny_sd))
    with pytest.raises(SafediffError, match="on top of 1 other edit"):  # the chain is checked
        circle.apply(tiny_sd)
    assert_same(before, snapshot(tiny_sd))


def test_edit_for_another_base_model_is_refused(red_edit):
    from safediff.models import from_pipeline
    from safediff.random_models import build_pipeline

    other = from_pipeline(build_pipeline("tiny-sd", seed=1), spec="other")
    before = snapshot(other)
    with pytest.raises(SafediffError, match="edit made for another base model"):
        red_edit.apply(other)
    assert_same(before, snapshot(other)) and other.edits == []


def test_corrupt_truncated_or_foreign_files_give_one_line_errors(red_edit, tmp_path):
    from safetensors.torch import save_file

    good = red_edit.save(tmp_path / "good.safetensors").read_bytes()
    cases = {
        "truncated": good[: len(good) // 2],
        "header-cut": good[:20],
        "garbage": b"\x00\x01not a safetensors file at all" * 10,
        "empty": b"",
    }
    for name, data in cases.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(data)
        with pytest.raises(SafediffError) as e:
            Edit.load(p)
        assert "\n" not in str(e.value), name
    save_file({"x": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(SafediffError, match="without safediff edit metadata"):
        Edit.load(tmp_path / "foreign.safetensors")
    with pytest.raises(SafediffError, match="not found"):
        Edit.load(tmp_path / "missing.safetensors")


def test_save_is_atomic_and_never_pickles(red_edit, tmp_path):
    path = red_edit.save(tmp_path / "e.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.safetensors"]  # no temporary file left
    assert not path.read_bytes().startswith(b"\x80")  # not a pickle protocol header


def test_export_folder_loads_as_the_edited_model(tiny_sd, red_edit, tmp_path):
    from safediff.models import load_pipeline

    before = snapshot(tiny_sd)
    out = red_edit.export_folder(tiny_sd, tmp_path / "exported")
    assert_same(before, snapshot(tiny_sd)) and tiny_sd.edits == []  # applied only for the export
    assert not list(out.rglob("*.bin")) and list(out.rglob("*.safetensors"))
    red_edit.apply(tiny_sd)
    exported = load_pipeline(str(out))
    assert exported.weights_sha256() == tiny_sd.weights_sha256()


def test_lora_export_full_rank_is_exact_and_loads_in_diffusers(tiny_sd, red_edit, tmp_path):
    pytest.importorskip("peft")
    red_edit.apply(tiny_sd)
    report = red_edit.export_lora(tmp_path / "lora.safetensors")
    # full rank keeps every singular value of ΔW above the rounding of W itself (max(shape)·eps·‖W‖_F, numpy's
    # matrix_rank tolerance): W_old + BA equals W_new up to that, relative to ‖W‖
    lora, originals = load_file(tmp_path / "lora.safetensors"), red_edit.originals(tiny_sd)
    for name, new in red_edit.tensors.items():
        module = name[: -len(".weight")]
        b, a = (lora[f"{module}.lora_{x}.weight"].double() for x in "BA")
        got = originals[name].double() + b @ a
        tolerance = max(new.shape) * torch.finfo(torch.float32).eps
        assert float((got - new.double()).norm() / new.double().norm()) <= tolerance, name
    low = red_edit.export_lora(tmp_path / "lora1.safetensors", rank=1)
    assert low["rank"] == 1 and low["relative_error"] > report["relative_error"]
    mid = red_edit.export_lora(tmp_path / "lora2.safetensors", rank=2)
    assert low["relative_error"] >= mid["relative_error"] >= report["relative_error"]

    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = tiny_sd.adapter.encode(["a red circle"]).embeds
    with torch.no_grad():
        want = tiny_sd.denoiser(x, 10, encoder_hidden_states=cond).sample
    red_edit.revert(tiny_sd)
    tiny_sd.pipe.load_lora_weights(str(tmp_path / "lora.safetensors"))
    with torch.no_grad():
        got = tiny_sd.denoiser(x, 10, encoder_hidden_states=cond).sample
        tiny_sd.pipe.unload_lora_weights()
        base = tiny_sd.denoiser(x, 10, encoder_hidden_states=cond).sample
    assert_close(got, want, 1e-4, relative=True)
    assert (base - want).abs().max() > 100 * (got - want).abs().max()  # the LoRA carries the edit


def test_lora_export_needs_base_weights_and_rejects_non_linear(red_edit, tmp_path):
    from safediff.edits.lora import export_lora

    with pytest.raises(SafediffError, match="base weights"):
        red_edit.export_lora(tmp_path / "x.safetensors")
    conv = {"unet.conv_in.weight": torch.ones(32, 4, 3, 3)}
    with pytest.raises(SafediffError, match="Linear"):
        export_lora(conv, {"unet.conv_in.weight": torch.zeros(32, 4, 3, 3)}, tmp_path / "x.safetensors")
