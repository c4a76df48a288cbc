"""No bad number ever becomes a result: one test per class of failure (docs/reliability.md lists the guarantees).

1. non-finite values are refused where they are parsed, in weights, in samples and in JSON; degenerate images never
   count in a method's favour;
2. sizes that would exhaust the machine are refused before any work, naming the limit;
3. every column of a prompt file stays with its row (one CSV reader);
4. no metric is silently empty: sandbox detectors give per-detector rates, or the combination is refused;
5. no work is lost: edits are created exclusively and carry a verified digest, a report replaces only a report;
6. bad input is one line, never a traceback, and an aborted run does not block the corrected one;
7. leftovers of killed writes are cleaned, outputs follow the umask, seeds follow one rule, single-file checkpoints
   and optional-backend chatter get one clear line.
"""

import json
import math
import os
import stat

import pytest
import torch
from cli_helpers import one_line_error, run_main

from safediff.attacks.budget import Budget
from safediff.concepts import resolve
from safediff.detectors.base import degenerate
from safediff.edits import Edit
from safediff.erasers import build_eraser
from safediff.erasers.base import fit_to_file
from safediff.errors import SafediffError
from safediff.guards import build_guard
from safediff.sampling import generate
from safediff.storage import staged_folder, write_json_atomic


# -- 1. non-finite values ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [
    lambda: build_eraser("uce:erase_scale=nan"), lambda: build_eraser("uce:lamb=inf"),
    lambda: build_eraser("esd-x:lr=inf"), lambda: build_guard("sld:max,safety_scale=nan", "red"),
    lambda: Budget.parse("seconds=nan"),
])
def test_non_finite_hyperparameters_are_refused(build):
    with pytest.raises(SafediffError, match="finite|> 0"):
        build()


@pytest.mark.parametrize("guidance", [math.inf, math.nan, -1.0, 1e9])
def test_non_finite_or_huge_guidance_is_refused(tiny_sd, guidance):
    with pytest.raises(SafediffError, match="guidance"):
        generate(tiny_sd, ["a"], [0], guidance=guidance, progress=False)


def test_non_finite_weights_are_never_saved_applied_or_sampled(tiny_sd, tmp_path):
    name = next(iter(dict(tiny_sd.denoiser.named_parameters())))
    bad = torch.full_like(dict(tiny_sd.denoiser.named_parameters())[name], float("nan"))
    with pytest.raises(SafediffError, match="non-finite"):
        Edit({f"unet.{name}": bad}, {"base_weights_sha256": tiny_sd.base_sha256})
    good = build_eraser("uce").fit(tiny_sd, resolve("red"), progress=False)
    path = good.save(tmp_path / "e.safetensors")
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    tensors = load_file(str(path))
    first = sorted(tensors)[0]
    tensors[first][0, 0] = float("nan")
    save_file(tensors, str(tmp_path / "nan.safetensors"), metadata=header)
    with pytest.raises(SafediffError, match="non-finite"):
        Edit.load(tmp_path / "nan.safetensors")
    with torch.no_grad():  # a model damaged in memory: the sampler refuses to return NaN images
        dict(tiny_sd.denoiser.named_parameters())[name].fill_(float("nan"))
    with pytest.raises(SafediffError, match="non-finite"):
        generate(tiny_sd, ["a"], [0], progress=False)


def test_json_is_strict(tmp_path):
    with pytest.raises(ValueError):
        write_json_atomic(tmp_path / "x.json", {"rate": float("nan")})
    assert not list(tmp_path.iterdir())


def test_degenerate_images_never_count_in_the_methods_favour():
    from safediff.bench.results import summarise

    black, white = torch.zeros(1, 3, 8, 8), torch.ones(1, 3, 8, 8)
    drawn = torch.ones(1, 3, 8, 8)
    drawn[0, 0, 2:5, 2:5] = 0.2
    assert degenerate(torch.cat([black, white, drawn])).tolist() == [True, True, False]

    def sample(row, target, found, blank):
        obj = {"colour": "red" if target else "blue", "shape": "circle", "style": None, "position": "any",
               "target": bool(target), "said": {}}
        seen = [{"colour": found, "shape": "circle", "style": "solid", "side": "left", "area": 100}]
        return {"row": row, "categories": ["colour"], "degenerate": blank,
                "meta": {"target": target, "axis": "colour", "kind": "target-word" if target else "far",
                         "objects": [obj]},
                "detections": {"sandbox-presence": {"scores": {"present": 1.0}, "flagged": True, "objects": seen},
                               "sandbox-mark": {"scores": {"mark": 0.0}, "flagged": False}}}

    samples = [sample(0, "red", "blue", True), sample(1, "red", "blue", False),
               sample(2, None, "blue", True), sample(3, None, "blue", False)]
    values, _ = summarise(samples, ("sandbox",), {})
    assert values["sandbox/target_rate"]["value"] == 0.5  # the black target image counts as not erased
    assert values["sandbox/kept_rate/kind=far"]["value"] == 0.5  # and the black non-target image as not kept
    assert values["degenerate_rate"]["value"] == 0.5


# -- 2. resource bounds -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, words", [
    (["--n", "99999999999999999999"], "n must be"),
    (["--height", "80000"], "up to 4096"),
    (["--steps", "1001"], "steps must be"),
    (["--batch-size", "0"], "batch-size"),
])
def test_generate_bounds_are_checked_before_any_work(monkeypatch, capsys, tmp_path, args, words):
    out = tmp_path / "out"
    one_line_error(*run_main(monkeypatch, capsys, "generate", "--model", "no/such-model", "--prompt", "a",
                             "--out", str(out), *args), words)
    assert not out.exists()


def test_sized_benchmarks_and_runs_are_bounded():
    from safediff.bench.benchmarks import load_benchmark

    with pytest.raises(SafediffError, match="1..10000 rows per kind"):
        load_benchmark("sandbox-erase-red@99999999999")


# -- 3. rows stay aligned -----------------------------------------------------------------------------------------
def test_every_column_stays_with_its_row(tmp_path):
    from safediff.attacks.runner import read_attack_prompts
    from safediff.bench.datasets import read_prompts_csv

    csv = tmp_path / "p.csv"
    csv.write_text("\ufeffprompt,seed,image\na red circle,1,red.png\n   \na blue square,2,blue.png\n\n"
                   "a green triangle,3,green.png\n", encoding="utf-8")
    rows = read_attack_prompts(csv, ("prompt", "image"))
    assert [(r["prompt"], r["seed"], r["image"]) for r in rows] == [
        ("a red circle", 1, "red.png"), ("a blue square", 2, "blue.png"), ("a green triangle", 3, "green.png")]
    assert [r["prompt"] for r in read_prompts_csv(csv)] == [r["prompt"] for r in rows]
    twice = tmp_path / "twice.csv"
    twice.write_text("prompt,seed,seed\na,1,2\n")
    with pytest.raises(SafediffError, match="twice"):
        read_prompts_csv(twice)


# -- 4. no silent empty metric ------------------------------------------------------------------------------------
def test_sandbox_detectors_give_rates_or_are_refused(tmp_path):
    from safediff.bench.results import summarise
    from safediff.bench.runner import BenchConfig, run_benchmark

    with pytest.raises(SafediffError, match="reads the sandbox detectors together"):
        run_benchmark(BenchConfig(benchmark="sandbox-erase-red@1", model="sandbox", out=tmp_path / "r",
                                  detectors=["sandbox-presence"], progress=False))
    assert not (tmp_path / "r").exists()
    samples = [{"row": i, "categories": [], "meta": {},
                "detections": {"sandbox-colour": {"scores": {"red": 0.9}, "flagged": i == 0}}} for i in range(2)]
    values, _ = summarise(samples, ("flag_rate",), {})
    assert values["sandbox-colour/flag_rate"]["value"] == 0.5  # a prompt file with a sandbox detector: its rate


# -- 5. nothing is lost -------------------------------------------------------------------------------------------
def test_edits_are_created_exclusively_and_verified(tiny_sd, tmp_path):
    out = tmp_path / "e.safetensors"
    edit = fit_to_file(build_eraser("uce"), tiny_sd, resolve("red"), out, progress=False)
    with pytest.raises(SafediffError, match="exists"):
        fit_to_file(build_eraser("uce"), tiny_sd, resolve("blue"), out, progress=False)
    with pytest.raises(FileExistsError):
        edit.save(out, exclusive=True)  # what a second run that fitted at the same time meets
    data = bytearray(out.read_bytes())
    data[-3] ^= 0x01  # one flipped bit in the last tensor
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(bytes(data))
    with pytest.raises(SafediffError, match="damaged"):
        Edit.load(damaged)


def test_report_replaces_only_a_report(monkeypatch, capsys, tmp_path):
    from safediff.bench.report import build_report

    precious = tmp_path / "results.json"
    precious.write_text('{"precious": true}')
    run = tmp_path / "atk"
    run.mkdir()
    from safediff.records import record

    (run / "results.json").write_text(json.dumps(record(
        "attack-results", n=0, asr=0.0, pre_asr=0.0, records=[], identity={"target": {}, "attack": {}, "judge": {}})))
    with pytest.raises(SafediffError, match="not an earlier safediff report"):
        build_report([run], precious)
    assert precious.read_text() == '{"precious": true}'
    page = build_report([run], tmp_path / "r.html")
    build_report([run], page)  # an earlier report is replaced


# -- 6. one line, never a traceback -------------------------------------------------------------------------------
@pytest.mark.parametrize("args, words", [
    (["generate", "--prompt", "a", "--seed", str(2**64)], "--seed must be in"),
    (["generate", "--prompt", "a", "--seed", "-1"], "--seed must be in"),
    (["generate", "--prompt", "a\udcff"], "--prompt is not valid UTF-8"),
    (["generate", "--prompt", "a", "--concept", "r\udcffed", "--guard", "sld"], "--concept is not valid UTF-8"),
    (["generate", "--prompt", "a", "--scheduler", "pndm", "--steps", "1", "--model", "sandbox"], "at least 4 steps"),
    (["generate", "--prompt", "a", "--device", "cuda:0"], "cuda:0"),
    (["generate", "--prompt", "a", "--model", "weights.ckpt"], "single-file checkpoints are not supported"),
    (["attack", "--target", "sandbox", "--method", "p4d-n:eval_every=0", "--concept", "red", "--prompts", "P",
      "--judge", "sandbox-colour"], "eval_every must be in [1, inf]"),
    (["attack", "--target", "sandbox", "--method", "unlearndiff:noise_batch=0", "--concept", "red", "--prompts",
      "P", "--judge", "sandbox-colour"], "noise_batch must be in [1, inf]"),
    (["report", "DAMAGED"], "not valid JSON"),
])
def test_bad_input_is_one_line(monkeypatch, capsys, tmp_path, args, words):
    if torch.cuda.is_available() and "cuda:0" in args:
        pytest.skip("this machine has a GPU")
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "results.json").write_text('{"kind": "bench-res')
    (tmp_path / "p.csv").write_text("prompt\na red circle\n")
    args = [{"DAMAGED": str(tmp_path / "damaged"), "P": str(tmp_path / "p.csv")}.get(a, a) for a in args]
    if args[0] in ("generate", "attack"):
        args += ["--out", str(tmp_path / "out")]
    one_line_error(*run_main(monkeypatch, capsys, *args), words)
    assert not (tmp_path / "out").exists()


def test_a_scheduler_whose_dependency_is_missing_is_refused_before_loading(tiny_sd, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scipy" else real(name, *a))
    with pytest.raises(SafediffError, match="lms scheduler needs scipy"):
        generate(tiny_sd, ["a"], [0], scheduler="lms", progress=False)


def test_unwritable_edit_output_fails_before_the_fit(tiny_sd, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SafediffError, match="cannot be written"):
        fit_to_file(build_eraser("esd-x:iterations=1000"), tiny_sd, resolve("red"), blocker / "e.safetensors",
                    progress=False)


def test_a_run_that_finished_nothing_takes_the_corrected_protocol(tmp_path):
    from safediff.records import record
    from safediff.storage import open_run_folder

    out = tmp_path / "run"
    open_run_folder(out, "protocol.json", {"steps": 1001}, record("bench-run", identity={"steps": 1001}), "run",
                    units=("batches/*.json",))
    assert not open_run_folder(out, "protocol.json", {"steps": 10}, record("bench-run", identity={"steps": 10}),
                               "run", units=("batches/*.json",))
    assert json.loads((out / "protocol.json").read_text())["identity"] == {"steps": 10}
    (out / "batches").mkdir()
    (out / "batches" / "000000.json").write_text("{}")
    with pytest.raises(SafediffError, match="different protocol"):
        open_run_folder(out, "protocol.json", {"steps": 20}, record("bench-run", identity={"steps": 20}), "run",
                        units=("batches/*.json",))


def test_tampered_run_records_are_redone(tmp_path):
    from safediff.bench.store import RunStore
    from safediff.attacks.runner import finished

    store = RunStore.open(tmp_path / "run", {"x": 1})
    store.put_batch(0, [{"no image key": True}])
    assert store.batch(0) is None
    (tmp_path / "p.json").write_text('{"kind": "attack-prompt", "schema_')
    assert finished(tmp_path / "p.json", {"prompt": "a"}, 0) is None


# -- 7. smaller -----------------------------------------------------------------------------------------------------
def test_leftovers_of_dead_writers_are_removed_and_outputs_follow_the_umask(tiny_sd, tmp_path):
    dead = 2**22 + 12345  # above the default pid_max: no such process
    stale = tmp_path / f".e.safetensors.{dead}.abcd.tmp"
    stale.write_text("half an edit")
    fit_to_file(build_eraser("uce"), tiny_sd, resolve("red"), tmp_path / "e.safetensors", progress=False)
    assert not stale.exists()
    old = os.umask(0o022)
    try:
        with staged_folder(tmp_path / "folder") as tmp:
            (tmp / "x").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o755


def test_optional_backend_chatter_is_filtered():
    import logging

    from safediff.cli import _QuietOptionalBackends

    quiet = _QuietOptionalBackends()
    chatter = logging.LogRecord("transformers", logging.WARNING, "", 0,
                                "`CLIPImageProcessor` requires torchvision (not installed)", None, None)
    useful = logging.LogRecord("transformers", logging.WARNING, "", 0, "something else", None, None)
    assert not quiet.filter(chatter) and quiet.filter(useful)
