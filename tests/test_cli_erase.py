"""`safediff erase` end to end on a local folder, then `generate --model DIR+EDIT`; bad input: one line, exit 2."""

import json

import pytest
import torch

from cli_helpers import run_cli


def test_erase_then_generate_with_the_edit(tiny_folder, tmp_path):
    from safediff.edits import Edit

    edit_path = tmp_path / "red.safetensors"
    r = run_cli("erase", "--model", str(tiny_folder), "--method", "uce:lamb=0.4,tokens=last", "--concept", "red",
                "--preserve",
                "green,circle", "--out", str(edit_path))
    assert r.returncode == 0, r.stderr
    assert "uce" in r.stdout and "parameter tensor(s) changed" in r.stdout and " s;" in r.stdout
    edit = Edit.load(edit_path)
    assert edit.metadata["hyperparameters"]["lamb"] == 0.4 and edit.metadata["preserve"] == ["green", "circle"]
    assert [p.name for p in tmp_path.iterdir()] == ["red.safetensors"]  # atomic: no temporary left behind

    out = tmp_path / "images"
    r = run_cli("generate", "--model", f"{tiny_folder}+{edit_path}", "--prompt", "a red circle", "--steps", "2",
                "--height", "32", "--width", "32", "--out", str(out))
    assert r.returncode == 0, r.stderr
    record = json.loads((out / "protocol.json").read_text())
    assert record["model"]["edits"][0]["edit_sha256"] == edit.digest
    assert record["model"]["edits"][0]["method"] == "uce"


@pytest.mark.parametrize("args, words", [
    (["--method", "nonsense", "--concept", "red"], "unknown eraser"),
    (["--method", "uce", "--concept", ""], "empty concept"),
    (["--method", "uce", "--concept", "<|endoftext|>"], "encodes to no tokens"),
    (["--method", "uce:lambda=1", "--concept", "red"], "unknown option"),
    (["--method", "uce:lamb=0.1,lamb", "--concept", "red"], "not KEY=VALUE"),
    (["--method", "uce", "--concept", "red", "--validator", "sandbox"], "does not take validator"),
    (["--method", "rece", "--concept", "red", "--validator", "other"], "unknown validator"),
])
def test_bad_input_one_line_exit_2(tiny_folder, tmp_path, args, words):
    r = run_cli("erase", "--model", str(tiny_folder), *args, "--out", str(tmp_path / "e.safetensors"))
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and words in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "e.safetensors").exists()


def test_edit_for_another_model_and_corrupt_edit_files_exit_2(tiny_folder, tmp_path):
    from safediff.random_models import build_pipeline

    edit_path = tmp_path / "red.safetensors"
    assert run_cli("erase", "--model", str(tiny_folder), "--method", "uce", "--concept", "red",
                   "--out", str(edit_path)).returncode == 0
    other = tmp_path / "other"
    build_pipeline("tiny-sd", seed=3).save_pretrained(other)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(edit_path.read_bytes()[:100])
    for spec, words in ((f"{other}+{edit_path}", "another base model"), (f"{tiny_folder}+{bad}", "not a readable")):
        r = run_cli("generate", "--model", spec, "--prompt", "x", "--steps", "1", "--height", "32", "--width", "32",
                    "--out", str(tmp_path / "never"))
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_iterative_eraser_resumes_from_its_checkpoint_next_to_out(tiny_folder, tmp_path):
    """A fit killed after 2 of 4 iterations leaves OUT.checkpoint.safetensors; the same command resumes from it and
    gives the edit an uninterrupted run gives, and removes the checkpoint."""
    from safediff.concepts import resolve
    from safediff.edits import Edit
    from safediff.erasers.esd import ESDX
    from safediff.models import load_pipeline

    checkpoint = tmp_path / "resumed.checkpoint.safetensors"
    ESDX(iterations=2, ddim_steps=3, checkpoint=str(checkpoint), checkpoint_every=1).fit(
        load_pipeline(str(tiny_folder)), resolve("red"), progress=False)  # stands for the killed run
    assert checkpoint.is_file()
    args = ["erase", "--model", str(tiny_folder), "--method", "esd-x:iterations=4,ddim_steps=3", "--concept", "red"]
    assert run_cli(*args, "--out", str(tmp_path / "resumed.safetensors")).returncode == 0
    assert run_cli(*args, "--out", str(tmp_path / "straight.safetensors")).returncode == 0
    resumed, straight = Edit.load(tmp_path / "resumed.safetensors"), Edit.load(tmp_path / "straight.safetensors")
    assert resumed.metadata["info"]["resumed_at_iteration"] == 2
    assert straight.metadata["info"]["resumed_at_iteration"] is None
    assert resumed.tensors.keys() == straight.tensors.keys()
    assert all(torch.equal(resumed.tensors[k], straight.tensors[k]) for k in resumed.tensors)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resumed.safetensors", "straight.safetensors"]
