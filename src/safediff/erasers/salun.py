"""SalUn: saliency unlearning (Fan, Liu, Zhang, Wong, Wei, Liu; ICLR 2024, arXiv 2310.12508; reference code
OPTML-Group/Unlearn-Saliency, ``SD/train-scripts/generate_mask.py`` and ``random_label.py`` / ``nsfw_removal.py``).

1. Weight saliency. Over the forget set D_f (images x of the concept, prompts c), with x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε,
   t uniform, the forgetting loss and its gradient magnitude per weight:

       ℓ_f(θ) = −Σ_{D_f} ‖ε − [(1 + w) ε_θ(x_t, c) − w ε_θ(x_t, ∅)]‖²,      g = |∇_θ ℓ_f(θ_o)|

   m_S = 1(g ≥ γ) with γ the value that keeps the ``mask_fraction`` share of the weights (the paper: the most
   salient half).
2. Random-label unlearning restricted to the mask, θ_u = θ_o + m_S ⊙ Δθ:

       L(θ) = E_{D_f, t, ε} ‖ε_θ(x_t, c) − sg[ε_θ(x_t, c′)]‖² + α E_{D_r, t, ε} ‖ε_θ(x_t^r, c_r) − ε‖²

   c′ ≠ c a substitute prompt; gradients are multiplied by m_S before each Adam step.

Data (drawn by the given model, ``imagesets.generated_images``): D_f = ``n_forget`` images of the concept's
keywords in its contexts (the reference's 800 "a photo of a nude person" images, or a class's images); D_r =
``n_retain`` images of the preserved concepts in their contexts (the class script's other classes), or of the guide
prompts when nothing is preserved (the NSFW script's "a photo of a person wearing clothes"). c′: ``pseudo="guide"``
(default; the NSFW script's choice, the prompt with the guide instead of the keyword) or ``"random"`` (the class
script's random label: the keyword replaced by a preserved concept of the concept's own category, drawn per sample).

Reference deviation: the released mask code ranks |g| in ascending order and keeps ranks below the threshold, i.e.
the *least* salient half; ``salient="largest"`` (default) is the paper's rule, ``salient="smallest"`` the code's.
The mask is computed over the trained parameters (``module``; the reference's ``full`` = every UNet weight, where the
two agree). Ties at γ are all kept. Defaults: the class README's command (``--train_method full --alpha 0.5 --lr 1e-5
--epochs 5``), batch 8, w = 7.5, mask fraction 0.5, Adam. Runs checkpoint to ``checkpoint`` and resume
bit-identically (the mask and the data are recomputed from the seed).

SD3 / FLUX (no SalUn code exists for them; our mapping): x_t and the regression target are the adapter's forward
process and training target (flow matching: x_σ = (1 − σ) x₀ + σ ε, the velocity ε − x₀ in place of ε; the guided
prediction of the saliency loss is linear, so it is taken on velocities), and ``module`` names the MM-DiT's
parameters by role (``full``: every transformer parameter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from safediff.adapters import Conditioning
from safediff.concepts import Concept
from safediff.erasers.base import Eraser
from safediff.imagesets import generated_images
from safediff.adapters.roles import check_group, in_group
from safediff.erasers.modules import group_parameters
from safediff.erasers.prompts import as_concept, replace_word, words_of
from safediff.erasers.training_prompts import prompt_pairs, retain_prompts
from safediff.erasers.training import Fit, loss_summary, shuffled
from safediff.errors import SafediffError
from safediff.options import option
from safediff.sampling import denoiser_output

SALIENT = ("largest", "smallest")
PSEUDO = ("guide", "random")


def saliency_mask(grads: dict[str, torch.Tensor], fraction: float, salient: str) -> dict[str, torch.Tensor]:
    """Bool masks keeping the ``fraction`` share of all elements with the largest (or smallest) |g|, jointly over
    every tensor; ties at the threshold are kept."""
    flat = torch.cat([g.abs().flatten().float() for g in grads.values()])
    k = int(len(flat) * fraction)
    if k == 0:
        return {n: torch.zeros_like(g, dtype=torch.bool) for n, g in grads.items()}
    if salient == "largest":
        threshold = torch.kthvalue(flat, len(flat) - k + 1).values
        return {n: g.abs() >= threshold for n, g in grads.items()}
    threshold = torch.kthvalue(flat, k).values
    return {n: g.abs() <= threshold for n, g in grads.items()}


@dataclass
class SalUn(Eraser):
    name: ClassVar[str] = "salun"
    paper: ClassVar[str] = ("Fan et al., SalUn: Empowering Machine Unlearning via Gradient-based Weight Saliency in "
                            "Both Image Classification and Generation, ICLR 2024 (arXiv 2310.12508)")
    # a few CPU minutes on the sandbox: 64 + 64 generated images, 10 epochs of 8 batches of 8 at lr 1e-4 (the
    # reference's 5 epochs at 1e-5 are for SD 1.4's 860M weights on a GPU); to be re-tuned on the v2 model
    sandbox: ClassVar[dict[str, dict]] = {"benchmark": {"n_forget": 64, "n_retain": 64, "epochs": 10, "lr": 1e-4},
                                          "demo": {"n_forget": 16, "n_retain": 16, "epochs": 4, "lr": 1e-4},
                                          "smoke": {"n_forget": 2, "n_retain": 2, "batch": 2, "epochs": 1,
                                                    "lr": 1e-3}}
    zero_strength: ClassVar[dict] = {"lr": 0.0}

    module: str = option("full", help="trained denoiser parameters: full (reference), xattn, kv, noxattn")
    n_forget: int = option(800, low=1, high=100_000, help="images of the concept (D_f)")
    n_retain: int = option(800, low=1, high=100_000, help="images of what is kept (D_r)")
    batch: int = option(8, low=1, high=4096)
    epochs: int = option(5, low=1, high=10_000, help="passes over D_f")
    lr: float = option(1e-5, low=0.0, high=1.0, help="Adam learning rate")
    alpha: float = option(0.5, low=0.0, high=1e4, help="α: weight of the retain loss")
    mask_guidance: float = option(7.5, low=0.0, high=100.0, help="w of the saliency loss's guided prediction")
    mask_fraction: float = option(0.5, low=0.0, high=1.0, help="share of the weights the mask keeps")
    salient: str = option("largest", help="largest (paper) or smallest (the released mask code's ranking)")
    pseudo: str = option("guide", help="c′: guide (NSFW script) or random (a preserved concept, class script)")
    seed: int = 0
    checkpoint: str | None = option(None, hyperparameter=False)
    checkpoint_every: int = option(50, low=1, hyperparameter=False)

    def __post_init__(self):
        super().__post_init__()
        check_group(self.module, "eraser salun", trains="denoiser")
        for value, accepted, what in ((self.salient, SALIENT, "salient"), (self.pseudo, PSEUDO, "pseudo")):
            if value not in accepted:
                raise SafediffError(f"eraser salun: {what} must be one of {', '.join(accepted)}, got '{value}'")
        self.losses: list[float] = []

    def touches(self, name: str) -> bool:
        return in_group(self.module, name)

    def compute(self, model, concepts: list[Concept], preserve, guide, progress):
        run = SalUnRun(self, model, concepts, preserve, guide)
        params = group_parameters(model, self.module)
        frozen = {n: p.detach().clone() for n, p in params.items()}
        extra = {"forget": run.forget_prompts, "retain": run.retain_prompts}
        with Fit(self, model, params, {"data": run.generator}, extra, progress, frozen=frozen) as fit:
            state = fit.state
            mask = run.mask(params)
            fit.start(torch.optim.Adam(list(params.values()), lr=self.lr))
            per_epoch = math.ceil(self.n_forget / self.batch)
            fit.train(lambda it: run.step(it, per_epoch, params, mask), self.epochs * per_epoch, backward=False)
            new = fit.trained()
        self.losses, resumed_at = list(state.losses), fit.resumed_at
        kept = sum(int(m.sum()) for m in mask.values())
        info = {"module": self.module, "mask_kept": kept, "mask_size": sum(m.numel() for m in mask.values()),
                "forget_prompts": run.forget_prompts[:6], "retain_prompts": run.retain_prompts[:6],
                "steps": len(state.losses), "resumed_at_iteration": resumed_at, **loss_summary(state.losses)}
        return new, info


class SalUnRun:
    """The data (generated once from the seed), the saliency pass and one training step."""

    def __init__(self, eraser: SalUn, model, concepts: list[Concept], preserve, guide):
        self.eraser, self.model = eraser, model
        pairs = prompt_pairs(concepts, guide)
        self.forget_prompts = [p for p, _ in pairs]
        self.guide_of = dict(pairs)
        preserved = retain_prompts(concepts, preserve)
        self.retain_prompts = preserved if preserved != [""] else list(dict.fromkeys(g for _, g in pairs))
        self.words = [w for c in concepts for w in words_of(c) if w.strip()]
        self.substitutes = self._substitutes(concepts, preserve) if eraser.pseudo == "random" else []
        g = torch.Generator().manual_seed(int(eraser.seed))
        forget = generated_images(model, self.forget_prompts, eraser.n_forget, g, batch_size=16)
        retain = generated_images(model, self.retain_prompts, eraser.n_retain, g, batch_size=16)
        self.forget, self.forget_of = forget.latents, forget.captions
        self.retain, self.retain_of = retain.latents, retain.captions
        self.generator = g  # noise, timesteps and substitutes from here on (checkpointed)
        self.n_train = model.adapter.train_timesteps
        with torch.no_grad():
            self.uncond = model.adapter.encode_negative(None, 1)

    def _substitutes(self, concepts: list[Concept], preserve) -> list[str]:
        categories = {c.category for c in concepts}
        items = [p for c in concepts for p in c.preserve] if preserve is None else list(preserve)
        out = [as_concept(i).keywords[0] for i in dict.fromkeys(items) if as_concept(i).category in categories]
        if not out:
            raise SafediffError("eraser salun: pseudo=random needs preserved concepts of the erased concept's own "
                                "category (give --preserve or use pseudo=guide)")
        return out

    def _pseudo(self, prompt: str) -> str:
        if self.eraser.pseudo == "guide":
            return self.guide_of[prompt]
        sub = self.substitutes[int(torch.randint(len(self.substitutes), (1,), generator=self.generator))]
        for w in self.words:
            prompt = replace_word(prompt, w, sub)
        return prompt

    def _draw(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, t, ε) for a batch of latents; t and ε from the run's generator."""
        t = torch.randint(self.n_train, (len(x0),), generator=self.generator).to(x0.device)
        eps = torch.randn(x0.shape, generator=self.generator, dtype=x0.dtype).to(x0.device)
        return self.model.adapter.noised(x0, eps, t), t, eps

    def mask(self, params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
        """m_S from the forget set (gradients summed over its batches)."""
        e, model = self.eraser, self.model
        sums = {n: torch.zeros_like(p) for n, p in params.items()}
        w = e.mask_guidance
        for start in range(0, len(self.forget), e.batch):
            x0 = self.forget[start:start + e.batch]
            x_t, t, eps = self._draw(x0)
            cond = model.adapter.encode(self.forget_of[start:start + e.batch])
            uncond = Conditioning(self.uncond.embeds.expand(len(x0), -1, -1),
                                  None if self.uncond.pooled is None else self.uncond.pooled.expand(len(x0), -1))
            both = denoiser_output(model, torch.cat([x_t, x_t]), torch.cat([t, t]), Conditioning.cat([cond, uncond]))
            e_c, e_u = both.chunk(2)
            loss = -F.mse_loss(((1 + w) * e_c - w * e_u).float(), model.adapter.training_target(x0, eps, t).float())
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for (n, _), g in zip(params.items(), grads):
                if g is not None:
                    sums[n] += g
        return saliency_mask(sums, e.mask_fraction, e.salient)

    def step(self, iteration: int, per_epoch: int, params: dict[str, torch.nn.Parameter],
             mask: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        e, model = self.eraser, self.model
        epoch, start = divmod(iteration, per_epoch)
        order = shuffled(e.seed, epoch, e.n_forget)
        f_idx = order[start * e.batch:(start + 1) * e.batch].tolist()
        r_idx = [(iteration * e.batch + j) % len(self.retain) for j in range(len(f_idx))]
        x0_f, x0_r = self.forget[f_idx], self.retain[r_idx]
        x_f, t_f, _ = self._draw(x0_f)
        x_r, t_r, eps_r = self._draw(x0_r)
        forget_prompts = [self.forget_of[i] for i in f_idx]
        cond_f = model.adapter.encode(forget_prompts)
        cond_r = model.adapter.encode([self.retain_of[i] for i in r_idx])
        with torch.no_grad():
            pseudo = denoiser_output(model, x_f, t_f, model.adapter.encode([self._pseudo(p) for p in forget_prompts]))
        out = denoiser_output(model, torch.cat([x_f, x_r]), torch.cat([t_f, t_r]), Conditioning.cat([cond_f, cond_r]))
        pred_f, pred_r = out[:len(f_idx)], out[len(f_idx):]
        forget = F.mse_loss(pred_f.float(), pseudo.float())
        retain = F.mse_loss(pred_r.float(), model.adapter.training_target(x0_r, eps_r, t_r).float())
        loss = forget + e.alpha * retain
        loss.backward()
        with torch.no_grad():
            for n, p in params.items():
                if p.grad is not None:
                    p.grad.mul_(mask[n])
        return loss.detach(), {"forget": f"{float(forget.detach()):.4g}"}

