"""SAFREE's adaptive latent re-attention (LRA) in the Fourier domain, as the paper describes it.

Yoon, Yu, Patil, Yao, Bansal, "SAFREE: Training-Free and Adaptive Guard for Safe Text-to-Image and Video
Generation", ICLR 2025 (arXiv 2410.12761), §3.4, built on FreeU (Si et al., CVPR 2024). On the steps where SAFREE
feeds the filtered prompt embedding p_proj, the UNet batch also carries the original prompt p. In the first two
decoder stages (FreeU's: ``up_blocks[0]`` with (b1, s1), ``up_blocks[1]`` with (b2, s2)), before every
concatenation of a skip feature h with the backbone feature x:

    F_proj = FFT2(h(p_proj)),   F = FFT2(h(p)),   L = {(u, v) : |u| <= tau, |v| <= tau}  (low frequencies)
    F'_proj(u, v) = s * F_proj(u, v)   if (u, v) in L and |F_proj(u, v)| > |F(u, v)|
                    F_proj(u, v)       otherwise
    h'(p_proj) = IFFT2(F'_proj),       x(p_proj)[:, :C/2] <- b * x(p_proj)[:, :C/2]   (FreeU's backbone factor)

Only the p_proj rows of samples on a filtered step change; the p rows are read, never changed (their noise
prediction is discarded by the session). With b = 1 (SAFREE's default) the backbone is untouched.

Interpretations (the released code never runs its Fourier filters, see the research notes §3):
- "exceed" compares coefficient magnitudes; the released, unused ``SafeGuard_Low_Fourier_filter`` compares the real
  part of the difference and writes the constant s in place of the coefficient, which we do not reproduce;
- "exceed" means by more than rounding: |F_proj| > (1 + 1e-4) |F|. Skip features that do not depend on the text (the
  ``conv_in`` output that the last up blocks of small UNets read, e.g. the sandbox's second up block) are equal in
  exact arithmetic, and a strict ``>`` would then scale them by s or not depending on which CPU kernel and thread
  count computed the two batch rows (measured: up to 1.1 in the final latents of a test, between 1 and 2 threads).
  Real differences between the filtered and the original branch are orders of magnitude above 1e-4;
- the low-frequency window is symmetric, |u|, |v| <= tau (tau = 1, FreeU's threshold), so the edit is Hermitian and
  h' is real; FreeU's code uses the half-open window [c - tau, c + tau) after fftshift;
- the stages are chosen by position (first two up blocks, as diffusers' FreeU ``resolution_idx`` 0 and 1), not by
  SD-1.x channel counts (1280/640) as the released code does, so every UNet (SDXL, the sandbox) gets it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial

import torch


@dataclass
class ReattentionRows:
    """Which rows of the current UNet batch are the filtered branch, and which the original branch (same order)."""

    total: int
    filtered: torch.Tensor  # long [m]
    original: torch.Tensor  # long [m]


def low_frequency_mask(h: int, w: int, radius: int, device) -> torch.Tensor:
    """Bool [h, w] in unshifted FFT layout: True where |u| <= radius and |v| <= radius (integer frequencies)."""
    fy = (torch.fft.fftfreq(h, device=device) * h).abs() <= radius
    fx = (torch.fft.fftfreq(w, device=device) * w).abs() <= radius
    return fy[:, None] & fx[None, :]


EXCEED_RTOL = 1e-4  # a coefficient "exceeds" the original's magnitude only by more than this relative margin


def reattend(h_proj: torch.Tensor, h_orig: torch.Tensor, s: float, radius: int) -> torch.Tensor:
    """The LRA rule on skip features [m, C, H, W]: scale by s the low-frequency coefficients of h_proj whose
    magnitude exceeds h_orig's (by more than ``EXCEED_RTOL``). Rows with no such coefficient come back bit-identical."""
    dtype = h_proj.dtype
    hp = h_proj.float()
    f_proj = torch.fft.fft2(hp)
    f_orig = torch.fft.fft2(h_orig.float())
    low = low_frequency_mask(hp.shape[-2], hp.shape[-1], radius, hp.device)
    pick = low & (f_proj.abs() > f_orig.abs() * (1.0 + EXCEED_RTOL))
    delta = torch.where(pick, (s - 1.0) * f_proj, torch.zeros_like(f_proj))
    return (hp + torch.fft.ifft2(delta).real).to(dtype)


class LatentReattention:
    """Forward pre-hooks on the first two up blocks' resnets; ``rows()`` says what to edit in the current call."""

    def __init__(self, b: tuple[float, float], s: tuple[float, float], radius: int):
        self.b, self.s, self.radius = tuple(b), tuple(s), int(radius)

    @contextlib.contextmanager
    def attach(self, unet, rows):
        """Register the hooks for the duration of the block; ``rows()`` -> ReattentionRows | None (no edit)."""
        handles = []
        try:
            for stage, block in enumerate(list(unet.up_blocks)[:2]):
                skip_channels: list[int] = []
                handles.append(block.register_forward_pre_hook(partial(_record_skips, skip_channels),
                                                               with_kwargs=True))
                for j, resnet in enumerate(block.resnets):
                    hook = partial(self._edit, rows, skip_channels, j, self.b[stage], self.s[stage])
                    handles.append(resnet.register_forward_pre_hook(hook))
            yield self
        finally:
            for h in handles:
                h.remove()

    def _edit(self, rows, skip_channels, j, b, s, module, args):
        r = rows()
        x = args[0]
        if r is None or x.shape[0] != r.total or not len(r.filtered):
            return None
        c = skip_channels[j]  # the resnet's input is cat([backbone, skip]); the skip is the last c channels
        x = x.clone()
        f, o = r.filtered.to(x.device), r.original.to(x.device)
        if b != 1.0:
            half = (x.shape[1] - c) // 2
            x[f, :half] = x[f, :half] * b
        x[f, -c:] = reattend(x[f, -c:], x[o, -c:], s, self.radius)
        return (x, *args[1:])


def _record_skips(out: list[int], module, args, kwargs):
    """Up-block pre-hook: channel counts of the skip features in the order its resnets consume them (last first)."""
    skips = kwargs["res_hidden_states_tuple"] if "res_hidden_states_tuple" in kwargs else args[1]
    out[:] = [t.shape[1] for t in reversed(skips)]
    return None
