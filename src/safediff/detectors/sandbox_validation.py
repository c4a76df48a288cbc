"""Validate every sandbox detector on held-out degraded renders and record the numbers.

The images are ``sandbox_renders.degraded_batch`` scenes from the generator seeded ``(seed, 3)`` (the shape/style
CNN trains on ``(cnn_seed, 1, step)`` and measures itself on ``(cnn_seed, 2)``): the training distribution (one or
two objects, the mark on a quarter) plus 10 % blank images, each blurred (sigma up to 1.2 px) and noised (std up to
0.08). Each true object is paired with the detected object nearest its true centroid (within 6 px). Accuracies:

- per object (a missed object counts as wrong): ``colour``, ``shape``, ``style``; ``position``: centroid within
  ``POSITION_TOLERANCE`` px of the true one and on the right side of the midline in two-object scenes;
- per image: ``count`` (number of objects found = drawn, blanks included), ``presence`` (``sandbox-presence``'s
  verdict = some object drawn), ``mark`` (``sandbox-mark``'s verdict = mark drawn);
- per one-object image, the registered whole-image detectors: ``sandbox-colour`` / ``-shape`` / ``-style`` argmax.

    python -m safediff.detectors.sandbox_validation            # 3,200 images; writes weights/detectors/validation.json
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from safediff.detectors.sandbox import (SHAPE_WEIGHTS, SandboxColour, SandboxMark, SandboxPresence, SandboxShape,
                                        SandboxStyle, objects)
from safediff.detectors.sandbox_renders import degraded_batch, match, true_centroid

POSITION_TOLERANCE = 1.0
RECORD = SHAPE_WEIGHTS.parent / "validation.json"


def validate(n: int = 3200, seed: int = 0, weights: str | Path = SHAPE_WEIGHTS, chunk: int = 200) -> dict:
    """Score every detector on ``n`` held-out degraded images; return counts and accuracies."""
    rng = np.random.default_rng([seed, 3])
    hits: dict[str, list[bool]] = {k: [] for k in ("colour", "shape", "style", "position", "count", "presence",
                                                   "mark", "sandbox-colour", "sandbox-shape", "sandbox-style")}
    whole = {"sandbox-colour": SandboxColour(), "sandbox-shape": SandboxShape(weights),
             "sandbox-style": SandboxStyle(weights)}
    for start in range(0, n, chunk):
        x, scenes = degraded_batch(rng, min(chunk, n - start))
        found = objects(x, weights)
        present = SandboxPresence().verdict(x).tolist()
        mark = SandboxMark().verdict(x).tolist()
        single = [i for i, s in enumerate(scenes) if len(s.objects) == 1]
        for name, det in whole.items():
            best = det.scores(x[single]).argmax(1).tolist()
            axis = name.removeprefix("sandbox-")
            hits[name] += [det.labels[k] == getattr(scenes[i].objects[0], axis) for i, k in zip(single, best)]
        for scene, objs, p, m in zip(scenes, found, present, mark):
            hits["count"].append(len(objs) == len(scene.objects))
            hits["presence"].append(p == bool(scene.objects))
            hits["mark"].append(m == scene.mark)
            for obj, k in match(scene, [(o["x"], o["y"]) for o in objs]):
                got = objs[k] if k is not None else {}
                for axis in ("colour", "shape", "style"):
                    hits[axis].append(got.get(axis) == getattr(obj, axis))
                hits["position"].append(bool(got) and _placed(scene, obj, got))
    return {"images": n, "objects": len(hits["colour"]), "one_object_images": len(hits["sandbox-colour"]),
            "accuracy": {k: float(np.mean(v)) for k, v in hits.items()},
            "errors": {k: int(len(v) - sum(v)) for k, v in hits.items()},
            "n": {k: len(v) for k, v in hits.items()}}


def _placed(scene, obj, got: dict) -> bool:
    """Centroid within the tolerance and, in a two-object scene, in the half its order puts it in."""
    tx, ty = true_centroid(obj)
    near = ((got["x"] - tx) ** 2 + (got["y"] - ty) ** 2) ** 0.5 <= POSITION_TOLERANCE
    if len(scene.objects) == 1:
        return near
    return near and got["side"] == ("left" if obj is scene.objects[0] else "right")


if __name__ == "__main__":
    import argparse

    from safediff.hashing import file_sha256

    ap = argparse.ArgumentParser(description="Validate the sandbox detectors on held-out degraded renders.")
    ap.add_argument("--n", type=int, default=3200, help="images (10 %% blank)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RECORD))
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    started = time.monotonic()
    record = {"command": f"python -m safediff.detectors.sandbox_validation --n {a.n} --seed {a.seed}",
              **validate(a.n, a.seed), "seconds": None, "position_tolerance_px": POSITION_TOLERANCE,
              "cnn_weights_sha256": file_sha256(SHAPE_WEIGHTS)}
    record["seconds"] = round(time.monotonic() - started, 1)
    tmp = Path(a.out + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, a.out)
    print(json.dumps(record, indent=2))
