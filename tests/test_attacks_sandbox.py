"""benchmarks/attacks_sandbox.py: any registered eraser is a target, and ``--edits-from`` attacks the very edit of an
erasers_sandbox_v2 output (copied, never refitted) only when that output fitted at the attack's settings."""

import json
from pathlib import Path

import pytest

from bench_helpers import load_benchmark


def script():
    return load_benchmark("attacks_sandbox")


def table(tmp_path, purpose="benchmark", steps=None):
    folder = tmp_path / "table"
    (folder / "edits").mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"plan": {"purpose": purpose, "steps": steps}, "results": {}}))
    return folder / "edits"


def test_a_table_edit_is_copied_not_refitted(tmp_path, monkeypatch):
    mod = script()
    edits_from = table(tmp_path)
    (edits_from / "salun-red.safetensors").write_bytes(b"the table's edit")

    def no_fit(*args, **kwargs):
        raise AssertionError("an edit of the table was fitted again")

    monkeypatch.setattr(mod, "build_eraser", no_fit)
    path = mod.fitted_edit("sandbox", "salun", "salun", {}, tmp_path / "edits", edits_from)
    assert path == tmp_path / "edits" / "salun-red.safetensors" and path.read_bytes() == b"the table's edit"
    assert mod.table_edit(edits_from, "doco") is None and mod.table_edit(None, "salun") is None


def test_a_table_fitted_at_other_settings_is_refused(tmp_path):
    mod = script()
    edits_from = table(tmp_path, purpose="smoke", steps=2)
    (edits_from / "uce-red.safetensors").write_bytes(b"x")
    with pytest.raises(SystemExit, match="purpose=smoke, steps=2; accepted"):
        mod.table_edit(edits_from, "uce")


def test_an_unknown_target_names_what_is_accepted(tiny_folder, tmp_path):
    mod = script()
    with pytest.raises(SystemExit, match="unknown target 'nothing'; accepted: plain, sld, casg, .*salun.*adavd"):
        mod.targets(str(tiny_folder), dict(mod.ERASER_TARGETS), tmp_path, ["nothing"])


def test_a_registered_guard_is_a_target_at_its_preset_for_the_architecture(tiny_folder):
    mod = script()
    assert "spm" not in mod.attackable_guards() and {"adavd", "safree", "sld"} <= set(mod.attackable_guards())
    assert mod.guard_spec("adavd", "sandbox-flux") == "adavd:space=readers" and mod.guard_spec("adavd") == "adavd"
    assert mod.guard_spec("casg") == "casg-sld:max"
    target = mod.targets(str(tiny_folder), {}, Path("unused"), ["adavd"])["adavd"]
    assert target.spec == f"{tiny_folder}:adavd" and target.guard is not None


def test_cells_of_other_weights_under_the_same_spec_are_refused(tiny_folder, tmp_path, monkeypatch):
    from safediff.sandbox.benchmarks import erasure_set

    mod = script()
    rows = [{"prompt": r["prompt"], "seed": r["seed"]} for r in erasure_set("red", 1) if r["kind"] == "target-word"][:1]
    out = tmp_path / "attacks.json"
    out.write_text(json.dumps({"prompts": rows, "budgets": "sandbox", "model": str(tiny_folder),
                               "model_sha256": "weights of an earlier training", "settings": {}, "results": {}}))
    monkeypatch.setattr("sys.argv", ["attacks_sandbox.py", "--model", str(tiny_folder), "--prompts", "1",
                                     "--targets", "plain", "--out", str(out)])
    with pytest.raises(SystemExit, match=r"another protocol \(model_sha256 differ\); choose another --out"):
        mod.main()
