"""The command line on SD3 and FLUX folders written by ``save_pretrained``: generate, erase, attack and bench accept
them through ``--model DIR`` / ``--target DIR``, as they accept SD ones."""

import json

import pytest

from cli_helpers import run_main


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from safediff.random_models import build_pipeline

    root = tmp_path_factory.mktemp("dit-cli")
    out = {}
    for arch in ("tiny-sd3", "tiny-flux"):
        build_pipeline(arch).save_pretrained(root / arch)
        out[arch] = root / arch
    return out


SMALL = ("--steps", "2", "--height", "32", "--width", "32")


@pytest.mark.parametrize("arch", ["tiny-sd3", "tiny-flux"])
def test_erase_then_generate_with_the_edit(folders, arch, tmp_path, monkeypatch, capsys):
    edit = tmp_path / "uce.safetensors"
    code, err = run_main(monkeypatch, capsys, "erase", "--model", str(folders[arch]), "--method", "uce",
                         "--concept", "red", "--out", str(edit))
    assert code == 0 and edit.is_file(), err
    code, err = run_main(monkeypatch, capsys, "generate", "--model", f"{folders[arch]}+{edit}", "--prompt",
                         "a red circle", *SMALL, "--guidance", "3", "--guard", "sld:max", "--concept", "red",
                         "--cache-text", "--out", str(tmp_path / "images"))
    assert code == 0, err
    protocol = json.loads((tmp_path / "images" / "protocol.json").read_text())
    assert protocol["model"]["architecture"] == arch.split("-")[1] and len(protocol["model"]["edits"]) == 1
    assert protocol["generation"]["guard"]["name"] == "sld"
    assert ("embedded_guidance" in protocol["generation"]) == (arch == "tiny-flux")


def test_flux_guard_without_cfg_is_one_line(folders, tmp_path, monkeypatch, capsys):
    from cli_helpers import one_line_error

    one_line_error(*run_main(monkeypatch, capsys, "generate", "--model", str(folders["tiny-flux"]), "--prompt", "x",
                             *SMALL, "--guard", "sld", "--concept", "red", "--out", str(tmp_path / "o")),
                   "guidance > 1")


def test_attack_and_bench_on_flux(folders, tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt,seed\na red circle,1\n")
    code, err = run_main(monkeypatch, capsys, "attack", "--target", str(folders["tiny-flux"]), "--method",
                         "ring-a-bell:population=8", "--budget", "iterations=2", "--concept", "red", "--prompts",
                         str(prompts), "--judge", "sandbox-colour", "--steps", "2", "--out", str(tmp_path / "atk"))
    assert code == 0, err
    assert json.loads((tmp_path / "atk" / "results.json").read_text())["n"] == 1
    code, err = run_main(monkeypatch, capsys, "bench", "--benchmark", str(prompts), "--model",
                         str(folders["tiny-flux"]), *SMALL, "--detector", "sandbox-colour",
                         "--out", str(tmp_path / "bench"))
    assert code == 0, err
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert results["n_samples"]["images"] == 1
