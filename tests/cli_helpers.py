"""Running the installed CLI as a user would: a fresh process, offline, one thread."""

import subprocess
import sys


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "safediff", *args], capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
