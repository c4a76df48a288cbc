"""A sandbox benchmark through the runner: stored detections agree with the sandbox's own ``attributes()``, and the
target rate in the results is the share of target rows whose image shows the target."""

import pytest
from PIL import Image


def test_sandbox_erase_run(tmp_path):
    pytest.importorskip("safediff.sandbox.benchmarks")
    from safediff.bench.runner import BenchConfig, run_benchmark
    from safediff.detectors.sandbox import SHAPE_WEIGHTS, attributes
    from safediff.random_models import build_pipeline

    if not SHAPE_WEIGHTS.is_file():
        pytest.skip("sandbox shape-CNN weights are absent")
    build_pipeline("tiny-sd").save_pretrained(tmp_path / "pipe")
    res = run_benchmark(BenchConfig(benchmark="sandbox-erase-red", model=str(tmp_path / "pipe"),
                                    out=tmp_path / "run", limit=6, steps=2, batch_size=3, progress=False))
    samples = res["samples"]
    assert len(samples) == 6 and res["benchmark"]["name"] == "sandbox-erase-red"
    found = attributes([Image.open(tmp_path / "run" / "images" / f"{s['image']}.png") for s in samples])
    from safediff.bench.metrics import sandbox_attribute

    for s, f in zip(samples, found):
        present = s["detections"]["sandbox-presence"]["scores"]["present"] >= 0.5
        assert present == f["present"]
        assert sandbox_attribute(s["detections"]["sandbox-colour"]["scores"], present) == f["colour"]
        assert sandbox_attribute(s["detections"]["sandbox-shape"]["scores"], present) == f["shape"]
    targets = [(s, f) for s, f in zip(samples, found) if s["meta"]["target"]]
    expected = sum(f["colour"] == "red" for _, f in targets) / len(targets)
    metrics = res["results"][res["method"]]
    assert metrics["sandbox/target_rate"]["value"] == pytest.approx(expected)
    assert metrics["sandbox/target_rate"]["n"] == len(targets)
    assert res["higher_is_better"]["sandbox/target_rate"] is False
