"""``safediff.errors.run_script``, how the benchmark scripts end: a SafediffError is one line on stderr and exit code
2 (as the ``safediff`` command); any other exception is a bug and keeps its traceback; a clean run exits normally."""

import pytest

from safediff.errors import SafediffError, run_script


def test_toolkit_error_is_one_line_and_exit_code_2(capsys):
    def main():
        raise SafediffError("--prompts must be >= 1, got 0")

    with pytest.raises(SystemExit) as ended:
        run_script(main)
    assert ended.value.code == 2
    assert capsys.readouterr().err == "error: --prompts must be >= 1, got 0\n"


def test_other_errors_propagate_and_clean_runs_return():
    def broken():
        raise KeyError("bug")

    with pytest.raises(KeyError):
        run_script(broken)
    ran = []
    assert run_script(lambda: ran.append(1)) is None and ran == [1]


def test_every_benchmark_script_ends_through_run_script():
    """A script run from the shell says a toolkit error in one line (bad --methods, an unknown eraser, ...)."""
    from pathlib import Path

    scripts = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))
    entry = [p for p in scripts if 'if __name__ == "__main__":' in p.read_text()]
    assert len(entry) >= 20
    for p in entry:
        tail = p.read_text().split('if __name__ == "__main__":', 1)[1].strip()
        assert tail == "run_script(main)", f"{p.name} ends with {tail!r}"
