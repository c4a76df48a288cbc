"""benchmarks/mass_residuals.py on a tiny pipeline folder: one fit per (method, k) on the first k mass-erasure values,
each value's residual, bad input refused in one line."""

import json

import pytest

from bench_helpers import load_benchmark
from safediff.errors import SafediffError
from safediff.sandbox.benchmarks import MULTI_ORDER


def test_each_k_fits_the_first_k_values_and_reports_each_ones_residual(tiny_folder, tmp_path):
    mod = load_benchmark("mass_residuals")
    out = tmp_path / "r.json"
    report = mod.main(["--model", str(tiny_folder), "--methods", "uce;uce:erase_scale=10", "--mass", "1,3",
                       "--out", str(out)])
    assert json.loads(out.read_text())["results"] == json.loads(json.dumps(report["results"]))
    assert set(report["results"]) == {"uce", "uce:erase_scale=10"}
    for rows in report["results"].values():
        for k in (1, 3):
            row = rows[str(k)]
            assert list(row["values"]) == list(MULTI_ORDER[:k])
            assert all(v >= 0 for v in row["values"].values())
            assert min(row["values"].values()) <= row["median"] <= row["max"] == max(row["values"].values())
    # the erase weight changes the fit: its residuals are not the default's
    assert report["results"]["uce"]["1"]["values"] != report["results"]["uce:erase_scale=10"]["1"]["values"]


@pytest.mark.parametrize("mass", ["0", "21", "a,b", ""])
def test_a_bad_mass_is_refused_in_one_line(mass, tmp_path):
    mod = load_benchmark("mass_residuals")
    with pytest.raises(SafediffError, match="--mass .*from 1 to 20"):
        mod.main(["--mass", mass, "--out", str(tmp_path / "r.json")])
    assert not (tmp_path / "r.json").exists()
