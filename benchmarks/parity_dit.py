"""Max abs pixel difference between safediff's sampler and diffusers' own pipelines on tiny models built in code.

The parity tests (tests/test_sampling_parity.py) assert <= 1e-4; this prints the measured differences, and the
vacuity check (how much the two images of a batch differ), for every architecture at CFG on and off.

    HF_HUB_OFFLINE=1 python benchmarks/parity_dit.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from safediff.errors import run_script

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import tiny_model  # noqa: E402
from test_sampling_parity import PROMPTS, SEEDS, _diffusers_images  # noqa: E402

from safediff.sampling import generate  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    print("| model | guidance | max abs pixel difference | images differ by |")
    print("|---|---|---|---|")
    for name in ("tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flux"):
        model = tiny_model(name)
        for guidance in (5.0, 1.0):
            ref = _diffusers_images(model, PROMPTS, SEEDS, 4, guidance, 32)
            ours = generate(model, PROMPTS, SEEDS, steps=4, guidance=guidance, height=32, width=32, progress=False)
            diff = np.abs(ours.pixels.permute(0, 2, 3, 1).numpy() - ref).max()
            print(f"| {name} | {guidance:g} | {diff:.2e} | {np.abs(ref[0] - ref[1]).max():.3f} |")


if __name__ == "__main__":
    run_script(main)
