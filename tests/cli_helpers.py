"""Running the installed CLI as a user would: a fresh process, offline, with the test process's thread count and CPU
kernel (tests compare what the CLI computes with what the test process computed)."""

import os
import subprocess
import sys

INHERITED = ("OMP_NUM_THREADS", "ATEN_CPU_CAPABILITY")


def run_cli(*args):
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    env.update({k: os.environ[k] for k in INHERITED if k in os.environ})
    return subprocess.run([sys.executable, "-m", "safediff", *args], capture_output=True, text=True, env=env)
