"""How far a saved edit of the layers reading token rows moves a concept's rows toward its anchor's, layer by layer.

For each edited projection W -> W', with C_t the concept's rows and C_a the anchor's (``erasers.prompts.build_rows``
with the given token convention and guide ""), the residual ``‖C_t W'ᵀ − C_a Wᵀ‖ / ‖C_t Wᵀ − C_a Wᵀ‖``: 0 when the
edit maps the concept exactly onto the anchor, 1 when it leaves the concept where it was. A diagnostic for
closed-form erasers (UCE, SPEED, ...) that do not erase on ground truth: is the least-squares edit itself weak, or
does the denoiser read the concept elsewhere? The layers: the UNet's cross-attention K/V; on an MM-DiT (SD3, FLUX)
the one layer reading the encoders' token rows, ``context_embedder`` (``closed_form.token_row_readers``).

    HF_HUB_OFFLINE=1 python benchmarks/edit_residuals.py --concept red --tokens to_end \\
        benchmarks/results/erasers_sandbox_v2/edits/speed-red.safetensors ...
"""

from __future__ import annotations

import argparse

import torch

from safediff.errors import run_script


def residuals(model, edit, concept: str, tokens: str) -> dict[str, float]:
    from safediff.concepts import resolve
    from safediff.erasers.closed_form import token_row_readers
    from safediff.erasers.prompts import build_rows

    rows = build_rows(model, resolve(concept), None, [], tokens, False)
    projections = token_row_readers(model)
    out = {}
    for name, new in edit.tensors.items():
        if name not in projections:
            continue
        w = projections[name].weight.detach().double()
        target = rows.guide @ w.T
        out[name] = float((rows.erase @ new.double().T - target).norm() / (rows.erase @ w.T - target).norm())
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("edits", nargs="+", help="saved edits (.safetensors) of the model")
    ap.add_argument("--model", default="sandbox")
    ap.add_argument("--concept", default="red")
    ap.add_argument("--tokens", default="to_end", choices=("to_end", "last"), help="rows the residual is taken over")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    from safediff.edits import Edit
    from safediff.models import load_pipeline

    model = load_pipeline(a.model)
    for path in a.edits:
        r = residuals(model, Edit.load(path), a.concept, a.tokens)
        if not r:
            print(f"{path}: edits no layer reading the token rows")
            continue
        values = sorted(r.values())
        print(f"{path}: residual over {a.tokens} rows, {len(r)} projections: min {values[0]:.2f}, "
              f"median {values[len(values) // 2]:.2f}, max {values[-1]:.2f}")


if __name__ == "__main__":
    run_script(main)
