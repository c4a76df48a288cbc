"""`safediff demo --quick` end to end on the sandbox, its stages in two worker processes: the report names every
registered guard and eraser, every method gets a target rate (the one in its run's results), the CLI prints the table
and the report path, a rerun in one process reuses every run, and a folder with another plan is refused."""

import html
import json
import re

from cli_helpers import run_cli
import pytest

from safediff.sandbox import WEIGHTS_DIR

needs_sandbox = pytest.mark.skipif(not (WEIGHTS_DIR / "SHA256SUMS").is_file(), reason="sandbox weights absent")


def test_interleaved_sets_keep_their_rows_and_lead_with_every_kind():
    from safediff.sandbox.benchmarks import interleaved
    from safediff.sandbox.benchmarks import erasure_set, multi_category_set

    for rows in (erasure_set("red", n_per_kind=3), multi_category_set(n_per_kind=2, n_benign=8)):
        out = interleaved(rows)
        assert sorted(map(repr, out)) == sorted(map(repr, rows))
        groups = {(r["target"], r["kind"]) for r in rows}
        assert {(r["target"], r["kind"]) for r in out[:len(groups)]} == groups


@needs_sandbox
def test_quick_demo_reports_every_guard_and_eraser(tmp_path):
    from safediff.registry import ERASERS, GUARDS

    out = tmp_path / "demo"
    r = run_cli("demo", "--out", str(out), "--quick", "--workers", "2", "--threads", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    report = out / "report.html"
    assert report.is_file() and f"report: {report.resolve()}" in r.stdout
    page = html.unescape(report.read_text())

    summary = json.loads((out / "summary.json").read_text())
    labels = [row["method"] for row in summary["methods"]]
    guards = {m.group(1) for m in (re.fullmatch(r"guard ([^:\s]+)(:\S+)?", x) for x in labels) if m}
    assert guards == set(GUARDS.names()) - {"none"}  # "none" is the base model
    erasers = set()
    for m in (re.fullmatch(r"eraser (\S+)(?: \(= (.+)\))?", x) for x in labels):
        if m:
            erasers |= {m.group(1), *(m.group(2).split(", ") if m.group(2) else [])}
    # aliases (esd = esd-u) run once, under one label; erasers that refuse the sandbox's SD-1 UNet are left out
    on_sandbox = {n for n in ERASERS.names() if not ERASERS.get(n).archs or "sd1" in ERASERS.get(n).archs}
    assert erasers == on_sandbox and "erase-anything" not in erasers
    for label in labels:
        assert label in page and label in r.stdout
    assert "Attacks" in page and "ring-a-bell" in page
    # sandbox images are shown unblurred and captioned with what the detectors read
    from safediff.sandbox.values import COLOURS, SHAPES, STYLES

    seen = rf"({'|'.join(COLOURS)}) ({'|'.join(STYLES)}) ({'|'.join(SHAPES)})"
    assert "blurred" not in page and re.search(rf"<small>(no object|{seen}( \| {seen})*)( \+ mark)?</small>", page)

    for row in summary["methods"]:
        assert row["target_rate"] is not None and 0.0 <= row["target_rate"] <= 1.0, row
        run = json.loads((out / row["run"] / "results.json").read_text())
        assert run["results"][row["method"]]["sandbox/target_rate"]["value"] == row["target_rate"]
        assert run["n_samples"]["images"] == row["images"] > 0
    assert 0.0 <= summary["attack"]["asr"] <= 1.0
    assert summary["workers"] == 2 and summary["threads_per_worker"] == 1

    def made():  # what a stage computes: edits, batches of images, attacked prompts (results are re-derived)
        return {p: p.stat().st_mtime_ns for pattern in ("edits/*", "runs/*/*/batches/*", "runs/attack/*/prompts/*")
                for p in out.glob(pattern)}

    stamps = made()
    r = run_cli("demo", "--out", str(out), "--quick", "--workers", "1", "--threads", "1")  # continued: nothing redone
    assert r.returncode == 0, r.stderr[-3000:]
    assert made() == stamps and len({p.parent.parent for p in stamps}) == len(summary["methods"]) + 2  # + edits/
    assert json.loads((out / "summary.json").read_text())["methods"] == summary["methods"]

    r = run_cli("demo", "--out", str(out))  # the full plan differs from the quick one: refused, nothing touched
    assert r.returncode == 2 and "different protocol" in r.stderr and "Traceback" not in r.stderr



def test_the_flux_sandbox_demo_plans_the_erasers_of_its_architecture_and_bad_models_are_refused(tmp_path):
    from safediff.demo import FULL, plan, plan_record, registered_erasers
    from safediff.registry import ERASERS

    on_flux = set(registered_erasers("sandbox-flux"))
    assert "erase-anything" in on_flux and not {"mace", "forget-me-not", "safegen", "des"} & on_flux
    assert on_flux == {n for n in ERASERS.primary_names() if not ERASERS.get(n).archs or "flux" in ERASERS.get(n).archs}
    stages = plan(FULL, "sandbox-flux")
    assert {s.eraser for s in stages if s.eraser} == on_flux
    assert plan_record(FULL, stages, "sandbox-flux")["model"] == "sandbox-flux"  # a folder keeps one model
    r = run_cli("demo", "--out", str(tmp_path / "d"), "--model", "tiny-sd")
    assert r.returncode == 2 and "accepted: sandbox, sandbox-flux" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "d").exists()


def test_guards_run_on_the_flux_sandbox_with_their_transformer_options():
    from safediff.demo import FULL, plan

    guards = {s.guard for s in plan(FULL, "sandbox-flux") if s.guard}
    assert {"adavd:space=readers", "safree:lra=0", "casg-safree:lra=0", "sld:max"} <= guards
    assert {s.guard for s in plan(FULL) if s.guard} >= {"adavd", "safree", "sld:max"}


def test_jobs_run_erasers_first_and_wait_for_the_edits_they_use(tmp_path):
    from safediff.demo import ATTACKED_ERASER, FULL, jobs, plan
    from safediff.registry import GUARDS

    stages = plan(FULL)
    todo = jobs(stages)
    assert sorted(j.key for j in todo if j.stage) == sorted(s.key for s in stages) and todo[-1].stage is None
    kinds = [j.stage.eraser is not None for j in todo if j.stage]
    assert kinds == sorted(kinds, reverse=True)  # every eraser stage before the first guard or base stage
    needs = {j.key: j.needs for j in todo if j.needs}
    spm = next(s for s in stages if s.guard and s.guard.startswith("spm"))
    assert GUARDS.get("spm").edit_from == "spm" and needs == {spm.key: "spm", todo[-1].key: ATTACKED_ERASER}
    r = run_cli("demo", "--out", str(tmp_path / "d"), "--workers", "0")
    assert r.returncode == 2 and "workers must be a positive integer, got 0" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "d").exists()
