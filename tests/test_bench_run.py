"""`safediff bench` end to end on a tiny local model: results schema, resume after SIGKILL with identical results,
refusal of a run folder with another protocol, and one-line errors (exit 2) for bad input."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench_helpers import save_tiny_clip
from cli_helpers import cli_env, one_line_error, run_main
from safediff.records import SCHEMA_VERSION

N_PROMPTS = 16
ENV = cli_env(TQDM_DISABLE="1")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from safediff.random_models import build_pipeline

    d = tmp_path_factory.mktemp("bench")
    build_pipeline("tiny-sd").save_pretrained(d / "pipe")
    save_tiny_clip(d / "clip")
    rows = [f"prompt number {i},{100 + i},{'a' if i % 3 else 'b'}" for i in range(N_PROMPTS)]
    (d / "prompts.csv").write_text("prompt,seed,category\n" + "\n".join(rows) + "\n")
    return d


def bench_args(d: Path, out: Path, *extra) -> list[str]:
    return ["bench", "--benchmark", str(d / "prompts.csv"), "--model", str(d / "pipe"), "--detector",
            f"clip-score:model={d / 'clip'}", "--out", str(out), "--steps", "2", "--batch-size", "2", *extra]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "safediff", *args], capture_output=True, text=True, env=ENV)


def image_files(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "images").iterdir())


@pytest.fixture(scope="module")
def uninterrupted(assets):
    out = assets / "run-a"
    r = run_cli(*bench_args(assets, out))
    assert r.returncode == 0, r.stderr
    return out


def test_results_schema(uninterrupted, assets):
    res = json.loads((uninterrupted / "results.json").read_text())
    assert res["kind"] == "bench-results" and res["schema_version"] == SCHEMA_VERSION
    method = res["method"]
    metric = f"clip-score:model={assets / 'clip'}/mean"
    assert set(res["results"]) == {method} and metric in res["results"][method]
    assert res["higher_is_better"][metric] is True
    assert res["n_samples"] == {"images": N_PROMPTS, "prompts": N_PROMPTS}
    s = res["samples"][3]
    assert (s["prompt"], s["seed"], s["categories"]) == ("prompt number 3", 103, ["b"])
    assert 0 <= s["detections"][f"clip-score:model={assets / 'clip'}"]["scores"]["clip_score"] <= 1
    prov = res["protocol"]
    assert len(prov["model_hash"]) == 64 and prov["steps"] == 2 and prov["scheduler"] == "DDIMScheduler"
    assert prov["size"] == [32, 32] and prov["libraries"]["torch"] and "git" in res["provenance"]
    assert len(next(iter(prov["detector_hashes"].values()))["weights_sha256"]) == 64
    assert res["configs"]["generation"]["batch_size"] == 2 and res["benchmark"]["n_rows"] == N_PROMPTS
    assert image_files(uninterrupted) == sorted(f"{s['image']}.png" for s in res["samples"])


def test_sigkill_and_resume_gives_identical_results(uninterrupted, assets):
    """SIGKILL the CLI after some but not all batches, restart it with the same command: the final results and
    images equal those of an uninterrupted run; no partial, lost or duplicated file."""
    out = assets / "run-b"
    proc = subprocess.Popen([sys.executable, "-m", "safediff", *bench_args(assets, out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV)
    while proc.poll() is None:
        if (out / "batches").is_dir() and len(list((out / "batches").glob("*.json"))) >= 2:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait()
    done = len(list((out / "batches").glob("*.json")))
    assert proc.returncode == -signal.SIGKILL and 2 <= done < N_PROMPTS // 2, (proc.returncode, done)
    assert not (out / "results.json").exists()
    r = run_cli(*bench_args(assets, out))
    assert r.returncode == 0, r.stderr
    a = json.loads((uninterrupted / "results.json").read_text())
    b = json.loads((out / "results.json").read_text())
    for res in (a, b):  # when and by which commit the results were written
        res.pop("provenance")
    assert b == a
    assert image_files(out) == image_files(uninterrupted)
    assert not list(out.rglob(".*.tmp"))
    for name in image_files(out):
        assert hashlib.sha256((out / "images" / name).read_bytes()).hexdigest() + ".png" == name


def test_rerun_is_a_no_op_and_other_protocol_is_refused(uninterrupted, assets, monkeypatch, capsys):
    before = (uninterrupted / "results.json").read_bytes()
    stamp = {p: p.stat().st_mtime_ns for p in (uninterrupted / "images").iterdir()}
    code, err = run_main(monkeypatch, capsys, *bench_args(assets, uninterrupted))
    assert code == 0, err
    after = json.loads((uninterrupted / "results.json").read_text())
    expected = json.loads(before)
    for res in (after, expected):
        res.pop("provenance")
    assert after == expected
    assert {p: p.stat().st_mtime_ns for p in (uninterrupted / "images").iterdir()} == stamp
    one_line_error(*run_main(monkeypatch, capsys, *bench_args(assets, uninterrupted, "--guidance", "3")),
                   "was made with a different protocol (differs in: run.guidance)")
    one_line_error(*run_main(monkeypatch, capsys, *bench_args(assets, uninterrupted, "--limit", "3")),
                   "benchmark.n_rows")


@pytest.mark.parametrize("change, words", [
    ({"--benchmark": "i2p-sexaul"}, "unknown benchmark 'i2p-sexaul' (did you mean 'i2p-sexual'?)"),
    ({"--detector": "q61"}, "unknown detector 'q61'"),
    ({"--benchmark": "BAD_CSV"}, "line 3: seed 'x' is not a number"),
    ({"--benchmark": "NO_PROMPT"}, "has no 'prompt' column"),
    ({"--detector": "nudenet"}, "pip install safediff[nudenet]"),
    ({"--backend": "spark"}, "unknown backend 'spark'"),
    ({"--steps": "0"}, "steps must be an integer in 1..1000"),
])
def test_bad_input_one_line_exit_2(assets, tmp_path, monkeypatch, capsys, change, words):
    (tmp_path / "bad.csv").write_text("prompt,seed\nok,1\nbroken,x\n")
    (tmp_path / "noprompt.csv").write_text("text\nhello\n")
    monkeypatch.setitem(sys.modules, "nudenet", None)  # the optional extra is not installed
    args = bench_args(assets, tmp_path / "out")
    for key, value in change.items():
        value = {"BAD_CSV": str(tmp_path / "bad.csv"), "NO_PROMPT": str(tmp_path / "noprompt.csv")}.get(value, value)
        if key in args:
            args[args.index(key) + 1] = value
        else:
            args += [key, value]
    one_line_error(*run_main(monkeypatch, capsys, *args), words)
    assert not (tmp_path / "out" / "results.json").exists()


def test_skip_bad_rows(assets, tmp_path, monkeypatch, capsys):
    csv = tmp_path / "bad.csv"
    csv.write_text("prompt,seed\nok,1\nbroken,x\nfine,3\n")
    args = bench_args(assets, tmp_path / "out", "--skip-bad-rows")
    args[args.index("--benchmark") + 1] = str(csv)
    code, err = run_main(monkeypatch, capsys, *args)
    assert code == 0, err
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [s["prompt"] for s in res["samples"]] == ["ok", "fine"]
    assert res["benchmark"]["source"]["skipped_lines"] == [3]
