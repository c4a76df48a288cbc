"""The relearning, FreezeAsGuard and backdoor benchmarks run end to end at ``--quick`` size on a tiny pipeline folder:
their tables come from the runner's own records, a rerun resumes instead of recomputing, and the published masks
are what the attack honoured."""

import json

import pytest

from safediff.attacks.relearn import relearning_curve
from safediff.errors import SafediffError
from bench_helpers import load_benchmark



def script(name: str):
    return load_benchmark(name)


def stored(report: dict) -> dict:
    return json.loads(json.dumps(report, default=str))


def evaluation(step: int, success: bool) -> dict:
    return {"step": step, "success": success, "score": float(success)}


def test_the_relearning_curve_counts_a_success_from_its_step_on():
    pre = {"pre_success": True, "evaluations": [], "extra": {}, "pre_compute": {"unet_forward": 10}}
    late = {"pre_success": False, "evaluations": [evaluation(10, False), evaluation(50, True)],
            "extra": {"steps_done": 50}, "pre_compute": {"unet_forward": 10}}
    never = {"pre_success": False, "evaluations": [evaluation(10, False), evaluation(50, False),
                                                   evaluation(200, False)],
             "extra": {"steps_done": 200}, "pre_compute": {"unet_forward": 10}}
    curve = relearning_curve([pre, late, never], [10, 50, 200])
    assert [curve[n]["asr"] for n in ("10", "50", "200")] == [1 / 3, 2 / 3, 2 / 3]
    cost = curve["200"]["per_attacked_prompt"]  # late stopped at 50 after 2 judged runs; never ran 200 with 3
    assert cost["steps"] == cost["unet_backward"] == (50 + 200) / 2
    assert cost["judged_generations"] == 2.5 and cost["unet_forward"] == (50 + 20 + 200 + 30) / 2
    assert curve["10"]["per_attacked_prompt"]["steps"] == 10


def test_relearn_benchmark_defaults_to_the_erasers_of_the_models_architecture():
    mod = script("relearn_sandbox")
    unet, flux = (mod.parse(argv).erasers.split(",") for argv in ([], ["--model", "sandbox-flux"]))
    assert unet[0] == flux[0] == "none" and "uce" in unet and "uce" in flux
    assert "erase-anything" not in unet and "erase-anything" in flux  # MM-DiT joint attention only
    assert "mace" in unet and "mace" not in flux  # UNet cross-attention only
    assert "geom-erasing" not in unet + flux  # erases the unprompted mark, not a colour


def test_relearn_edit_key_leaves_out_the_sandbox_callables_but_not_the_settings(tmp_path, monkeypatch):
    """RECE's sandbox settings hold a validator (a closure): the cache key leaves it out and stays JSON, so the same
    edit is found again; a plain setting (ESD-x's tiers differ in iterations) still names a different edit."""
    from safediff.registry import ERASERS
    from safediff.sandbox.validation import eraser_settings

    mod = script("relearn_sandbox")
    keys = []
    monkeypatch.setattr(mod, "cached", lambda path, make, key: keys.append(key) or path)
    assert any(callable(v) for v in eraser_settings(ERASERS.get("rece"), "benchmark", mod.resolve("red")).values())
    for eraser, tier in (("rece", "benchmark"), ("rece", "benchmark"), ("esd-x", "benchmark"), ("esd-x", "smoke")):
        mod.fitted("sandbox", "sha", eraser, "red", tier, tmp_path)
    assert keys[0] == keys[1] and json.loads(json.dumps(keys[0])) == keys[0] and keys[0]["settings"] == {}
    assert keys[2]["settings"]["iterations"] == 150 and keys[3]["settings"]["iterations"] == 2


def test_relearn_benchmark_quick(tmp_path, tiny_folder):
    out = tmp_path / "relearn.json"
    report = script("relearn_sandbox").main(["--quick", "--model", str(tiny_folder), "--out", str(out)])
    assert set(report["results"]) == {"none", "uce"} and json.loads(out.read_text()) == stored(report)
    for eraser, cells in report["results"].items():
        results = json.loads((tmp_path / "relearn.runs" / eraser / "k1" / "results.json").read_text())
        assert results["kind"] == "attack-results"
        assert cells["1"]["curve"] == relearning_curve(results["records"], [1, 2])
        assert cells["1"]["curve"]["2"]["asr"] == results["asr"]
    assert (tmp_path / "relearn.md").read_text().count("\n") == 4
    again = script("relearn_sandbox").main(["--quick", "--erasers", "none", "--model", str(tiny_folder),
                                            "--out", str(out)])  # resumed: the finished prompt is not redone
    assert again["results"]["uce"] == stored(report)["results"]["uce"]  # the earlier call's cell is kept
    assert again["results"]["none"]["1"]["compute_total"] == report["results"]["none"]["1"]["compute_total"]


def test_freezeasguard_benchmark_quick(tmp_path, tiny_folder):
    from safediff.edits import Edit

    out = tmp_path / "fag.json"
    with pytest.raises(SafediffError, match="iterations=x is not a valid int"):
        script("freezeasguard_sandbox").main(["--quick", "--model", str(tiny_folder), "--out", str(out),
                                              "--freezeasguard", "iterations=x"])
    assert not out.exists() and not (tmp_path / "fag.edits").exists()
    report = script("freezeasguard_sandbox").main(["--quick", "--model", str(tiny_folder), "--out", str(out),
                                                   "--freezeasguard", "iterations=4"])
    assert set(report["results"]) == {"no mask", "freezeasguard", "random mask"}
    assert report["protocol"]["freezeasguard"]["iterations"] == 4
    assert set(report["summary"]) == {"1", "2"} and 0 < report["mask"]["ratio"] < 1
    for condition, edit in (("freezeasguard", "freezeasguard-smoke"), ("random-mask", "random-mask-smoke")):
        [path] = (tmp_path / "fag.edits").glob(f"{edit}-*.safetensors")  # named with the hash of its settings
        frozen = Edit.load(path).metadata["info"]["freeze"]["frozen"]
        if condition == "freezeasguard":
            assert Edit.load(path).metadata["hyperparameters"]["iterations"] == 4  # --freezeasguard over smoke's 3
        record = json.loads((tmp_path / "fag.runs" / condition / "red" / "prompts" / "000000.json").read_text())
        if not record["pre_success"]:
            assert record["extra"]["frozen_honoured"] == sorted(frozen)
    rec = json.loads((tmp_path / "fag.runs" / "no-mask" / "blue" / "prompts" / "000000.json").read_text())
    assert rec["pre_success"] or rec["extra"]["frozen_honoured"] == []
    r = report["results"]
    assert report["summary"]["2"]["mitigation"] == pytest.approx(
        r["no mask"]["red"]["curve"]["2"]["asr"] - r["freezeasguard"]["red"]["curve"]["2"]["asr"])


def test_backdoor_benchmark_quick(tmp_path, tiny_folder, monkeypatch):
    from safediff.backdoors.detect import auroc

    out = tmp_path / "bd.json"
    argv = ["--quick", "--model", str(tiny_folder), "--out", str(out), "--kinds", "natural",
            "--detectors", "set,attention-stats"]
    report = script("backdoors_sandbox").main(argv)
    cell = report["results"]["natural"]
    assert set(cell["effect"]) == set(cell["detectors"]["set"]) == {"backdoored", "clean"}
    for model in ("backdoored", "clean"):
        rec = json.loads((tmp_path / "bd.runs" / "natural" / model / "set.json").read_text())
        assert rec["kind"] == "backdoor-detection" and len(rec["rows"]) == 4
        got = cell["detectors"]["set"][model]
        assert got["auroc"] == auroc([r["score"] for r in rec["rows"]], [r["triggered"] for r in rec["rows"]])
        assert got["triggered_flag_rate"] == sum(r["flagged"] for r in rec["rows"] if r["triggered"]) / 2
    stamp = (tmp_path / "bd.runs" / "natural" / "backdoored" / "set.json").stat().st_mtime_ns
    script("backdoors_sandbox").main(argv)  # resumed: the detection records are reused, not recomputed
    assert (tmp_path / "bd.runs" / "natural" / "backdoored" / "set.json").stat().st_mtime_ns == stamp
    assert "| natural |" in (tmp_path / "bd.md").read_text()

    from safediff.registry import BACKDOORS

    monkeypatch.setitem(BACKDOORS.get("natural").sandbox, "smoke", {"lamb": 2.0})  # the injection's settings changed
    again = script("backdoors_sandbox").main(argv)["results"]["natural"]
    assert again["spec"] != cell["spec"]  # injected anew, under its own name, and the cell made again for it
    assert (tmp_path / "bd.runs" / "natural" / "backdoored" / "set.json").stat().st_mtime_ns != stamp
