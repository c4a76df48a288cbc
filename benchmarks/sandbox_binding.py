"""Where does a two-object scene get its colours: from the prompt, or from the initial noise?

The sandbox's two-object gate fails on colour (each object has its own colour about half the time, shapes 98 %).
This script tells the two possible causes apart, on any sandbox-world model (``sandbox``, a trained folder):

- **prompt order**: every pair prompt ``a c1 s1 and a c2 s2`` is drawn again with its colours swapped
  (``a c2 s1 and a c1 s2``) from the *same* initial noise. A model that binds colours to objects swaps the colours
  in the image; ``colours_ignore_prompt_order`` is the share of pairs whose two images have the same colour on each
  side although the prompt swapped them.
- **the noise**: the same prompt drawn from the noise mirrored left-right (``mirror``), and from the noise with only
  the per-channel means of its two halves exchanged (``half_means``, every other component kept).
  ``colours_follow_*`` is the share of images whose colours changed sides against the plain draw; shapes are
  reported alongside (they should stay where the prompt puts them).

Every image is read by the exact sandbox detectors; rates carry Wilson 95 % intervals. Sampler: the model's defaults
(DDIM, η = 0, classifier-free guidance), through the project's one denoising loop (``Trajectories``).

    HF_HUB_OFFLINE=1 python benchmarks/sandbox_binding.py --model sandbox \\
        --json benchmarks/results/sandbox_binding.json
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from safediff.bench.metrics import wilson_share as rate
from safediff.detectors.sandbox import objects
from safediff.errors import SafediffError, run_script
from safediff.models import load_pipeline
from safediff.sampling import Trajectories, decode
from safediff.sandbox.world import COLOURS, SHAPES
from safediff.storage import write_json_atomic


def pair_prompts(n: int, seed: int) -> list[tuple[str, str, str, str]]:
    """n (c1, s1, c2, s2): two different colours and two different shapes, left object first."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        c1, c2 = (str(v) for v in rng.choice(COLOURS, 2, replace=False))
        s1, s2 = (str(v) for v in rng.choice(SHAPES, 2, replace=False))
        out.append((c1, s1, c2, s2))
    return out


def mirrored(noise: torch.Tensor) -> torch.Tensor:
    return noise.flip(-1)


def half_means_swapped(noise: torch.Tensor) -> torch.Tensor:
    """The noise with the per-channel means of its left and right halves exchanged (all else kept)."""
    w = noise.shape[-1] // 2
    left, right = noise[..., :w], noise[..., w:]
    ml, mr = left.mean((-2, -1), keepdim=True), right.mean((-2, -1), keepdim=True)
    return torch.cat([left - ml + mr, right - mr + ml], -1)


def sides(found: list[dict], axis: str) -> tuple[str | None, str | None]:
    by_side = {o["side"]: o[axis] for o in found}
    return by_side.get("left"), by_side.get("right")


@torch.no_grad()
def draw(model, traj: Trajectories, prompts: list[str], noise: torch.Tensor, guidance: float, batch: int):
    found = []
    for start in range(0, len(prompts), batch):
        part = prompts[start:start + batch]
        cond = model.adapter.encode(part)
        uncond = model.adapter.encode_negative(None, len(part))
        latents = traj.run(cond, uncond, guidance, noise[start:start + batch])
        found += objects(decode(model, latents))
    return found


def measure(pairs, plain, swapped, mirror, half) -> dict:
    want = [(c1, c2) for c1, _, c2, _ in pairs]
    shapes = [(s1, s2) for _, s1, _, s2 in pairs]
    col = [sides(f, "colour") for f in plain]

    def follows(other):
        return rate([sides(f, "colour") == (c[1], c[0]) and c[0] != c[1] for f, c in zip(other, col)])

    return {
        "colours_right": rate([c == w for c, w in zip(col, want)]),
        "colours_right_swapped_prompt": rate([sides(f, "colour") == (w[1], w[0]) for f, w in zip(swapped, want)]),
        "shapes_right": rate([sides(f, "shape") == s for f, s in zip(plain, shapes)]),
        "colours_ignore_prompt_order": rate([sides(f, "colour") == c for f, c in zip(swapped, col)]),
        "colours_follow_mirrored_noise": follows(mirror),
        "colours_follow_half_means": follows(half),
        "shapes_right_mirrored_noise": rate([sides(f, "shape") == s for f, s in zip(mirror, shapes)]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="sandbox", help="model spec: 'sandbox' or a sandbox-world diffusers folder")
    ap.add_argument("--n", type=int, default=60, help="pair prompts (each drawn 4 times)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default: the model's)")
    ap.add_argument("--batch-size", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="benchmarks/results/sandbox_binding.json")
    a = ap.parse_args()
    if a.n < 1 or a.batch_size < 1:
        raise SafediffError("--n and --batch-size must be >= 1")
    torch.set_num_threads(a.threads)
    model = load_pipeline(a.model)
    traj = Trajectories(model)
    guidance = float(a.guidance if a.guidance is not None else model.defaults["guidance"])
    pairs = pair_prompts(a.n, a.seed)
    prompts = [f"a {c1} {s1} and a {c2} {s2}" for c1, s1, c2, s2 in pairs]
    swapped = [f"a {c2} {s1} and a {c1} {s2}" for c1, s1, c2, s2 in pairs]
    noise = traj.noise(a.n, torch.Generator().manual_seed(a.seed))
    start = time.monotonic()
    runs = {"plain": (prompts, noise), "swapped": (swapped, noise), "mirror": (prompts, mirrored(noise)),
            "half": (prompts, half_means_swapped(noise))}
    found = {k: draw(model, traj, p, x, guidance, a.batch_size) for k, (p, x) in runs.items()}
    m = measure(pairs, found["plain"], found["swapped"], found["mirror"], found["half"])
    for k, v in m.items():
        print(f"{k:32s} {v['value']:6.1%}  [{v['ci'][0]:.1%}, {v['ci'][1]:.1%}]  n={v['n']}")
    write_json_atomic(a.json, {"model": a.model, "model_sha256": model.base_sha256,
                               "scheduler": dict(traj.scheduler.config), "steps": traj.steps, "guidance": guidance,
                               "seed": a.seed, "pairs": a.n, "seconds": round(time.monotonic() - start, 1), **m})


if __name__ == "__main__":
    run_script(main)
