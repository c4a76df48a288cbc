"""SET: input-level backdoor detection by cross-attention scaling.

Paper: Z. Li, J. Li, Y. Sha, Z. Li, L. Xiong, Z. Fu, "Scaling Exposes the Trigger: Input-Level Backdoor Detection in
Text-to-Image Diffusion Models via Cross-Attention Scaling", arXiv:2604.12446 (2026). No public code was found; this
implements the paper's description (controlled scaling perturbations of cross-attention; response-offset features
over denoising steps under several scales; a compact benign response space learned from a few clean prompts;
detection by the deviation from it), with the choices below stated.

Probe. Along the prompt's own trajectory (the sampler's classifier-free guidance from the row's seed), at each step s
the conditional prediction is computed again with every cross-attention block's output scaled by λ ∈ Λ
(h ← h + λ · CrossAttn(h, c); λ = 1 is the model), and the response offset is

    r_{λ,s}(c) = ‖ε_λ(x_s, s, c) − ε_1(x_s, s, c)‖₂ / ‖ε_1(x_s, s, c)‖₂ .

The feature of a prompt is f(c) = (r_{λ,s})_{λ∈Λ, s ≤ S}: how its response to each scale evolves over the steps.
Backdoored inputs respond differently (the paper's Cross-Attention Scaling Response Divergence): a trigger that
dominates the cross-attention makes the prediction move differently with its scale.

Benign response space. From the features F of n clean prompts: per-feature mean μ and deviation σ, z = (f − μ) / σ,
and the principal directions V_k of the standardised benign features with eigenvalues ℓ_i, k the fewest reaching
``variance`` of the total (at most n − 1). Score (higher = more likely triggered):

    d(f) = Σ_{i ≤ k} (v_iᵀ z)² / ℓ_i + ‖z − V_k V_kᵀ z‖² / Q̄

(Hotelling's T² inside the space, plus the distance from it normalised by its mean Q̄ over the benign prompts). The
threshold is set on leave-one-out benign scores. Choices where the paper leaves room: the block's output is scaled
(not its attention logits), the offset is the relative ℓ2 change of the conditional prediction, the deviation is
T² + Q. UNet models only (SD 1.x/2.x, SDXL): an MM-DiT has no cross-attention block whose output could be scaled
(text and image tokens share one joint attention), so SD3/FLUX are refused. Cost: the |Λ| scaled branches ride in
the sampler's one UNet call per step (batch (2 + |Λ|) B instead of
2B), for the model's default number of steps (``steps`` to change it); no image is decoded.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar

import torch

from safediff.backdoors.detect import BackdoorDetector, batched, cross_attention_hooks, probe
from safediff.errors import SafediffError
from safediff.guards.base import Session
from safediff.options import option


class ScalingProbe(Session):
    """CFG over (∅, c) plus one branch of c per scale λ whose cross-attention outputs are multiplied by λ; records
    r_{λ,s} for every step."""

    def __init__(self, ctx, scales: tuple[float, ...]):
        super().__init__(ctx)
        self.scales = tuple(scales)
        self.base = 2 if ctx.cfg else 1
        self.offsets: list[torch.Tensor] = []  # per step [B, |Λ|]

    def branches(self, i: int):
        return super().branches(i) + [self.ctx.cond] * len(self.scales)

    def combine(self, i, t, eps):
        cond = eps[self.base - 1].flatten(1).float()
        norm = cond.norm(dim=1).clamp_min(1e-12)
        self.offsets.append(torch.stack([(e.flatten(1).float() - cond).norm(dim=1) / norm
                                         for e in eps[self.base:]], dim=1))
        return super().combine(i, t, eps[:self.base])

    @contextlib.contextmanager
    def unet_hooks(self):
        b = len(self.ctx.cond)
        factors = torch.tensor([1.0] * (self.base * b) + [s for s in self.scales for _ in range(b)])

        def scale(module, args, output):
            if output.shape[0] != len(factors):
                return None
            return output * factors.to(output).view(-1, *([1] * (output.ndim - 1)))

        with cross_attention_hooks(self.ctx.model, scale):
            yield


@dataclass
class SET(BackdoorDetector):
    name: ClassVar[str] = "set"
    paper: ClassVar[str] = ("Li, Li, Sha, Li, Xiong, Fu, Scaling Exposes the Trigger: Input-Level Backdoor Detection "
                            "in Text-to-Image Diffusion Models via Cross-Attention Scaling, arXiv 2604.12446 (2026)")
    sandbox: ClassVar[dict[str, dict]] = {"benchmark": {}, "smoke": {"steps": 2}}
    archs: ClassVar[tuple[str, ...]] = ("sd1", "sd2", "sdxl")
    archs_reason: ClassVar[str] = ("SET scales cross-attention block outputs, and an MM-DiT (SD3/FLUX) has none: text "
                                   "and image share one joint attention; use seed-diversity")

    scales: tuple[float, ...] = option((0.5, 1.5, 3.0), help="the scales λ applied to cross-attention outputs")
    steps: int | None = option(None, low=1, help="denoising steps probed (None: the model's default)")
    variance: float = option(0.9, low=0.0, high=1.0, help="share of the benign variance the space keeps")

    def __post_init__(self):
        super().__post_init__()
        self.scales = tuple(float(s) for s in self.scales)
        if not self.scales:
            raise SafediffError("set: give at least one scale")

    def features(self, model, prompts, seeds):
        self.require(model)

        def run(p, s):
            offsets = probe(model, ScalingProbe, p, s, self.steps, scales=self.scales).offsets
            return torch.stack(offsets, dim=2).flatten(1)  # [B, |Λ| · S], scale-major

        return batched(run, prompts, seeds, self.batch)

    def fit(self, benign):
        self.space = BenignSpace(benign.double(), self.variance)

    def score(self, features):
        return self.space.deviation(features.double())

    def benign_scores(self, benign):
        b = benign.double()
        return torch.cat([BenignSpace(torch.cat([b[:j], b[j + 1:]]), self.variance).deviation(b[j:j + 1])
                          for j in range(len(b))])


class BenignSpace:
    """The standardised principal subspace of benign features, and the T² + Q deviation from it."""

    def __init__(self, features: torch.Tensor, variance: float):
        self.mu = features.mean(0)
        self.sigma = features.std(0, unbiased=False).clamp_min(1e-8 * features.abs().max().clamp_min(1.0))
        z = (features - self.mu) / self.sigma
        _, s, vh = torch.linalg.svd(z, full_matrices=False)
        ell = s ** 2 / max(len(z) - 1, 1)
        share = torch.cumsum(ell, 0) / ell.sum().clamp_min(1e-30)
        k = int((share < variance).sum()) + 1
        k = max(1, min(k, len(z) - 1, len(ell)))
        self.v, self.ell = vh[:k], ell[:k].clamp_min(1e-12)
        residual = self._residual(z)
        self.q_mean = float(residual.mean()) if float(residual.mean()) > 1e-12 else 1.0

    def _residual(self, z: torch.Tensor) -> torch.Tensor:
        return (z - (z @ self.v.T) @ self.v).pow(2).sum(1)

    def deviation(self, features: torch.Tensor) -> torch.Tensor:
        z = (features - self.mu) / self.sigma
        return ((z @ self.v.T) ** 2 / self.ell).sum(1) + self._residual(z) / self.q_mean
