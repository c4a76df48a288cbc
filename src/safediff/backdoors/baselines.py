"""Simple input-level backdoor detectors to compare SET with: cross-attention map statistics and output diversity.

- ``attention-stats``: the *assimilation* of cross-attention maps that T2IShield observed (Z. Wang, J. Zhang, S. Shan,
  X. Chen, "T2IShield: Defending Against Backdoors on Text-to-Image Diffusion Models", ECCV 2024): under a trigger the
  maps of a prompt's tokens become alike. Statistic: the mean pairwise cosine similarity of the prompt's token maps
  (tokens 1 … EoT; each map the head-averaged attention probabilities over the image positions), averaged over every
  cross-attention layer and denoising step of the conditional branch. A statistic in its spirit, not T2IShield's own
  F-norm threshold truncation or covariance discriminant. UNet models only (SD3/FLUX have no cross-attention maps:
  text and image share one joint softmax).
- ``seed-diversity``: the low output diversity of triggered prompts (UFID: Z. Guan, M. Hu, S. Li, A. Vullikanti,
  "UFID: A Unified Framework for Input-level Backdoor Detection on Diffusion Models", arXiv:2404.01101): the prompt
  is generated from ``images`` seeds and the score is the mean pairwise cosine similarity of the images (each
  downsampled to ``size`` x ``size`` and centred on its mean), without UFID's prompt perturbations or CLIP features.
  Every architecture (it only generates).

Both scores are higher for more likely triggered prompts; neither learns anything from the clean prompts but its
threshold.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from safediff.backdoors.detect import BackdoorDetector, batched, cross_attention_hooks, probe
from safediff.guards.base import Session
from safediff.options import option


def mean_pairwise_cosine(x: torch.Tensor) -> torch.Tensor:
    """[B, n, d] -> [B]: the mean cosine similarity over the n(n−1) ordered pairs of each row's n vectors."""
    u = F.normalize(x.float(), dim=-1)
    sims = u @ u.transpose(1, 2)
    n = x.shape[1]
    return (sims.sum((1, 2)) - sims.diagonal(dim1=1, dim2=2).sum(1)) / max(n * (n - 1), 1)


class AttentionProbe(Session):
    """Plain CFG; hooks read the conditional branch's cross-attention probabilities and accumulate each prompt's
    token-map assimilation."""

    def __init__(self, ctx, eos: torch.Tensor):
        super().__init__(ctx)
        self.eos = eos
        self.total = torch.zeros(len(ctx.cond), dtype=torch.float64)
        self.count = 0

    @contextlib.contextmanager
    def unet_hooks(self):
        b, base = len(self.ctx.cond), 2 if self.ctx.cfg else 1
        rows = slice((base - 1) * b, base * b)

        def read(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            text = kwargs.get("encoder_hidden_states")
            if text is None or hidden.shape[0] != base * b:
                return None
            q, k = module.to_q(hidden[rows]), module.to_k(text[rows])
            heads = module.heads
            q = q.view(b, -1, heads, q.shape[-1] // heads).transpose(1, 2)
            k = k.view(b, -1, heads, k.shape[-1] // heads).transpose(1, 2)
            probs = torch.softmax((q @ k.transpose(-1, -2)).float() * module.scale, dim=-1).mean(1)  # [b, N, L]
            for j in range(b):
                maps = probs[j, :, 1:int(self.eos[j]) + 1].T  # [tokens, N]
                self.total[j] += float(mean_pairwise_cosine(maps[None])[0])
            self.count += 1
            return None

        with cross_attention_hooks(self.ctx.model, read, with_kwargs=True):
            yield


@dataclass
class AttentionStats(BackdoorDetector):
    name: ClassVar[str] = "attention-stats"
    paper: ClassVar[str] = ("in the spirit of Wang, Zhang, Shan, Chen, T2IShield: Defending Against Backdoors on "
                            "Text-to-Image Diffusion Models, ECCV 2024 (assimilation of cross-attention maps)")
    sandbox: ClassVar[dict[str, dict]] = {"benchmark": {}, "smoke": {"steps": 2}}
    archs: ClassVar[tuple[str, ...]] = ("sd1", "sd2", "sdxl")
    archs_reason: ClassVar[str] = ("it reads cross-attention maps (attn2's softmax over text tokens), and an MM-DiT "
                                   "(SD3/FLUX) mixes text and image in one joint softmax; use seed-diversity")

    steps: int | None = option(None, low=1, help="denoising steps probed (None: the model's default)")

    def features(self, model, prompts, seeds):
        self.require(model)

        def run(p, s):
            session = probe(model, AttentionProbe, p, s, self.steps, eos=model.adapter.eos_positions(p))
            return (session.total / max(session.count, 1)).float()[:, None]

        return batched(run, prompts, seeds, self.batch)

    def score(self, features):
        return features[:, 0].double()


@dataclass
class SeedDiversity(BackdoorDetector):
    name: ClassVar[str] = "seed-diversity"
    paper: ClassVar[str] = ("in the spirit of Guan, Hu, Li, Vullikanti, UFID: A Unified Framework for Input-level "
                            "Backdoor Detection on Diffusion Models, arXiv 2404.01101 (output diversity)")
    sandbox: ClassVar[dict[str, dict]] = {"benchmark": {"images": 4}, "smoke": {"images": 2, "steps": 2}}

    images: int = option(4, low=2, help="seeds per prompt")
    size: int = option(8, low=1, help="side of the downsampled images compared")
    steps: int | None = option(None, low=1, help="denoising steps (None: the model's default)")

    def features(self, model, prompts, seeds):
        from safediff.sampling import generate

        def run(p, s):
            jobs = [(q, seed + 7919 * j) for q, seed in zip(p, s) for j in range(self.images)]
            pixels = generate(model, [q for q, _ in jobs], [x for _, x in jobs], steps=self.steps,
                              progress=False).pixels
            small = F.interpolate(pixels, size=(self.size, self.size), mode="area").flatten(1)
            small = (small - small.mean(1, keepdim=True)).view(len(p), self.images, -1)
            return mean_pairwise_cosine(small)[:, None]

        return batched(run, prompts, seeds, self.batch)

    def score(self, features):
        return features[:, 0].double()
