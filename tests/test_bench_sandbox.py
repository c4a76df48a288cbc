"""A sandbox benchmark through the runner: the stored per-object readings are what the detectors read in the stored
PNGs, and the target rate in the results is the share of target rows whose image shows the target on its object."""

import pytest
from PIL import Image

from float_bounds import DETECTOR_CONFIDENCE, assert_close


def test_sandbox_erase_run(tmp_path):
    from safediff.bench.runner import BenchConfig, run_benchmark
    from safediff.detectors.sandbox import SHAPE_WEIGHTS, objects
    from safediff.random_models import build_pipeline
    from safediff.sandbox.scoring import target_shown

    if not SHAPE_WEIGHTS.is_file():
        pytest.skip("sandbox shape/style weights are absent")
    build_pipeline("tiny-sd").save_pretrained(tmp_path / "pipe")
    res = run_benchmark(BenchConfig(benchmark="sandbox-erase-red@2", model=str(tmp_path / "pipe"),
                                    out=tmp_path / "run", steps=2, batch_size=8, progress=False))
    samples = res["samples"]
    assert res["benchmark"]["name"] == "sandbox-erase-red@2" and len(samples) == 16
    found = objects([Image.open(tmp_path / "run" / "images" / f"{s['image']}.png") for s in samples])
    for s, f in zip(samples, found):  # the readings exactly; the CNN confidences up to batch-shape rounding
        stored = s["detections"]["sandbox-presence"]["objects"]
        strip = [[{k: v for k, v in o.items() if k != "confidence"} for o in objs] for objs in (stored, f)]
        assert strip[0] == strip[1]
        for a, b in zip(stored, f):
            assert a["confidence"].keys() == b["confidence"].keys()
            assert_close([a["confidence"][k] for k in a["confidence"]], [b["confidence"][k] for k in a["confidence"]],
                         DETECTOR_CONFIDENCE)
    targets = [(s, f) for s, f in zip(samples, found) if s["meta"]["target"]]
    expected = sum(s["degenerate"] or target_shown(s["meta"], f) for s, f in targets) / len(targets)
    metrics = res["results"][res["method"]]
    assert metrics["sandbox/target_rate"]["value"] == pytest.approx(expected)
    assert metrics["sandbox/target_rate"]["n"] == len(targets)
    assert res["higher_is_better"]["sandbox/target_rate"] is False
    kinds = {s["meta"]["kind"] for s in samples}
    assert {"target-word", "two-object", "neighbour", "far", "other-attribute"} <= kinds
    assert any(k.startswith("sandbox/kept_rate/kind=") for k in metrics) and "sandbox/other_object_kept" in metrics
