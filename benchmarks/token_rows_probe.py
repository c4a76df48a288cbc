"""Where does a prompt's colour live in the text encoding the denoiser reads? A probe for last-token erasers.

SPEED (and UCE with ``tokens=last``) edit a projection so that it maps the *row of the concept word* (its last token)
to the anchor's row. In a causal text encoder (CLIP) every later token also reads the word: in "a red circle" the rows
of "circle", EOS and the padding have attended to "red"; in a bidirectional one (T5, FLUX's token sequence) every row
has. If the denoiser can read the value from those rows, an edit of the word's row alone cannot erase it. This probe
measures that on ground truth: for prompts naming ``--value`` by its word (``sandbox.benchmarks.erasure_set``, kind
``target-word``) it swaps rows of the token sequence with those of the same prompt naming ``--swap`` instead (same
length: one-token words, so positions align) and reads the images with the exact detectors:

- ``none``: the prompt's own encoding;
- ``word``: only the word's row swapped (what a perfect last-token edit achieves);
- ``after``: every row *after* the word swapped, the word's own row kept;
- ``word+after``: the word's row and every later row swapped (in a causal encoder: the swap prompt's whole sequence);
- ``all``: every row swapped (differs from ``word+after`` only in a bidirectional encoder);
- ``pooled`` (models with a pooled vector, e.g. FLUX's CLIP): only the pooled vector swapped, every row kept.

Models with one token sequence (``adapter.segments``: SD 1/2, SDXL, FLUX.1). Reported: the rate of ``--value`` and of
``--swap`` in each condition (Wilson 95 % intervals), with the protocol.

    HF_HUB_OFFLINE=1 python benchmarks/token_rows_probe.py --value red --swap blue --n 32 \\
        --out benchmarks/results/token_rows_probe.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from safediff.errors import run_script

CONDITIONS = ("none", "word", "after", "word+after", "all", "pooled")


def swapped(prompt: str, value: str, swap: str) -> str:
    words = prompt.split(" ")
    return " ".join(swap if w == value else w for w in words)


def word_positions(model, prompts: list[str], value: str) -> list[int]:
    """The row of ``value``'s token in each prompt's token sequence (``erasers.prompts.word_positions`` in the
    tokenization of the model's one segment; it must be one token, present once)."""
    from safediff.erasers.prompts import WordFinder, word_positions as positions_of

    (segment,) = model.adapter.segments
    k = segment.encoders[0]
    finder, length = WordFinder(model.adapter.tokenizers[k]), model.adapter.window(k)
    if len(finder.ids(value)) != 1:
        raise SystemExit(f"error: '{value}' is {len(finder.ids(value))} tokens; the probe needs a one-token word")
    out = []
    for prompt in prompts:
        hits = positions_of(finder, prompt, value, length)
        if len(hits) != 1:
            raise SystemExit(f"error: '{value}' appears {len(hits)} times in the tokens of {prompt!r}")
        out.append(segment.start + hits[0])
    return out


def conditioning(model, prompts: list[str], value: str, swap: str, condition: str):
    from safediff.adapters import Conditioning

    own = model.adapter.encode(prompts)
    if condition == "none":
        return own
    other = model.adapter.encode([swapped(p, value, swap) for p in prompts])
    if condition == "pooled":
        return Conditioning(own.embeds, other.pooled)
    if condition == "all":
        return Conditioning(other.embeds, own.pooled)
    embeds = own.embeds.clone()
    for i, pos in enumerate(word_positions(model, prompts, value)):
        lo = pos + (condition == "after")
        hi = pos + 1 if condition == "word" else embeds.shape[1]
        embeds[i, lo:hi] = other.embeds[i, lo:hi]
    return Conditioning(embeds, own.pooled)


def conditions(model) -> list[str]:
    """The conditions a model can be probed under: ``pooled`` only where the conditioning has a pooled vector."""
    has_pooled = model.adapter.encode([""]).pooled is not None
    return [c for c in CONDITIONS if c != "pooled" or has_pooled]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sandbox")
    ap.add_argument("--value", default="red")
    ap.add_argument("--swap", default="blue")
    ap.add_argument("--n", type=int, default=32, help="prompts (target-word rows of the value's erasure set)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    from safediff.bench.metrics import wilson
    from safediff.detectors.sandbox import attributes
    from safediff.models import load_pipeline
    from safediff.records import provenance
    from safediff.sampling import SamplerSettings, generate
    from safediff.sandbox.benchmarks import erasure_set
    from safediff.sandbox.values import VALUES, axis_of
    from safediff.storage import write_json_atomic

    if a.value not in VALUES or a.swap not in VALUES or axis_of(a.value) != axis_of(a.swap) or a.value == a.swap:
        raise SystemExit(f"error: --value and --swap must be two sandbox values of one axis; got {a.value}, {a.swap}")
    axis = axis_of(a.value)
    model = load_pipeline(a.model)
    if len(model.adapter.segments) != 1:
        raise SystemExit(f"error: the probe swaps rows of one token sequence; {model.adapter.arch} has "
                         f"{len(model.adapter.segments)} (accepted: SD 1/2, SDXL, FLUX.1)")
    rows = [r for r in erasure_set(a.value, n_per_kind=a.n) if r["kind"] == "target-word"][:a.n]
    prompts, seeds = [r["prompt"] for r in rows], [r["seed"] for r in rows]
    results, t0 = {}, time.perf_counter()
    for condition in conditions(model):
        cond = conditioning(model, prompts, a.value, a.swap, condition)
        with torch.no_grad():
            images = generate(model, prompts, seeds, conditioning=cond, progress=False).pixels
        found = [obj[axis] for obj in attributes(images)]
        results[condition] = {}
        for name in (a.value, a.swap):
            k = sum(f == name for f in found)
            lo, hi = wilson(k, len(found))
            results[condition][name] = {"rate": k / len(found), "ci95": [lo, hi], "k": k, "n": len(found)}
        print(f"{condition:11s} {a.value} {results[condition][a.value]['rate']:.2f}  "
              f"{a.swap} {results[condition][a.swap]['rate']:.2f}", flush=True)
    out = {"protocol": {"model": model.protocol(), "value": a.value, "swap": a.swap, "prompts": prompts,
                        "seeds": seeds, "sampler": SamplerSettings.of(model).record(model),
                        "detector": "safediff.detectors.sandbox.attributes (exact)"},
           "results": results, "seconds": round(time.perf_counter() - t0, 1), "provenance": provenance()}
    write_json_atomic(a.out, out)


if __name__ == "__main__":
    run_script(main)
