"""The closed-form solves UCE, RECE and TRCE share, over the layers that read the text encoders' outputs.

UCE's objective for one projection ``W`` (``d_out × d``), with ``c_i`` the erase rows, ``g_i`` their guide rows,
``v_i* = W_old g_i``, and ``c_j`` the preserve rows:

    min_W  s_e Σ_i ‖W c_i − v_i*‖² + s_p Σ_j ‖W c_j − W_old c_j‖² + λ ‖W − W_old‖²_F
    ⇒  W = (λ W_old + s_e Σ_i v_i* c_iᵀ + s_p Σ_j W_old c_j c_jᵀ)(λ I + s_e Σ_i c_i c_iᵀ + s_p Σ_j c_j c_jᵀ)⁻¹

Because every target is ``W_old`` times a text row, the left factor is ``W_old N`` with
``N = λ I + s_e Gᵀ C + s_p Pᵀ P`` (rows stacked in ``C``, ``G``, ``P``), so ``W = W_old · T`` with one ``d × d``
matrix ``T = N A⁻¹``, ``A = λ I + s_e Cᵀ C + s_p Pᵀ P``, shared by all projections. It is solved once, in float64.

Which layers (``adapter.text_readers()``): those whose input *is* an encoder output, so that rows computed from the
text encoders are exactly what the layer reads. UNet models: the cross-attention K/V (``attn2.to_k``/``to_v``).
SD3/FLUX (MM-DiT): the ``context_embedder`` (token rows) and the pooled-text embedder's first layer (pooled rows),
one ``T`` per space; their context K/V read a text stream transformed block by block instead
(``safediff.erasers.text_stream`` fits those on recorded inputs). A layer's bias, if any, is untouched: it adds the
same vector to ``W c`` and ``W_old g``, so the objective is unchanged.

When each group of rows has its own target *weight* (MACE's fusion: concept k's rows go where its LoRA-fused
``W_k`` sends them), the same objective reads ``min_W λ‖W − W_a‖² + Σ_k s_k Σ_{c∈C_k} ‖W c − W_k c‖²`` and
``least_squares_weight`` solves it: ``W = (λ W_a + Σ_k s_k W_k G_k)(λ I + Σ_k s_k G_k)⁻¹`` with ``G_k = C_kᵀ C_k``.

SPEED's null-space edit (``null_space_projector``, ``null_space_delta``) is stated in its own docstrings.
"""

from __future__ import annotations

import torch

from safediff.errors import SafediffError


def kv_projections(model) -> dict[str, torch.nn.Linear]:
    """Edit-parameter name (``unet.….attn2.to_k.weight``) -> the Linear, for every text K/V projection."""
    prefix = model.adapter.denoiser_component
    return {f"{prefix}.{name}.weight": module for name, module in model.adapter.text_kv()}


def reader_projections(model) -> dict[str, dict[str, torch.nn.Linear]]:
    """Per space (``tokens``, ``pooled``): edit-parameter name -> Linear of every layer reading encoder outputs."""
    prefix = model.adapter.denoiser_component
    return {space: {f"{prefix}.{name}.weight": m for name, m in layers}
            for space, layers in model.adapter.text_readers().items()}


def token_row_readers(model) -> dict[str, torch.nn.Linear]:
    """The layers that read the encoders' token rows directly: the cross-attention K/V where the text stream is the
    encoder output (UNet models), else the MM-DiT's ``context_embedder`` (``reader_projections``' token space)."""
    if model.adapter.text_stream_is_encoder_output():
        return kv_projections(model)
    return reader_projections(model)["tokens"]


def uce_transform(erase: torch.Tensor, guide: torch.Tensor, preserve: torch.Tensor, lamb: float,
                  erase_scale: float, preserve_scale: float, preserve_target: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """``T`` (float64, ``d × d``) such that ``W_new = W_old T`` solves UCE's objective for every projection.
    ``preserve_target``: rows whose ``W_old`` image the preserve rows must keep (default: the preserve rows)."""
    c, g, p = erase.double(), guide.double(), preserve.double()
    q = p if preserve_target is None else preserve_target.double()
    eye = torch.eye(c.shape[1], dtype=torch.float64)
    a = lamb * eye + erase_scale * c.T @ c + preserve_scale * p.T @ p
    n = lamb * eye + erase_scale * g.T @ c + preserve_scale * q.T @ p
    try:
        return torch.linalg.solve(a, n.T).T  # N A⁻¹, A symmetric
    except torch.linalg.LinAlgError:
        raise SafediffError(f"the UCE system is singular (lamb={lamb}); use lamb > 0") from None


def adversarial_map(current: dict[str, torch.Tensor], original: dict[str, torch.Tensor], reg: float) -> torch.Tensor:
    """RECE's closed-form adversarial embedding: ``M`` with ``c' = M c`` minimising
    ``Σ_l ‖W'_l c' − W_l c‖² + λ_reg ‖c'‖²``, i.e. ``M = (Σ_l W'_lᵀ W'_l + λ_reg I)⁻¹ Σ_l W'_lᵀ W_l``."""
    names = list(current)
    d = current[names[0]].shape[1]
    lhs = reg * torch.eye(d, dtype=torch.float64)
    rhs = torch.zeros(d, d, dtype=torch.float64)
    for name in names:
        w_now, w_orig = current[name].double(), original[name].double()
        lhs += w_now.T @ w_now
        rhs += w_now.T @ w_orig
    return torch.linalg.solve(lhs, rhs)


def transformed(weights: dict[str, torch.Tensor], t: torch.Tensor) -> dict[str, torch.Tensor]:
    """``W T`` for every weight, computed in float64 and returned in each weight's dtype."""
    return {name: (w.double() @ t.to(w.device)).to(w.dtype) for name, w in weights.items()}


def least_squares_weight(anchor: torch.Tensor, lamb: float,
                         terms: list[tuple[float, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``W = (λ W_a + Σ_k s_k W_k G_k)(λ I + Σ_k s_k G_k)⁻¹`` (float64) for ``terms`` = [(s_k, W_k, G_k)]: the minimiser
    of ``λ‖W − W_a‖² + Σ_k s_k Σ_{c∈C_k} ‖W c − W_k c‖²`` given the Gram matrices ``G_k = C_kᵀ C_k``."""
    w_a = anchor.double()
    d = w_a.shape[1]
    lhs = lamb * torch.eye(d, dtype=torch.float64)
    rhs = lamb * w_a
    for scale, target, gram in terms:
        g = gram.double().to(w_a.device)
        lhs = lhs + scale * g
        rhs = rhs + scale * target.double().to(w_a.device) @ g
    try:
        return torch.linalg.solve(lhs.to(w_a.device), rhs.T).T  # lhs symmetric
    except torch.linalg.LinAlgError:
        raise SafediffError(f"the least-squares system is singular (lamb={lamb}); use lamb > 0") from None


def null_space_projector(gram: torch.Tensor, threshold: float) -> torch.Tensor:
    """``P = Û Ûᵀ`` (float64) over the eigenvectors of the symmetric ``gram`` whose eigenvalue is below ``threshold``:
    the (approximate) null space of the rows the Gram matrix was made of (AlphaEdit's and SPEED's projector)."""
    values, vectors = torch.linalg.eigh(gram.double())
    kept = vectors[:, values < threshold]
    return kept @ kept.T


def null_space_delta(weight: torch.Tensor, s_tt: torch.Tensor, s_at: torch.Tensor, projector: torch.Tensor,
                     invariants: torch.Tensor, retain_scale: float, lamb: float) -> torch.Tensor:
    """SPEED's closed-form update ``Δ`` (float64) of one projection ``W`` (SPEED, Li et al., Eq. of the null-space
    edit with invariant equality constraints):

        M = (S_tt P + α I)⁻¹,   Δ = W (S_at − S_tt) P (I − M K (Kᵀ P M K + λ I)⁻¹ Kᵀ P) M

    the minimiser of ``‖Δ P C_t − W (C_a − C_t)‖² + α ‖Δ P‖²`` subject to ``Δ P K = 0`` (λ = 0: exactly; λ > 0: softly),
    with ``S_tt = C_t C_tᵀ``, ``S_at = C_a C_tᵀ`` (target and anchor rows), ``P`` the retain rows' null-space projector
    and ``K`` the invariant rows (columns of ``invariants``). ``Δ r = 0`` for every ``r`` with ``P r = 0``."""
    w = weight.double()
    d = w.shape[1]
    eye = torch.eye(d, dtype=torch.float64, device=w.device)
    p, k = projector.double().to(w.device), invariants.double().to(w.device)
    m = torch.linalg.inv(s_tt.double().to(w.device) @ p + retain_scale * eye)
    inner = k.T @ p @ m @ k + lamb * torch.eye(k.shape[1], dtype=torch.float64, device=w.device)
    constraint = eye - m @ k @ torch.linalg.pinv(inner) @ k.T @ p
    return w @ (s_at.double().to(w.device) - s_tt.double().to(w.device)) @ p @ constraint @ m
