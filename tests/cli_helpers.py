"""Running the installed CLI as a user would: a fresh process, offline, with the test process's thread count and CPU
kernel (tests compare what the CLI computes with what the test process computed)."""

import os
import subprocess
import sys

INHERITED = ("OMP_NUM_THREADS", "ATEN_CPU_CAPABILITY", "PYTHONPATH")


def cli_env(**extra) -> dict:
    """A user's environment: offline, one thread unless the test process has more, its kernel and import path."""
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", **extra}
    env.update({k: os.environ[k] for k in INHERITED if k in os.environ})
    return env


def run_cli(*args, **env):
    return subprocess.run([sys.executable, "-m", "safediff", *args], capture_output=True, text=True,
                          env=cli_env(**env))


def run_main(monkeypatch, capsys, *args):
    """The CLI in-process (fast): returns (exit code, stderr)."""
    from safediff.cli import main

    monkeypatch.setattr(sys, "argv", ["safediff", *args])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def one_line_error(code, stderr, words):
    """Exit 2 with exactly one 'error:' line containing ``words``, and no traceback."""
    assert code == 2, stderr
    lines = [line for line in stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and words in lines[0], stderr
    assert "Traceback" not in stderr
