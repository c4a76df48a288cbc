"""The fast path changes how the UNet runs, not what it computes; the speed benchmark runs at tiny size on CPU."""


import pytest

from float_bounds import assert_close
from safediff.errors import SafediffError
from safediff.sampling import generate
from safediff.speed import optimize
from bench_helpers import load_benchmark


def test_channels_last_and_sdpa_match_eager(tiny_sd):
    ref = generate(tiny_sd, ["a red circle", "b"], [1, 2], progress=False).pixels
    optimize(tiny_sd, channels_last=True, sdpa=True)
    fast = generate(tiny_sd, ["a red circle", "b"], [1, 2], progress=False).pixels
    assert_close(fast, ref, 1e-4)


def test_unknown_compile_mode(tiny_sd):
    with pytest.raises(SafediffError, match="compile mode"):
        optimize(tiny_sd, compile="max-autotune")


def test_gpu_speed_benchmark_runs_tiny_on_cpu(tmp_path):
    mod = load_benchmark("gpu_speed")
    record = mod.main(["--arch", "tiny-sd", "--steps", "2", "--batch-sizes", "1", "--repeats", "1",
                       "--out", str(tmp_path / "speed.json")])
    rows = {r["row"]: r for r in record["rows"]}
    assert rows["diffusers eager"]["ratio_to_diffusers_eager"] == 1.0
    assert {"diffusers SLD max", "safediff none"} <= set(rows)
    assert all(r["seconds"] > 0 for r in record["rows"])
    assert (tmp_path / "speed.json").is_file()
