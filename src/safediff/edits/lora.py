"""Export an edit's dense ``Linear`` weight deltas as a LoRA that diffusers' ``pipe.load_lora_weights`` reads.

For each changed weight ``ΔW = W_new − W_old`` (``d_out × d_in``), the truncated SVD ``ΔW ≈ U_r S_r V_rᵀ`` gives
``lora_B = U_r S_r^½`` (``d_out × r``) and ``lora_A = S_r^½ V_rᵀ`` (``r × d_in``), so ``W_old + lora_B lora_A``
is the best rank-``r`` approximation of ``W_new`` in Frobenius norm (Eckart–Young). Keys are diffusers/PEFT's:
``unet.<module>.lora_A.weight`` / ``.lora_B.weight`` (``text_encoder.…`` likewise), with no alphas, which diffusers
reads as scale 1. One rank for every module (``rank=None``: the largest numerical rank of any ΔW, so the export
is exact up to rounding) keeps the file loadable by diffusers versions that lack per-module ranks.
Loading needs ``peft`` (``pip install peft``); writing does not.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from safediff.errors import SafediffError


def numerical_rank(s: torch.Tensor, shape: tuple[int, int], eps: float, scale: float) -> int:
    """Singular values above ``max(shape) · eps · scale``: numpy.linalg.matrix_rank's tolerance, with ``scale`` the
    norm of the weight itself, because ``W_new`` and ``W_old`` are each rounded to their dtype before ΔW is taken."""
    return int((s > max(shape) * eps * scale).sum())


def export_lora(new: dict[str, torch.Tensor], old: dict[str, torch.Tensor], path: str | Path,
                rank: int | None = None, metadata: dict | None = None) -> dict:
    """Write the LoRA file; return ``{"rank", "relative_error", "max_module_relative_error", "modules", "path"}``.

    ``relative_error`` is ``‖ΔW − BA‖_F / ‖ΔW‖_F`` over all modules together, computed from the tensors as
    stored (their dtype), per module in ``modules``.
    """
    from safetensors.torch import save

    from safediff.storage import write_bytes_atomic

    if rank is not None and rank < 1:
        raise SafediffError(f"LoRA rank must be a positive integer or None (exact), got {rank}")
    not_linear = [n for n, t in new.items() if t.ndim != 2 or not n.endswith(".weight")]
    if not_linear:
        raise SafediffError(f"LoRA export covers Linear weight matrices only; this edit also changes "
                            f"{not_linear[0]} (and {len(not_linear) - 1} more); use export_folder instead")
    deltas, svds, scales = {}, {}, {}
    for name in sorted(new):
        delta = new[name].double() - old[name].to(new[name].device).double()
        if torch.count_nonzero(delta) == 0:
            continue
        deltas[name] = delta
        scales[name] = float(torch.linalg.matrix_norm(old[name].double(), "fro"))
        svds[name] = torch.linalg.svd(delta, full_matrices=False)
    if not deltas:
        raise SafediffError("the edit changes no weight; there is no LoRA to export")
    eps = max(torch.finfo(t.dtype).eps if t.is_floating_point() else 0.0 for t in new.values())
    if rank is None:
        rank = max(numerical_rank(s, tuple(deltas[n].shape), eps, scales[n]) for n, (_, s, _) in svds.items())
        rank = max(rank, 1)
    state, modules = {}, {}
    err2 = total2 = 0.0
    for name, (u, s, vh) in svds.items():
        r = min(rank, s.numel())
        dtype = new[name].dtype
        root = s[:r].sqrt()
        b = (u[:, :r] * root).to(dtype).contiguous()
        a = (root[:, None] * vh[:r]).to(dtype).contiguous()
        if r < rank:  # pad to the common rank with zero directions (no effect on the product)
            b = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], 1)
            a = torch.cat([a, a.new_zeros(rank - r, a.shape[1])], 0)
        module = name[: -len(".weight")]
        state[f"{module}.lora_A.weight"] = a
        state[f"{module}.lora_B.weight"] = b
        e2 = float(((deltas[name] - b.double() @ a.double()) ** 2).sum())
        t2 = float((deltas[name] ** 2).sum())
        modules[module] = {"rank": r, "relative_error": math.sqrt(e2 / t2)}
        err2, total2 = err2 + e2, total2 + t2
    report = {"path": str(path), "rank": rank, "relative_error": math.sqrt(err2 / total2),
              "max_module_relative_error": max(m["relative_error"] for m in modules.values()),
              "modules": modules}
    header = {"format": "pt", "safediff_lora": json.dumps({"report": {k: v for k, v in report.items()
                                                                      if k != "modules"},
                                                           "edit": metadata or {}}, default=str)}
    write_bytes_atomic(Path(path), save(state, metadata=header))
    return report
