"""`--backend ray` (optional extra): a local Ray with 2 CPUs gives byte-identical results to the local backend."""

import json

import pytest

from bench_helpers import save_tiny_clip


def test_ray_matches_local(tmp_path):
    pytest.importorskip("ray")
    from safediff.bench.runner import BenchConfig, run_benchmark
    from safediff.random_models import build_pipeline

    build_pipeline("tiny-sd").save_pretrained(tmp_path / "pipe")
    save_tiny_clip(tmp_path / "clip")
    (tmp_path / "p.csv").write_text("prompt,seed\n" + "\n".join(f"thing {i},{i}" for i in range(4)) + "\n")

    def config(out, backend):
        return BenchConfig(benchmark=str(tmp_path / "p.csv"), model=str(tmp_path / "pipe"), out=tmp_path / out,
                           detectors=[f"clip-score:model={tmp_path / 'clip'}"], steps=2, batch_size=2,
                           backend=backend, workers=2, progress=False)

    local = run_benchmark(config("local", "local"))
    ray = run_benchmark(config("ray", "ray"))
    for res in (local, ray):
        res.pop("provenance")
    assert json.dumps(ray, sort_keys=True) == json.dumps(local, sort_keys=True)
    assert sorted(p.read_bytes() for p in (tmp_path / "ray" / "images").iterdir()) == \
        sorted(p.read_bytes() for p in (tmp_path / "local" / "images").iterdir())


def test_ray_missing_extra(monkeypatch, tmp_path):
    import sys

    from safediff.bench.ray_backend import RayBackend
    from safediff.errors import SafediffError

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(SafediffError, match=r"pip install safediff\[ray\]"):
        RayBackend({}, 2)
