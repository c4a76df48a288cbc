"""benchmarks/erasers_sandbox_v2.py at a tiny budget on a tiny random model folder: an eraser is fitted and benched,
a guard benched, a mass-erasure set run; the JSON and the table are written; a rerun reuses edits and runs."""


import pytest

from safediff.errors import SafediffError
from bench_helpers import load_benchmark


def script():
    return load_benchmark("erasers_sandbox_v2")


@pytest.fixture(scope="module")
def sandbox_detectors():
    from safediff.detectors.sandbox import SHAPE_WEIGHTS

    if not SHAPE_WEIGHTS.is_file():
        pytest.skip("sandbox shape/style weights are absent")


def test_measures_an_eraser_a_guard_and_mass_erasure_then_resumes(tiny_folder, tmp_path, sandbox_detectors,
                                                                   monkeypatch):
    mod = script()
    argv = ["--model", str(tiny_folder), "--methods", "speed,adavd", "--values", "red", "--mass", "1",
            "--n-per-kind", "1", "--steps", "2", "--purpose", "smoke", "--batch-size", "64", "--out", str(tmp_path),
            "--quiet"]
    record = mod.main(argv)
    results = record["results"]
    assert set(results) == {"speed-red", "speed-k1", "adavd-red", "adavd-k1"}
    speed = results["speed-red"]
    assert speed["kind"] == "eraser" and speed["benchmark"] == "sandbox-erase-red@1" and speed["fit_seconds"] >= 0
    assert (tmp_path / speed["edit"]).is_file() and (tmp_path / speed["run"] / "results.json").is_file()
    metrics = speed["metrics"]
    assert {"sandbox/target_rate", "sandbox/target_rate/kind=target-word", "sandbox/other_object_kept",
            "sandbox/kept_rate/kind=neighbour", "sandbox/kept_rate/kind=far",
            "sandbox/kept_rate/kind=other-attribute"} <= set(metrics)
    assert 0.0 <= metrics["sandbox/target_rate"]["value"] <= 1.0
    assert results["speed-k1"]["benchmark"] == "sandbox-erase-k1" and results["speed-k1"]["concepts"] == "red"
    assert "sandbox/kept_rate/kind=kept" in results["speed-k1"]["metrics"]
    assert results["adavd-red"]["kind"] == "guard" and results["adavd-red"]["guard"] == "adavd"
    table = (tmp_path / "results.md").read_text()
    assert table.count("\n") == 2 + 4 and "| speed | red |" in table
    heads = [h.strip() for h in table.splitlines()[0].strip("|").split("|")]
    rows = {tuple(c.strip() for c in line.strip("|").split("|"))[:2]: [c.strip() for c in line.strip("|").split("|")]
            for line in table.splitlines()[2:]}
    mcp = heads.index("MCP")  # TICoE's fidelity metric: only a set with neighbour rows has it
    assert rows[("speed", "red")][mcp] == f"{metrics['sandbox/mcp']['value']:.0%}"
    assert rows[("speed", "k1")][mcp] == "–" and "sandbox/mcp" not in results["speed-k1"]["metrics"]

    edit = tmp_path / speed["edit"]
    stamp = edit.stat().st_mtime_ns

    def no_work(*args, **kwargs):
        raise AssertionError("finished work was redone")

    monkeypatch.setattr("safediff.bench.runner.run_benchmark", no_work)
    again = mod.main(argv)
    assert again["results"] == results and edit.stat().st_mtime_ns == stamp

    monkeypatch.undo()
    entry = mod.measure("speed", ["red"], mod.Plan(str(tiny_folder), "", 1, 2, "smoke", 64), tmp_path, progress=False)
    assert entry["red"]["edit_sha256"] == speed["edit_sha256"]  # the saved edit is reused, the run re-read
    assert entry["red"]["metrics"] == metrics
    from safediff.registry import ERASERS

    monkeypatch.setitem(ERASERS.get("speed").sandbox, "smoke", {"n_aug": 3})  # the method's settings changed since
    with pytest.raises(SafediffError, match=r"fitted with other settings than speed's smoke ones now \(n_aug\)"):
        mod.measure("speed", ["red"], mod.Plan(str(tiny_folder), "", 1, 2, "smoke", 64), tmp_path, progress=False)


def test_another_plan_or_an_unknown_target_is_refused(tiny_folder, tmp_path, sandbox_detectors):
    mod = script()
    (tmp_path / "results.json").write_text('{"plan": {"model": "other"}, "results": {}}')
    with pytest.raises(SafediffError, match="another plan"):
        mod.main(["--model", str(tiny_folder), "--values", "red", "--out", str(tmp_path), "--quiet"])
    from safediff.models import load_pipeline
    from safediff.random_models import build_pipeline

    retrained = tmp_path / "retrained"  # results of this folder's earlier weights; now it holds other weights
    old_weights = load_pipeline(str(tiny_folder)).base_sha256
    plan = {**mod.asdict(mod.Plan(str(retrained), old_weights)), "n_per_kind": 1}
    (tmp_path / "results.json").write_text(mod.json.dumps({"plan": plan, "results": {}}))
    build_pipeline("tiny-sd", seed=1).save_pretrained(retrained)
    assert load_pipeline(str(retrained)).base_sha256 != old_weights
    with pytest.raises(SafediffError, match="another plan"):
        mod.main(["--model", str(retrained), "--values", "red", "--n-per-kind", "1", "--out", str(tmp_path),
                  "--quiet"])
    with pytest.raises(SafediffError, match="unknown target"):
        mod.target_sets("k3", 1)
    with pytest.raises(SafediffError, match="unknown method"):
        mod.measure("nothing", ["red"], mod.Plan(str(tiny_folder)), tmp_path / "x", progress=False)


def test_method_specs_with_options_are_one_method_each_and_name_their_files():
    from safediff.options import split_specs

    mod = script()
    assert split_specs("base,uce,speed:tokens=to_end,n_aug=2,mace") == \
        ["base", "uce", "speed:tokens=to_end,n_aug=2", "mace"]
    # a semicolon, or a NAME:KEY=VALUE part, starts a method even after a method with options
    assert split_specs("uce:expand_prompts=false,padding=shifted;uce:tokens=last;trce:stages=1") == \
        ["uce:expand_prompts=false,padding=shifted", "uce:tokens=last", "trce:stages=1"]
    assert split_specs("uce:padding=shifted,uce:tokens=last,lamb=0.1") == \
        ["uce:padding=shifted", "uce:tokens=last,lamb=0.1"]
    assert mod.slug("speed:tokens=to_end,n_aug=2") == "speed_tokens-to_end_n_aug-2"


def test_a_guard_applying_an_erasers_edit_is_named_by_its_prefix_and_shares_the_erasers_fit(tiny_folder, tmp_path,
                                                                                            sandbox_detectors):
    mod = script()
    record = mod.main(["--model", str(tiny_folder), "--methods", "spm,guard:spm", "--values", "red", "--n-per-kind",
                       "1", "--steps", "2", "--purpose", "smoke", "--batch-size", "64", "--out", str(tmp_path),
                       "--quiet"])
    eraser, guard = record["results"]["spm-red"], record["results"]["guard:spm-red"]
    assert eraser["kind"] == "eraser" and guard["kind"] == "guard"
    assert guard["edit"] == eraser["edit"] and guard["edit_sha256"] == eraser["edit_sha256"]  # one fit, both rows
    assert guard["guard"] == f"spm:edit={tmp_path / eraser['edit']}" and guard["fit_seconds"] == eraser["fit_seconds"]
    assert (tmp_path / guard["run"] / "results.json").is_file()


def test_two_jobs_on_other_methods_share_an_out_folder(tiny_folder, tmp_path, sandbox_detectors, monkeypatch):
    """An entry another job writes while this one runs is kept, and the table shows both jobs' rows."""
    mod = script()
    argv = ["--model", str(tiny_folder), "--mass", "1", "--n-per-kind", "1", "--steps", "2", "--purpose", "smoke",
            "--batch-size", "64", "--out", str(tmp_path), "--quiet"]
    mod.main(argv + ["--methods", "base"])
    other = mod.json.loads((tmp_path / "results.json").read_text())["results"]["base-k1"]
    measured = mod.Measurement.entry

    def entry_while_another_job_writes(self, name, target):
        result = measured(self, name, target)
        record = mod.json.loads((tmp_path / "results.json").read_text())
        record["results"]["other-k1"] = {**other, "method": "other"}  # the other job's entry lands meanwhile
        (tmp_path / "results.json").write_text(mod.json.dumps(record))
        return result

    monkeypatch.setattr(mod.Measurement, "entry", entry_while_another_job_writes)
    record = mod.main(argv + ["--methods", "adavd"])
    assert set(record["results"]) == {"base-k1", "other-k1", "adavd-k1"}
    assert set(mod.json.loads((tmp_path / "results.json").read_text())["results"]) == set(record["results"])
    table = (tmp_path / "results.md").read_text()
    assert "| other | k1 |" in table and "| adavd | k1 |" in table and "| base | k1 |" in table
