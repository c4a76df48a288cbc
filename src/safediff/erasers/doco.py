"""DoCo: concept domain correction with a concept-preserving gradient (Wu, Zhou, Li, Zhang, Chen, Fu, Hu, Zhang;
AAAI 2025, arXiv 2405.15304; reference code yongliang-wu/DoCo, ``train.py``, ``gan.py``, ``gradient_clip.py``).

The output domain of the target concept c* is aligned with that of an anchor concept c_a by adversarial training.
On anchor images x₀ (drawn by the frozen model θo from the anchor prompts), with x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε and
x̂₀(ε̂) = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t the clean latent a prediction implies:

    D:  min_D  BCE(D(x̂₀(ε_θo(x_t, c_a))), 0) + BCE(D(x̂₀(ε_θ(x_t, c*))), 1)       ("real" = the anchor's domain)
    G:  L_adv = BCE(D(x̂₀(ε_θ(x_t, c*))), 0),     L_p = ‖ε_θ(x_t, c_a) − ε‖²   (prior preservation on the anchor)

and the concept-preserving gradient (gradient surgery, per parameter tensor): with g_a = ∇L_adv, g_p = ∇L_p,

    g_a ← g_a − λ (g_a·g_p / ‖g_p‖²) g_p     when g_a·g_p < 0        (the paper's projection)

then θ takes an AdamW step with g_a; D is a PatchGAN (convolutions of stride 2, LeakyReLU 0.2, batch norm after the
first block, Adam with β = (0.5, 0.999)) on the 4-channel latents, trained alone for the first ``warmup`` steps.
Gradients are clipped to norm 1 before the surgery (the reference's ``norm_grad``).

Prompt pairs (``erasers.training_prompts.prompt_pairs``): c* = each keyword in the concept's contexts, c_a = the
same prompt with the guide (the reference's ``caption_target`` "airplane+parachute": anchor captions with the
anchor word replaced). Reference deviations, offered as options: its surgery subtracts λ cos(g_a, g_p) ĝ_p (a unit
vector, whatever ‖g_a‖) instead of the projection (``surgery="reference"``); and it steps with the adjusted g_a alone
(as here), L_p steering the direction only. The discriminator has min(4, log₂ h − 2) stride-2 blocks so its last
map is at least 4 wide (the reference's four assume SD's 64×64 latents). Defaults: the README's nudity/object
commands: 2,000 steps, warm-up 1,000, batch 8, lr 6e-6 × 8 (``--scale_lr``) = 4.8e-5, D lr 1e-4, λ = 1,
trained parameters ``attn2.to_k``/``to_v`` (``--parameter_group cross-attn``). Runs checkpoint to ``checkpoint``
(θ, D and both optimizers' states) and resume bit-identically.

Other forward processes (no DoCo code exists for them; our mapping): x̂₀ is read from whatever the denoiser predicts
(``predicted_x0``: ε, v for SD 2.x 768, the velocity ε − x₀ of SD3/FLUX, where x̂₀ = x_σ − σ v̂), the prior term
regresses the adapter's training target, and the discriminator reads the model's latents (16 channels on SD3/FLUX);
``module`` names the parameters by role (``kv``: the MM-DiT's context K/V ``add_k_proj``/``add_v_proj``).
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
from safediff.erasers.modules import denoiser_keys, group_parameters
from safediff.erasers.training_prompts import prompt_pairs
from safediff.erasers.training import Fit, cycled, loss_summary
from safediff.errors import SafediffError
from safediff.options import option
from safediff.sampling import denoiser_output

SURGERY = ("projection", "reference", "none")


class PatchDiscriminator(torch.nn.Module):
    """PatchGAN on latents [B, C, h, w] -> logits [B, 1, h', w']: ``blocks`` stride-2 4x4 convolutions (64, 128,
    256, 512 channels; batch norm from the second), LeakyReLU 0.2, then a 4x4 convolution to one channel."""

    def __init__(self, channels: int, blocks: int):
        super().__init__()
        layers, width = [], channels
        for k in range(blocks):
            out = 64 * 2 ** k
            layers.append(torch.nn.Conv2d(width, out, 4, stride=2, padding=1))
            if k > 0:
                layers.append(torch.nn.BatchNorm2d(out))
            layers.append(torch.nn.LeakyReLU(0.2))
            width = out
        layers.append(torch.nn.Conv2d(width, 1, 4, padding=1))
        self.model = torch.nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def discriminator_blocks(size: int) -> int:
    """Stride-2 blocks for a latent ``size`` wide: as many of the reference's four as leave a map ≥ 4 wide."""
    return max(1, min(4, int(math.log2(size)) - 2))


def adjusted(g_a: torch.Tensor, g_p: torch.Tensor, lam: float, surgery: str) -> torch.Tensor:
    """The concept-preserving gradient for one tensor (unchanged when the gradients do not conflict)."""
    dot = torch.dot(g_a.flatten(), g_p.flatten())
    if surgery == "none" or dot >= 0:
        return g_a
    if surgery == "projection":
        return g_a - lam * dot / (g_p.pow(2).sum() + 1e-12) * g_p
    unit_a, unit_p = g_a / (g_a.norm() + 1e-8), g_p / (g_p.norm() + 1e-8)
    return g_a - lam * torch.dot(unit_a.flatten(), unit_p.flatten()) * unit_p


def predicted_x0(model, x_t: torch.Tensor, pred: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x̂₀ implied by the denoiser's prediction at x_t, for any forward process linear in (x₀, ε): with
    x_t = a x₀ + b ε and the training target c x₀ + d ε (read off the adapter's ``noised``/``training_target`` at
    unit inputs), x̂₀ = (d x_t − b ŷ) / (a d − b c). ε-prediction: (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t (DDPM's
    ``pred_original_sample``); v-prediction: √ᾱ_t x_t − √(1−ᾱ_t) v̂; flow matching: x_σ − σ v̂."""
    one = torch.ones((len(t), 1, 1, 1), device=x_t.device, dtype=torch.float32)
    zero = torch.zeros_like(one)
    a, b = model.adapter.noised(one, zero, t), model.adapter.noised(zero, one, t)
    c, d = model.adapter.training_target(one, zero, t), model.adapter.training_target(zero, one, t)
    return ((d * x_t.float() - b * pred.float()) / (a * d - b * c)).to(x_t.dtype)


@dataclass
class DoCo(Eraser):
    name: ClassVar[str] = "doco"
    paper: ClassVar[str] = ("Wu et al., Unlearning Concepts in Diffusion Model via Concept Domain Correction and "
                            "Concept Preserving Gradient, AAAI 2025 (arXiv 2405.15304)")
    # a few CPU minutes on the sandbox: 64 anchor images, 300 steps (150 of discriminator warm-up) of batch 8;
    # the reference's 2,000 steps of batch 8 are for SD 1.4 on a GPU; to be re-tuned on the v2 model
    sandbox: ClassVar[dict[str, dict]] = {
        "benchmark": {"iterations": 300, "warmup": 150, "n_images": 64, "lr": 1e-3, "d_lr": 1e-3},
        "demo": {"iterations": 60, "warmup": 20, "n_images": 16, "lr": 1e-3, "d_lr": 1e-3},
        "smoke": {"iterations": 2, "warmup": 1, "n_images": 2, "batch": 2, "lr": 1e-3}}
    zero_strength: ClassVar[dict] = {"lr": 0.0}

    module: str = option("kv", help="trained denoiser parameters: kv (reference cross-attn), xattn, noxattn, full")
    iterations: int = option(2000, low=1, high=1_000_000, help="steps (generator and discriminator)")
    warmup: int = option(1000, low=0, high=1_000_000, help="steps that train the discriminator alone")
    batch: int = option(8, low=1, high=4096)
    n_images: int = option(1000, low=1, high=100_000, help="anchor images drawn by the model (reference: 1,000)")
    lr: float = option(4.8e-5, low=0.0, high=1.0, help="AdamW lr of θ (README: 6e-6 x batch 8)")
    weight_decay: float = option(0.01, low=0.0, high=1.0, help="AdamW weight decay of θ")
    d_lr: float = option(1e-4, low=0.0, high=1.0, help="Adam lr of the discriminator")
    surgery_weight: float = option(1.0, low=0.0, high=100.0, help="λ of the concept-preserving gradient")
    surgery: str = option("projection", help="projection (paper), reference (the code's unit-vector step), none")
    max_grad_norm: float = option(1.0, low=0.0, high=1e6, help="gradient clipping before the surgery (0: off)")
    seed: int = 0
    checkpoint: str | None = option(None, hyperparameter=False)
    checkpoint_every: int = option(50, low=1, hyperparameter=False)

    def __post_init__(self):
        super().__post_init__()
        check_group(self.module, "eraser doco", trains="denoiser")
        if self.surgery not in SURGERY:
            raise SafediffError(f"eraser doco: surgery must be one of {', '.join(SURGERY)}, got '{self.surgery}'")
        self.losses: list[float] = []

    def touches(self, name: str) -> bool:
        return in_group(self.module, name)

    def compute(self, model, concepts: list[Concept], preserve, guide, progress):
        params = group_parameters(model, self.module)
        frozen = {n: p.detach().clone() for n, p in params.items()}
        run = DoCoRun(self, model, concepts, guide, denoiser_keys(model, frozen))
        discriminator = {f"discriminator.{n}": p for n, p in run.disc.named_parameters()}
        with Fit(self, model, params, {"noise": run.generator}, {"pairs": run.pairs}, progress, frozen=frozen,
                 side=discriminator) as fit:
            state = fit.state
            fit.start(torch.optim.AdamW([
                {"params": list(params.values()), "lr": self.lr, "weight_decay": self.weight_decay},
                {"params": list(run.disc.parameters()), "lr": self.d_lr, "weight_decay": 0.0, "betas": (0.5, 0.999)}]))
            fit.train(lambda it: run.step(it, params), backward=False)
            new = fit.trained()
        self.losses, resumed_at = list(state.losses), fit.resumed_at
        info = {"module": self.module, "pairs": run.pairs[:6], "discriminator_blocks": run.blocks,
                "conflicts_adjusted": run.conflicts, "steps": len(state.losses), "resumed_at_iteration": resumed_at,
                **loss_summary(state.losses)}
        return new, info


class DoCoRun:
    """Anchor images, the discriminator and one step of both players."""

    def __init__(self, eraser: DoCo, model, concepts: list[Concept], guide, frozen_denoiser: dict[str, torch.Tensor]):
        self.eraser, self.model = eraser, model
        self.pairs = prompt_pairs(concepts, guide)
        self.frozen_denoiser = frozen_denoiser
        g = torch.Generator().manual_seed(int(eraser.seed))
        anchors = list(dict.fromkeys(a for _, a in self.pairs))
        drawn = generated_images(model, anchors, eraser.n_images, g, batch_size=16)
        self.images, self.image_prompt = drawn.latents, drawn.captions
        self.targets_of = {a: [p for p, b in self.pairs if b == a] for a in anchors}
        self.generator = g
        channels, size = self.images.shape[1], min(self.images.shape[-2:])
        self.blocks = discriminator_blocks(size)
        with torch.random.fork_rng(devices=[]):  # the discriminator's initial weights, from the seed alone
            torch.manual_seed(int(eraser.seed))
            self.disc = PatchDiscriminator(channels, self.blocks).to(model.device)
        self.n_train = model.adapter.train_timesteps
        self.conflicts = 0

    def _clip(self, params: list[torch.nn.Parameter]) -> None:
        if self.eraser.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.eraser.max_grad_norm)

    def step(self, iteration: int, params: dict[str, torch.nn.Parameter]) -> tuple[torch.Tensor, dict]:
        e, model, g = self.eraser, self.model, self.generator
        idx = cycled(e.seed, len(self.images), iteration * e.batch, e.batch)
        x0 = self.images[idx]
        anchor_prompts = [self.image_prompt[i] for i in idx]
        target_prompts = [self.targets_of[a][int(torch.randint(len(self.targets_of[a]), (1,), generator=g))]
                          for a in anchor_prompts]
        t = torch.randint(self.n_train, (len(idx),), generator=g).to(x0.device)
        eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype).to(x0.device)
        x_t = model.adapter.noised(x0, eps, t)
        c_a = model.adapter.encode(anchor_prompts)
        with torch.no_grad():
            real = predicted_x0(model, x_t, denoiser_output(model, x_t, t, c_a, params=self.frozen_denoiser), t)
        out = denoiser_output(model, torch.cat([x_t, x_t]), torch.cat([t, t]),
                              Conditioning.cat([model.adapter.encode(target_prompts), c_a]))
        pred_target, pred_anchor = out.chunk(2)
        fake = predicted_x0(model, x_t, pred_target, t)
        theta = list(params.values())
        adversarial = torch.zeros(())
        if iteration >= e.warmup:
            logits = self.disc(fake.float())
            adversarial = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits))
            prior = F.mse_loss(pred_anchor.float(), model.adapter.training_target(x0, eps, t).float())
            g_p = torch.autograd.grad(prior, theta, retain_graph=True, allow_unused=True)
            g_a = torch.autograd.grad(adversarial, theta, allow_unused=True)
            self._set(theta, g_p)
            self._clip(theta)
            g_p = [p.grad.clone() if p.grad is not None else None for p in theta]
            self._set(theta, g_a)
            self._clip(theta)
            for p, gp in zip(theta, g_p):
                if p.grad is not None and gp is not None:
                    new = adjusted(p.grad, gp, e.surgery_weight, e.surgery)
                    self.conflicts += int(new is not p.grad)
                    p.grad = new
        real_logits, fake_logits = self.disc(real.float()), self.disc(fake.detach().float())
        d_loss = F.binary_cross_entropy_with_logits(real_logits, torch.zeros_like(real_logits)) + \
            F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
        d_grads = torch.autograd.grad(d_loss, list(self.disc.parameters()))
        self._set(list(self.disc.parameters()), d_grads)
        return (adversarial.detach() + d_loss.detach()), {"g": f"{float(adversarial.detach()):.4g}",
                                                          "d": f"{float(d_loss.detach()):.4g}"}

    @staticmethod
    def _set(params: list[torch.nn.Parameter], grads) -> None:
        for p, grad in zip(params, grads):
            p.grad = None if grad is None else grad.detach().clone()
