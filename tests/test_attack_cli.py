"""`safediff attack`: bad input -> one line, exit 2; a RUN folder resumes per prompt and refuses other protocols."""

import json
import sys

import pytest

from attack_recipe_helpers import never_flags, red_target
from safediff.attacks.budget import Budget
from safediff.attacks.runner import read_attack_prompts, run_attack
from safediff.attacks.unlearndiff import UnlearnDiffAtk
from safediff.errors import SafediffError


def run_main(monkeypatch, capsys, *args):
    from safediff.cli import main

    monkeypatch.setattr(sys, "argv", ["safediff", "attack", *args])
    with pytest.raises(SystemExit) as e:
        main()
    return e.value.code, capsys.readouterr().err


@pytest.fixture
def prompts_csv(tmp_path):
    p = tmp_path / "prompts.csv"
    p.write_text("prompt,seed\na red circle,1\na red square,2\na red triangle,3\n")
    return p


@pytest.mark.parametrize("change, words", [
    ({"--method": "unlearndif"}, "unknown attack 'unlearndif' (did you mean 'unlearndiff'?)"),
    ({"--judge": "no-such-detector"}, "unknown detector"),
    ({"--target": "not a/spec"}, "unknown model spec"),
    ({"--target": "sandbox:no-such-guard"}, "unknown guard"),
    ({"--budget": "iterations=0"}, "must be > 0"),
    ({"--budget": "unet_forward=-3"}, "must be > 0"),
    ({"--method": "unlearndiff:k=two"}, "k=two is not a valid int"),
    ({"--prompts": "MISSING"}, "not found"),
    ({"--prompts": "NOPROMPT"}, "no 'prompt' column"),
])
def test_bad_input_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path, prompts_csv, change, words):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,seed\nhello,1\n")
    args = {"--target": "sandbox", "--method": "unlearndiff", "--concept": "red", "--prompts": str(prompts_csv),
            "--judge": "sandbox-colour", "--out": str(tmp_path / "run")}
    args.update(change)
    args["--prompts"] = {"MISSING": str(tmp_path / "nope.csv"), "NOPROMPT": str(bad)}.get(args["--prompts"],
                                                                                          args["--prompts"])
    code, err = run_main(monkeypatch, capsys, *[x for kv in args.items() for x in kv])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err
    assert not (tmp_path / "run").exists()


def test_attack_specific_missing_column(tmp_path, prompts_csv):
    with pytest.raises(SafediffError, match="lacks the column"):
        read_attack_prompts(prompts_csv, ("prompt", "image"))


class Interrupted(Exception):
    pass


def test_resume_skips_finished_prompts_and_refuses_another_protocol(tiny_sd, prompts_csv, tmp_path, monkeypatch):
    rows = read_attack_prompts(prompts_csv)
    target, judge, budget = red_target(tiny_sd), never_flags(), Budget(iterations=2)
    attack = UnlearnDiffAtk(timesteps=1, iterations_per_timestep=2, skip_when_pre_success=False)
    calls = []
    real_run = UnlearnDiffAtk.run

    def run_twice_then_stop(self, target, row, judge, budget, seed):
        calls.append(row["prompt"])
        if len(calls) == 3:
            raise Interrupted
        return real_run(self, target, row, judge, budget, seed)

    out = tmp_path / "run"
    monkeypatch.setattr(UnlearnDiffAtk, "run", run_twice_then_stop)
    with pytest.raises(Interrupted):
        run_attack(target, attack, judge, rows, budget, 0, out, str(prompts_csv), progress=False)
    assert sorted(p.name for p in (out / "prompts").glob("*.json")) == ["000000.json", "000001.json"]
    assert not (out / "results.json").exists()
    first = [(out / "prompts" / f"00000{i}.json").read_text() for i in range(2)]
    calls.clear()
    results = run_attack(target, attack, judge, rows, budget, 0, out, str(prompts_csv), progress=False)
    assert calls == ["a red triangle"]  # the first two were not recomputed
    assert [(out / "prompts" / f"00000{i}.json").read_text() for i in range(2)] == first
    saved = json.loads((out / "results.json").read_text())
    assert saved["n"] == 3 and [r["seed"] for r in saved["records"]] == [1, 2, 3]
    assert saved["asr"] == results["asr"] and 0.0 <= saved["pre_asr"] <= saved["asr"] <= 1.0
    assert saved["compute_total"]["iterations"] == 3 * 2
    assert saved["identity"]["target"]["model"]["base_weights_sha256"]
    assert saved["identity"]["attack"]["name"] == "unlearndiff" and saved["identity"]["budget"]["iterations"] == 2
    for r in saved["records"]:
        assert (out / r["files"]["pre_image"]).is_file() and (out / r["files"]["image"]).is_file()
    with pytest.raises(SafediffError, match="different protocol.*budget"):
        run_attack(target, attack, judge, rows, Budget(iterations=3), 0, out, str(prompts_csv), progress=False)
