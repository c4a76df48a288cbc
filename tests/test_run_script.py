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
