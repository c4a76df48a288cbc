"""`safediff report`: one self-contained HTML file from bench (and attack) runs, charts also as PNG."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from safediff.records import record
from safediff.bench.report import build_report
from safediff.bench.store import RunStore
from safediff.errors import SafediffError


def make_bench_run(folder, method, flags, colour, clip):
    """A finished run folder as the runner writes it (store + results built from records)."""
    from safediff.bench.benchmarks import Benchmark
    from safediff.bench.datasets import PromptRow
    from safediff.bench.results import build_results

    store = RunStore.open(folder, {"method": method})
    rows = [PromptRow(f"prompt {i}", seed=i, categories=("sexual",) if i % 2 else ("violence",), id=str(i))
            for i in range(len(flags))]
    samples = []
    for i, (flag, row) in enumerate(zip(flags, rows)):
        im = Image.fromarray(np.full((16, 16, 3), (colour[0], colour[1], i * 20), np.uint8))
        import io

        buf = io.BytesIO()
        im.save(buf, format="PNG")
        samples.append({"index": i, "row": i, "j": 0, "prompt": row.prompt, "seed": row.seed, "guidance": 7.5,
                        "id": row.id, "categories": list(row.categories), "hard": None, "meta": {},
                        "image": store.put_image(buf.getvalue()),
                        "detections": {"q16": {"scores": {"inappropriate": 0.9 if flag else 0.1}, "flagged": flag},
                                       "clip-score": {"scores": {"clip_score": clip}, "flagged": False}}})
    bench = Benchmark("i2p", "1", "test", rows, ("q16", "clip-score"), ("flag_rate", "clip_score"), None,
                      {"path": "x.csv"})
    identity = {"libraries": {"torch": "x"}, "run": {"images_per_prompt": 1, "batch_size": 2, "guidance": None},
                "worker": {"model": {"spec": method, "base_weights_sha256": "0" * 64, "edits": []},
                           "guard": {"name": "none"}, "device": "cpu", "dtype": "float32",
                           "detectors": {"q16": {"version": "1", "weights_sha256": "1" * 64},
                                         "clip-score": {"version": "1", "scale": 1.0}},
                           "generation": {"steps": 2, "height": 16, "width": 16, "default_guidance": 7.5,
                                          "scheduler": "DDIMScheduler"}}}
    store.write_results(build_results(label=method, benchmark=bench, identity=identity, samples=samples))
    return folder


def test_report_compares_methods(tmp_path):
    base = make_bench_run(tmp_path / "base", "sd", [True, True, False, True], (200, 0), 0.30)
    safe = make_bench_run(tmp_path / "safe", "sd | sld:max", [False, True, False, False], (0, 200), 0.28)
    out = build_report([base, safe], tmp_path / "rep" / "report.html", max_prompts=3)
    page = out.read_text()
    assert not re.search(r"(src|href)=['\"](?!data:)", page)  # self-contained: every image inlined
    assert "<h2>Benchmark i2p</h2>" in page and "sd | sld:max" in page
    # flag rate 0.75 vs 0.25: the lower is marked best (lower is better), clip score the higher
    assert re.search(r"q16/flag_rate ↓</td><td>0\.75<br><small>\[[^<]*</small></td><td class=best>0\.25", page)
    assert re.search(r"clip-score/mean ↑</td><td class=best>0\.3<br>", page)
    pngs = sorted(p.name for p in (tmp_path / "rep" / "report_plots").iterdir())
    assert pngs == ["i2p__q16_flag_rate.png"]
    chart = Image.open(tmp_path / "rep" / "report_plots" / pngs[0])
    assert chart.width >= 360
    assert page.count("class=prompt>") == 3  # three prompts in the grid
    assert page.count("(flagged, blurred)") == 3  # prompts 0, 1 flagged by sd, prompt 1 by sd | sld:max
    shown = build_report([base, safe], tmp_path / "rep2.html", max_prompts=3, show_flagged=True).read_text()
    assert "(flagged, blurred)" not in shown and shown.count("(flagged)") == 3
    assert "<h2>Protocols</h2>" in page and json.dumps("DDIMScheduler")[1:-1] in page


def test_report_errors(tmp_path):
    with pytest.raises(SafediffError, match="no results.json"):
        build_report([tmp_path], tmp_path / "r.html")
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(SafediffError, match="is not a safediff bench-results or attack-results record"):
        build_report([tmp_path], tmp_path / "r.html")
    with pytest.raises(SafediffError, match="at least one RUN"):
        build_report([], tmp_path / "r.html")


def test_report_attack_run(tmp_path):
    run = tmp_path / "atk"
    (run / "prompts").mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(run / "prompts" / "000000_adv.png")
    records = [{"prompt": "p0", "adversarial_prompt": "xx p0", "pre_success": False, "success": True,
                "files": {"image": "prompts/000000_adv.png"}},
               {"prompt": "p1", "adversarial_prompt": None, "pre_success": True, "success": True, "files": {}},
               {"prompt": "p2", "adversarial_prompt": "yy", "pre_success": False, "success": False, "files": {}},
               {"prompt": "p3", "adversarial_prompt": "zz", "pre_success": False, "success": False, "files": {}}]
    (run / "results.json").write_text(json.dumps(record(
        "attack-results", n=4, asr=0.5, pre_asr=0.25, records=records, compute_per_attacked_prompt={"seconds": 1.0},
        identity={"target": {"spec": "sandbox"}, "attack": {"name": "unlearndiff"},
                  "judge": {"name": "sandbox-colour"}})))
    page = build_report([run], tmp_path / "r.html").read_text()
    assert "<h2>Attacks</h2>" in page and "unlearndiff" in page
    assert re.search(r"<td>4</td><td>0\.25<br><small>\[[^<]*</small></td><td>0\.5<br><small>\[", page)
