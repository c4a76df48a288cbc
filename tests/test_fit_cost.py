"""The fit-cost benchmark: each eraser fitted in a process of its own, its seconds and peak memory recorded, a rerun
reuses what is finished, bad input is one line."""

import pytest

from bench_helpers import load_benchmark


def test_fit_in_own_process_then_reused(tiny_folder, tmp_path, monkeypatch):
    mod = load_benchmark("fit_cost")
    out = tmp_path / "fit_cost.json"
    argv = ["--model", str(tiny_folder), "--erasers", "uce", "--purpose", "smoke", "--concept", "red",
            "--out", str(out)]
    fit = mod.main(argv)["fits"]["uce"]
    assert fit["fit_seconds"] > 0 and fit["edit_values"] > 0
    assert fit["peak_rss_mib"] >= fit["rss_after_load_mib"] > 0
    assert fit["fit_added_rss_mib"] == pytest.approx(fit["peak_rss_mib"] - fit["rss_after_load_mib"], abs=0.2)
    assert "cuda_peak_mib" not in fit

    def refuse(*args, **kwargs):
        raise AssertionError("a finished fit was run again")

    monkeypatch.setattr(mod, "fit_in_child", refuse)
    assert mod.main(argv)["fits"]["uce"] == fit


def test_bad_input_is_one_line(tmp_path):
    from safediff.errors import SafediffError

    mod = load_benchmark("fit_cost")
    with pytest.raises(SafediffError, match="--threads must be >= 1"):
        mod.main(["--threads", "0", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SafediffError, match="nope"):
        mod.main(["--erasers", "uce,nope", "--out", str(tmp_path / "x.json")])
