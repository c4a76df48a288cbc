"""benchmarks/side_by_side.py: one row per (method, target), UNet / FLUX in each cell, n/a where a method did not run
on an architecture, and a note when the two runs used different sets."""

import json
from pathlib import Path
from bench_helpers import load_benchmark


def script():
    return load_benchmark("side_by_side")


def entry(method: str, target: str, rate: float, neighbours: float, fit: float) -> dict:
    return {"method": method, "target": target, "fit_seconds": fit,
            "metrics": {"sandbox/target_rate": {"value": rate},
                        "sandbox/kept_rate/kind=neighbour": {"value": neighbours}}}


def write(folder: Path, model: str, results: dict, n: int = 16) -> Path:
    folder.mkdir()
    plan = {"model": model, "model_sha256": model * 4, "n_per_kind": n, "steps": None, "purpose": "benchmark",
            "batch_size": 32}
    (folder / "results.json").write_text(json.dumps({"plan": plan, "results": results}))
    return folder


def test_cells_pair_the_architectures_and_missing_methods_are_na(tmp_path, capsys):
    unet = write(tmp_path / "u", "sandbox", {"uce-red": entry("uce", "red", 0.04, 0.94, 1.0),
                                              "mace-red": entry("mace", "red", 0.05, 0.38, 4.6)})
    flux = write(tmp_path / "f", "sandbox-flux", {"uce-red": entry("uce", "red", 0.5, 0.9, 0.8),
                                                  "erase-anything-red": entry("erase-anything", "red", 0.2, 0.8, 90)})
    text = script().main([str(unet), str(flux)])
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()[2:] if line.startswith("|")}
    assert set(rows) == {"uce", "mace", "erase-anything"}
    assert "| 4% / 50% |" in rows["uce"] and "| 94% / 90% |" in rows["uce"] and rows["uce"].endswith("| 1.0 / 0.8 |")
    assert "5% / n/a" in rows["mace"] and "n/a / 20%" in rows["erase-anything"]
    assert "differ" not in text


def test_runs_with_different_sets_are_flagged(tmp_path):
    unet = write(tmp_path / "u", "sandbox", {"uce-red": entry("uce", "red", 0.04, 0.94, 1.0)})
    flux = write(tmp_path / "f", "sandbox-flux", {"uce-red": entry("uce", "red", 0.5, 0.9, 0.8)}, n=4)
    assert "differ in their sets" in script().main([str(unet), str(flux)])


def test_targets_keep_only_the_named_targets(tmp_path):
    unet = write(tmp_path / "u", "sandbox", {"uce-red": entry("uce", "red", 0.04, 0.94, 1.0),
                                              "uce-triangle": entry("uce", "triangle", 0.12, 1.0, 1.1)})
    flux = write(tmp_path / "f", "sandbox-flux", {"uce-red": entry("uce", "red", 0.5, 0.9, 0.8)})
    rows = [line for line in script().main([str(unet), str(flux), "--targets", "triangle"]).splitlines()[2:]
            if line.startswith("|")]
    assert len(rows) == 1 and "| triangle |" in rows[0] and rows[0].startswith("| uce |")


def test_attack_table_pairs_asr_and_names_the_worst_attack(tmp_path):
    def run(asr: dict) -> dict:
        return {"prompts": [{"prompt": "a red heart", "seed": 1}], "budgets": "sandbox",
                "results": {a: {t: {"pre_asr": 0.0, "asr": v} for t, v in by_target.items()}
                            for a, by_target in asr.items()}}

    unet = run({"ring-a-bell": {"uce": 0.25, "sld": 0.0}, "concept-inversion": {"uce": 0.75, "sld": 0.5}})
    flux = run({"ring-a-bell": {"uce": 0.0}, "concept-inversion": {"uce": 1.0}})
    rows = {line.split(" | ")[0].strip("| "): line for line in script().attack_table(unet, flux).splitlines()[2:]}
    assert rows["uce"].endswith("| 0.75 (concept-inversion) / 1.00 (concept-inversion) |")
    assert "| 0.75 / 1.00 |" in rows["uce"] and "| 0.25 / 0.00 |" in rows["uce"]
    assert rows["sld"].endswith("| 0.50 (concept-inversion) / n/a |") and "| 0.00 / n/a |" in rows["sld"]


def test_compact_has_one_row_per_method_with_each_targets_rate_and_neighbours(tmp_path):
    unet = write(tmp_path / "u", "sandbox", {"uce-red": entry("uce", "red", 0.04, 0.94, 1.0),
                                              "uce-triangle": entry("uce", "triangle", 0.12, 1.0, 1.1),
                                              "base-red": entry("base", "red", 0.91, 0.94, 0.0)})
    flux = write(tmp_path / "f", "sandbox-flux", {"uce-red": entry("uce", "red", 0.5, 0.9, 0.8)})
    text = script().main([str(unet), str(flux), "--targets", "red,triangle", "--compact"])
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert lines[0] == ("| method | red: target rate | red: neighbours kept | triangle: target rate | "
                        "triangle: neighbours kept | fit s |")
    assert lines[2].startswith("| base |")  # base first
    assert lines[3] == "| uce | 4% / 50% | 94% / 90% | 12% / n/a | 100% / n/a | 2 / 1 |"


def test_plot_draws_a_panel_per_target_and_architecture(tmp_path):
    from PIL import Image

    unet = write(tmp_path / "u", "sandbox", {"uce-red": entry("uce", "red", 0.04, 0.94, 1.0),
                                              "uce-triangle": entry("uce", "triangle", 0.12, 1.0, 1.1)})
    flux = write(tmp_path / "f", "sandbox-flux", {"uce-red": entry("uce", "red", 0.5, 0.9, 0.8)})
    one = tmp_path / "one.png"
    script().main([str(unet), str(flux), "--targets", "red", "--plot", str(one)])
    two = tmp_path / "two.png"
    script().main([str(unet), str(flux), "--targets", "red,triangle", "--plot", str(two)])
    a, b = Image.open(one), Image.open(two)
    assert a.width == b.width and b.height == 2 * a.height  # two panels a row, one row per target
    assert Image.open(one).convert("L").getextrema()[0] < 128  # something drawn


def test_pareto_chart_marks_must_match_the_points():
    import pytest

    from safediff.bench.plots import pareto_chart

    with pytest.raises(ValueError, match="2 marks for 1 points"):
        pareto_chart("t", [("a", 0.1, 0.9)], "x", "y", marks=[1, 2])
    assert pareto_chart("t", [("a", 0.1, 0.9)], "x", "y", marks=[7])[:4] == b"\x89PNG"


def test_compact_with_attacks_gives_each_method_its_worst_case_read_from_the_target_spec(tmp_path):
    def report(model: str, cells: dict) -> dict:
        return {"model": model, "concept": "red", "prompts": [], "budgets": "sandbox",
                "results": {a: {t: {"pre_asr": 0.0, "asr": v, "target": spec} for t, (spec, v) in by_t.items()}
                            for a, by_t in cells.items()}}

    unet = write(tmp_path / "u", "sandbox", {"base-red": entry("base", "red", 0.91, 0.94, 0.0),
                                              "esd-x-red": entry("esd-x", "red", 0.08, 0.81, 42),
                                              "casg-sld-red": entry("casg-sld", "red", 0.01, 0.0, 0),
                                              "mace-red": entry("mace", "red", 0.05, 0.38, 5),
                                              "rece-red": {**entry("rece", "red", 0.08, 0.81, 70),
                                                           "edit_sha256": "e1"}})
    json_u = json.loads((unet / "results.json").read_text())
    json_u["results"]["esd-x-red"]["edit_sha256"] = "e1"
    (unet / "results.json").write_text(json.dumps(json_u))
    flux = write(tmp_path / "f", "sandbox-flux", {"base-red": entry("base", "red", 0.9, 0.81, 0.0),
                                                  "esd-x-red": entry("esd-x", "red", 0.89, 0.38, 24),
                                                  "casg-sld-red": entry("casg-sld", "red", 0.04, 0.0, 0),
                                                  "mace-x-red": entry("mace-x", "red", 0.5, 0.5, 1),  # not mace
                                                  "rece-red": {**entry("rece", "red", 0.1, 0.7, 9),
                                                               "edit_sha256": "f"}})
    edit = "benchmarks/results/a.edits/esd-x-red.safetensors"
    attacks_u = report("sandbox", {"relearn": {"plain": ("sandbox", 1.0), "esd": (f"sandbox+{edit}", 1.0),
                                               "casg": ("sandbox:casg-sld:max", 0.0)},
                                   "concept-arithmetic": {"esd": (f"sandbox+{edit}", 0.25),
                                                          "casg": ("sandbox:casg-sld:max", 0.75)}})
    attacks_f = report("sandbox-flux", {"relearn": {"esd": (f"sandbox-flux+{edit}", 0.5)}})
    mod = script()
    assert mod.worst_cases(attacks_u) == {"base": (1.0, ["relearn"]), "esd-x": (1.0, ["relearn"]),
                                          "casg-sld": (0.75, ["concept-arithmetic"])}
    paths = []
    for name, r in (("u.json", attacks_u), ("f.json", attacks_f)):
        paths.append(tmp_path / name)
        paths[-1].write_text(json.dumps(r))
    text = mod.main([str(unet), str(flux), "--targets", "red", "--compact", "--attacks", *map(str, paths)])
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in text.splitlines() if line.startswith("|")}
    assert rows["method"][3] == "red: worst-case ASR"
    assert rows["esd-x"][3] == "1.00 / 0.50" and rows["casg-sld"][3] == "0.75 / –" and rows["base"][3] == "1.00 / –"
    assert rows["mace"][3] == "– / n/a"  # not attacked on the UNet; not run on FLUX
    assert rows["rece"][3] == "1.00 (= esd-x) / –"  # not attacked, but its UNet edit is esd-x's byte for byte
    assert "| 0.75 (concept-arithmetic) / n/a |" in text  # the attack table's worst case, from the same helper
