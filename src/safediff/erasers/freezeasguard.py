"""FreezeAsGuard: learn which denoiser tensors to freeze so that fine-tuning toward the illegal concept fails while
fine-tuning toward legal ones still works.

Paper: K. Huang, H. Wang, W. Gao, "FreezeAsGuard: Mitigating Illegal Adaptation of Diffusion Models via Selective
Tensor Freezing", arXiv:2405.17472 (2024). Reference code: pittisl/FreezeAsGuard (``src/mask_learner.py``; its
hyper-parameters from ``src/run_mask_learner.sh``).

The publisher releases the model θ_pre together with a mask m ∈ {0, 1}^N over its N denoiser tensors (the UNet, or
the SD3/FLUX transformer: the method only needs tensors and a denoising loss, so it runs on every architecture); a
tensor with m_i = 1 is frozen by the fine-tuning API. A user who fine-tunes gets θ = m ⊙ θ_pre + (1 − m) ⊙ θ_ft. The
mask is learned by bi-level optimisation, m relaxed to m = σ(x / T) (one logit x_i per tensor, temperature T):

    upper (publisher):  min_x  ½ [ −L_ill(θ(x)) + L_leg(θ(x)) ] + c_s (ρ − mean_i m_i)²
    lower (user):       θ_ft ∈ argmin  L_ill(θ) + L_leg(θ)           θ(x) = m ⊙ θ_pre + (1 − m) ⊙ θ_ft

with L_ill / L_leg the denoising loss (``safediff.finetune``) on images of the illegal concept(s) / the legal ones and
ρ the freezing ratio. As in the reference, θ_ft starts from a model fine-tuned on both domains (``relearn_steps``
AdamW steps of θ_ft alone, the reference's ``mixed_full_trainer``), then the two levels alternate: every
``user_interval``-th step (the first included) is a publisher step

    x ← x − η_m ∇_x ½[−L_ill + L_leg] − c_s ∇_x (ρ − mean m)²            (θ_ft fixed)

and the others are user steps θ_ft ← θ_ft − η_u ∇_{θ_ft}(L_ill + L_leg) / 2 (plain gradient descent, mixed batches).
Gradients come from autograd through θ(x); the reference writes the same chain rule by hand
(∂L/∂x_i = ⟨θ_pre,i − θ_ft,i, ∂L/∂θ_i⟩ m_i (1 − m_i) / T). Binarisation (``binarize``): ``top`` (default) freezes the
⌈ρ N⌉ tensors with the largest m, so the published ratio is exactly ρ; ``threshold`` freezes m > 0.5, the freezing
ratio the reference reports. x starts uniform in [0, 1) (reference), from the eraser's ``seed``.

What is published. The mask is the artefact: the edit's ``info.freeze`` holds ``frozen`` (the ``unet.…`` /
``transformer.…`` names), ``ratio`` and every tensor's soft score m_i. How "frozen" is enforced: fine-tuning in safediff
reads the masks of the applied edits (``finetune.frozen_by_edits``); the relearning attack leaves those tensors (and
LoRA on their modules) untouched unless ``honour_freeze=false`` (an attacker who ignores the publisher's API). The
weights themselves are unchanged, unless ``base`` names an eraser run first (the reference README's optional UCE step:
the mask is then learned on, and published with, the erased model and the edit holds that eraser's tensors).

Data (``safediff.imagesets``, ``source``): illegal = ``n_images`` images of the concepts; legal = ``n_images`` images
of the preserved concepts (``--preserve``, else each concept's preserve list), world renders or the model's own images
of each concept's word in its contexts. Multi-concept: yes (the illegal images are shared among the concepts).
Long fits checkpoint to ``checkpoint`` every ``checkpoint_every`` steps (``safediff erase``: next to ``--out``) and
resume bit-identically (the one training loop, ``erasers.training.train``, runs both phases). Defaults are the
reference's run script (ρ 0.2, T 0.2, c_s 5e3, η_m 10, η_u 1e-5, user interval 5, batch 16, 2,000
steps after 2,000 relearning steps at lr 1e-5, 100 images per domain) for SD 1.5 on a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from safediff.adapters import Conditioning
from safediff.erasers.base import Eraser, weights_set_to
from safediff.erasers.prompts import as_concept
from safediff.erasers.training import TrainingState, loss_summary, run_fingerprint, train
from safediff.errors import SafediffError
from safediff.finetune import diffusion_loss
from safediff.imagesets import check_source, shared_images
from safediff.options import option

BINARIZE = ("top", "threshold")


def user_view(pre: dict[str, torch.Tensor], ft: dict[str, torch.Tensor], m: torch.Tensor, names: list[str]
              ) -> dict[str, torch.Tensor]:
    """What a user fine-tunes under the (relaxed) mask: θ = m ⊙ θ_pre + (1 − m) ⊙ θ_ft, one m_k per tensor."""
    return {n: m[k] * pre[n] + (1 - m[k]) * ft[n] for k, n in enumerate(names)}


@dataclass
class FreezeAsGuard(Eraser):
    name: ClassVar[str] = "freezeasguard"
    paper: ClassVar[str] = ("Huang, Wang, Gao, FreezeAsGuard: Mitigating Illegal Adaptation of Diffusion Models via "
                            "Selective Tensor Freezing, arXiv 2405.17472 (2024)")
    # sandbox: a few CPU minutes on the 7.0 M-parameter UNet (world renders; gradient steps sized for it, untuned)
    sandbox: ClassVar[dict[str, dict]] = {
        "benchmark": {"source": "world", "n_images": 32, "batch": 8, "relearn_steps": 100, "relearn_lr": 1e-4,
                      "iterations": 300, "user_lr": 1e-3},
        "demo": {"source": "world", "n_images": 16, "batch": 8, "relearn_steps": 20, "relearn_lr": 1e-4,
                 "iterations": 40, "user_lr": 1e-3},
        "smoke": {"source": "world", "n_images": 4, "batch": 4, "relearn_steps": 1, "iterations": 3,
                  "user_interval": 2, "base": "uce"},
    }
    zero_strength: ClassVar[dict] = {"base": "", "ratio": 0.0}

    ratio: float = option(0.2, low=0.0, high=1.0, help="ρ: share of the denoiser's tensors frozen")
    temperature: float = option(0.2, low=1e-6, help="T of the mask relaxation m = σ(x / T)")
    sparsity: float = option(5e3, low=0.0, help="c_s: weight of (ρ − mean m)²")
    mask_lr: float = option(10.0, low=0.0, help="η_m: step size of the mask logits")
    user_lr: float = option(1e-5, low=0.0, help="η_u: the simulated user's learning rate")
    user_interval: int = option(5, low=1, help="every user_interval-th step is a mask step")
    iterations: int = option(2000, low=1, help="bi-level steps")
    relearn_steps: int = option(2000, low=0, help="AdamW steps of θ_ft on both domains before mask learning")
    relearn_lr: float = option(1e-5, low=0.0, help="learning rate of those steps")
    batch: int = option(16, low=2, help="images per step, half illegal, half legal")
    n_images: int = option(100, low=1, help="images per domain")
    source: str = option("base", help="images: world (sandbox renders), base (the model's own), folder")
    images: str = option("", help="folder of illegal-concept images (source=folder)")
    legal_images: str = option("", help="folder of legal images (source=folder)")
    binarize: str = option("top", help="top: the ⌈ρN⌉ largest m; threshold: m > 0.5 (the reference's ratio)")
    base: str = option("", help="eraser spec run first (e.g. uce); '' publishes the weights unchanged")
    seed: int = 0
    checkpoint: str | None = option(None, hyperparameter=False)  # safetensors path (resume)
    checkpoint_every: int = option(100, low=1, hyperparameter=False)

    def __post_init__(self):
        super().__post_init__()
        check_source(self.source, self.images, "freezeasguard")
        if self.source == "folder" and not self.legal_images:
            raise SafediffError("freezeasguard: source=folder needs legal_images=FOLDER too")
        if self.binarize not in BINARIZE:
            raise SafediffError(f"freezeasguard: binarize must be one of {', '.join(BINARIZE)}, got {self.binarize!r}")
        from safediff.erasers import build_eraser

        self._base_eraser = build_eraser(self.base) if self.base else None
        if self._base_eraser is not None and self._base_eraser.name == self.name:
            raise SafediffError("freezeasguard: base must be another eraser")

    def touches(self, name: str) -> bool:
        return self._base_eraser is not None and self._base_eraser.touches(name)

    def compute(self, model, concepts, preserve, guide, progress):
        legal = [as_concept(p) for p in (preserve if preserve is not None else
                                         dict.fromkeys(p for c in concepts for p in c.preserve))]
        legal = [c for c in legal if c.name not in {k.name for k in concepts}]
        if not legal:
            raise SafediffError("freezeasguard needs legal concepts to keep learnable: give --preserve (e.g. blue) "
                                "or a concept with a preserve list")
        base = self._base_eraser
        edit = base.fit(model, concepts, preserve, guide, progress=progress) if base is not None else None
        published = dict(edit.tensors) if edit is not None else {}
        with weights_set_to(model, published), torch.enable_grad():
            info = self._learn(model, concepts, legal, progress)
        info["base"] = None if edit is None else {"method": edit.method, "hyperparameters":
                                                  edit.metadata["hyperparameters"], "info": edit.metadata["info"]}
        return published, info

    def _learn(self, model, concepts, legal, progress: bool = False) -> dict:
        """The bi-level loop (module docstring) on the model as it is; returns the info with the mask. One run of
        ``training.train`` over ``relearn_steps + iterations`` steps: its state (θ_ft, the relearning's AdamW moments,
        the generator, the mask logits x and the loss history) is checkpointed and resumed bit-identically."""
        g = torch.Generator(device="cpu").manual_seed(int(self.seed))
        with torch.no_grad():
            ill = shared_images(model, concepts, self.n_images, g, self.source, self.images)
            leg = shared_images(model, legal, self.n_images, g, self.source, self.legal_images)
            ill_cond, leg_cond = model.adapter.encode(ill.captions), model.adapter.encode(leg.captions)
        prefix = model.adapter.denoiser_component
        names = [n for n, _ in model.denoiser.named_parameters()]
        pre = {n: p.detach() for n, p in model.denoiser.named_parameters()}
        ft = {n: p.detach().clone().requires_grad_(True) for n, p in pre.items()}
        half = self.batch // 2

        def batch_loss(params) -> tuple[torch.Tensor, torch.Tensor]:
            i = torch.randint(len(ill), (half,), generator=g)
            j = torch.randint(len(leg), (self.batch - half,), generator=g)
            x0 = torch.cat([ill.latents[i], leg.latents[j]])
            losses = diffusion_loss(model, x0, Conditioning.cat([ill_cond[i], leg_cond[j]]), g, params,
                                    per_sample=True)
            return losses[:half].mean(), losses[half:].mean()

        state = TrainingState(ft, torch.optim.AdamW(list(ft.values()), lr=self.relearn_lr), {"g": g}, losses=[])
        fingerprint = run_fingerprint(self, model, {"concepts": [c.name for c in concepts],
                                                    "legal": [c.name for c in legal]})
        resumed_at = state.iteration if self.checkpoint and state.load(self.checkpoint, fingerprint) else None

        def step(i: int) -> tuple[torch.Tensor, dict]:
            if i < self.relearn_steps:  # θ_ft on both domains, AdamW (the loop applies it)
                l_ill, l_leg = batch_loss(ft)
                loss = (l_ill + l_leg) / 2
                loss.backward(inputs=list(ft.values()))
                return loss.detach(), {"phase": "relearn"}
            if i == self.relearn_steps:  # x starts uniform in [0, 1)
                state.carried["x"] = torch.rand(len(names), generator=g)
                state.carried["history"] = torch.zeros(0, 2, dtype=torch.float64)
            x = state.carried["x"].requires_grad_(True)
            m = torch.sigmoid(x / self.temperature)
            l_ill, l_leg = batch_loss(user_view(pre, ft, m, names))
            if (i - self.relearn_steps) % self.user_interval == 0:  # publisher: the mask
                objective = self.mask_lr * (-l_ill + l_leg) / 2 + self.sparsity * (self.ratio - m.mean()) ** 2
                (grad,) = torch.autograd.grad(objective, [x])
                with torch.no_grad():
                    x -= grad
            else:  # user: θ_ft by gradient descent (no .grad is set, so the AdamW step leaves θ_ft alone)
                grads = torch.autograd.grad((l_ill + l_leg) / 2, list(ft.values()))
                with torch.no_grad():
                    for p, d in zip(ft.values(), grads):
                        p -= self.user_lr * d
            pair = torch.tensor([[float(l_ill.detach()), float(l_leg.detach())]], dtype=torch.float64)
            state.carried.update(x=x.detach(), history=torch.cat([state.carried["history"], pair]))
            return ((l_ill + l_leg) / 2).detach(), {"phase": "mask"}

        train(state, self.relearn_steps + self.iterations, step, checkpoint=self.checkpoint,
              checkpoint_every=self.checkpoint_every, fingerprint=fingerprint, desc=self.name, progress=progress,
              backward=False)
        x, history = state.carried["x"], state.carried["history"].tolist()
        relearn_losses = state.losses[:self.relearn_steps]
        scores = torch.sigmoid(x.detach() / self.temperature)
        frozen = [f"{prefix}.{n}" for n in self._binarized(names, scores)]
        info = {"freeze": {"frozen": frozen, "ratio": len(frozen) / len(names), "tensors": len(names),
                           "binarize": self.binarize,
                           "frozen_values": sum(pre[n.removeprefix(f"{prefix}.")].numel() for n in frozen),
                           "total_values": sum(t.numel() for t in pre.values()),
                           "scores": {f"{prefix}.{n}": round(float(s), 6) for n, s in zip(names, scores)}},
                "images": {"illegal": len(ill), "legal": len(leg), "source": self.source,
                           "legal_concepts": [c.name for c in legal]},
                "relearn_loss": loss_summary(relearn_losses),
                "loss_illegal": loss_summary([h[0] for h in history]),
                "loss_legal": loss_summary([h[1] for h in history]), "resumed_at_iteration": resumed_at}
        return info

    def _binarized(self, names: list[str], scores: torch.Tensor) -> list[str]:
        if self.binarize == "threshold":
            chosen = (scores > 0.5).nonzero().flatten().tolist()
        else:
            k = math.ceil(self.ratio * len(names) - 1e-9)
            chosen = torch.argsort(scores, descending=True, stable=True)[:k].tolist()
        return sorted(names[i] for i in chosen)

