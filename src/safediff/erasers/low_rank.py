"""Trainable low-rank weight deltas (LoRA, Hu et al., ICLR 2022) for the erasers that train one, merged at the end.

For a weight ``W`` (``d_out × d_in``) the delta is ``ΔW = B A`` with ``A`` (``r × d_in``) drawn from ``N(0, 1/r²)``
(diffusers' ``LoRALinearLayer``: ``normal_(std=1/r)``) and ``B`` (``d_out × r``) zero, so training starts from the
weights as given. The forward pass reads ``W + B A`` through ``sampling.denoiser_output(params=...)``, with gradients
flowing into ``A`` and ``B``; the edit an eraser returns is the merged dense weight ``W + B A`` (MACE merges its
LoRAs the same way before fusing them), so it is an ordinary ``Edit``.
"""

from __future__ import annotations

import torch


class LowRankDeltas:
    """Factors ``A``, ``B`` per weight name, grouped (one group per concept for MACE, one in all for RealEra)."""

    def __init__(self, weights: dict[str, torch.Tensor], rank: int, generator: torch.Generator,
                 groups: int = 1):
        self.names = list(weights)
        self.groups = groups
        self.params: dict[str, torch.nn.Parameter] = {}
        for g in range(groups):
            for name, w in weights.items():
                d_out, d_in = w.shape
                a = torch.randn((rank, d_in), generator=generator, dtype=torch.float32) / rank
                self.params[self._key(g, name, "A")] = torch.nn.Parameter(a.to(device=w.device, dtype=w.dtype))
                self.params[self._key(g, name, "B")] = torch.nn.Parameter(
                    torch.zeros((d_out, rank), device=w.device, dtype=w.dtype))

    @staticmethod
    def _key(group: int, name: str, factor: str) -> str:
        return f"lora{group}.{name}.{factor}"

    def delta(self, group: int, name: str) -> torch.Tensor:
        """``B A`` of one weight in one group (differentiable)."""
        return self.params[self._key(group, name, "B")] @ self.params[self._key(group, name, "A")]

    def merged(self, base: dict[str, torch.Tensor], group: int = 0) -> dict[str, torch.Tensor]:
        """``W + B A`` for every weight of ``group`` (differentiable in the factors)."""
        return {name: base[name] + self.delta(group, name) for name in self.names}

    def group_params(self, group: int) -> list[torch.nn.Parameter]:
        return [p for k, p in self.params.items() if k.startswith(f"lora{group}.")]
