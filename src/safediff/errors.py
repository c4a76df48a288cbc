"""User-facing errors: one clear line, exit code 2, never a traceback."""

from __future__ import annotations

import sys
from typing import Callable


class SafediffError(Exception):
    """Bad input or an unusable resource. The message names what is wrong and what is accepted."""

    exit_code = 2


def run_script(main: Callable[[], object]) -> None:
    """Run a script's ``main()`` (the benchmarks'); a ``SafediffError`` ends it with its one line on stderr and its
    exit code, as the ``safediff`` command does. Other exceptions keep their tracebacks (they are bugs)."""
    try:
        main()
    except SafediffError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
