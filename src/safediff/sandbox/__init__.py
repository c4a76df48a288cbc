"""The sandbox: a synthetic world and a tiny model trained on it, with the shipped model in ``weights/``.

``values`` (the attribute values and their words), ``geometry`` (shapes, styles, the mark), ``captions`` (the
grammar) and ``world`` (scenes, rendering, training batches; the public face of the three) make the world;
``benchmarks`` draws prompt sets from it and ``scoring`` judges images against their rows; ``tokenizer`` and
``train`` build the model. ``docs/sandbox.md`` describes it all.

Two models of the same world are shipped: ``sandbox`` (Stable Diffusion format, ``weights/``) and ``sandbox-flux``
(FLUX.1 format, ``weights_flux/``, on the same VAE); ``sandbox.architectures`` describes both. Each folder is exactly
what ``safediff sandbox train`` produced (command and seed in its ``safediff_sandbox.json``); ``verify_weights``
checks it against its ``SHA256SUMS`` before use.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from safediff.errors import SafediffError

WEIGHTS_DIR = Path(__file__).parent / "weights"
FLUX_WEIGHTS_DIR = Path(__file__).parent / "weights_flux"
MODELS = {"sandbox": WEIGHTS_DIR, "sandbox-flux": FLUX_WEIGHTS_DIR}  # model spec -> shipped folder
SUMS_FILE = "SHA256SUMS"


def retrain_hint(folder: Path) -> str:
    arch = " --arch flux" if Path(folder) == FLUX_WEIGHTS_DIR else ""
    return (f"retrain it with `safediff sandbox train{arch} --out DIR` (about 150 minutes on 2 CPU cores) and load "
            "that folder by giving its path as the model spec, or reinstall safediff")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_sums(folder: Path = WEIGHTS_DIR) -> Path:
    """Record the sha256 of every file under ``folder`` (except the sums file) in ``folder/SHA256SUMS``."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != SUMS_FILE)
    lines = [f"{sha256(p)}  {p.relative_to(folder).as_posix()}\n" for p in files]
    out = folder / SUMS_FILE
    out.write_text("".join(lines))
    return out


def verify_weights(folder: Path = WEIGHTS_DIR) -> Path:
    """Check every file listed in ``SHA256SUMS`` exists and matches; return the folder or raise SafediffError."""
    folder = Path(folder)
    sums = folder / SUMS_FILE
    if not sums.is_file():
        raise SafediffError(f"the sandbox weights are missing ({sums} not found); {retrain_hint(folder)}")
    for line in sums.read_text().splitlines():
        if not line.strip():
            continue
        digest, name = line.split(maxsplit=1)
        path = folder / name.strip()
        if not path.is_file():
            raise SafediffError(f"sandbox weight file {path} is missing; {retrain_hint(folder)}")
        if sha256(path) != digest:
            raise SafediffError(f"sandbox weight file {path} is corrupt (sha256 mismatch); {retrain_hint(folder)}")
    return folder
