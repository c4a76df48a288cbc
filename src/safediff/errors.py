"""User-facing errors: one clear line, exit code 2, never a traceback."""


class SafediffError(Exception):
    """Bad input or an unusable resource. The message names what is wrong and what is accepted."""

    exit_code = 2
