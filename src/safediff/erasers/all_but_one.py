"""All but One: surgical concept erasing with model preservation (Hong, Lee, Woo, "All but One: Surgical Concept
Erasing with Model Preservation in Text-to-Image Diffusion Models", AAAI 2024).

No public code was found: this is implemented from the paper's description. Classifier-free guidance steers with the
guidance term ε(x_t, c) − ε(x_t, ∅); erasing by fine-tuning the conditional prediction alone (ESD) also moves the
unconditional prediction ε(x_t, ∅), which every prompt's sampling uses, and so degrades the whole model. All but One
updates only the guidance term, toward the term of a user-chosen replacement concept c_r, and constrains the drift of
the unconditional prediction:

    L_erase    = ‖[ε_θ(x_t, c_e, t) − ε_θ(x_t, ∅, t)] − [ε_θ*(x_t, c_r, t) − ε_θ*(x_t, ∅, t)]‖²
    L_preserve = ‖ε_θ(x_t, ∅, t) − ε_θ*(x_t, ∅, t)‖²
    L          = L_erase + λ L_preserve

θ the model being fine-tuned, θ* the frozen original, c_e the concept (each keyword, drawn per iteration), c_r its
replacement: the concept's guide (or ``guide``); with the empty replacement "" the target guidance term is zero,
i.e. the concept's prompt is made to predict what the unconditional branch predicts. x_t comes from partial DDIM
sampling of c_e with the frozen model (classifier-free guidance 3, a random step of S, t drawn in its bin: ESD's
sampling, ``sampling.Trajectories.draw``), so the update is made where the concept's trajectories pass.

Our choices where the paper's settings were not available to us: the trained parameters are the cross-attention
(``variant="x"``, every ``attn2`` parameter: the layers that read the concept's text; ESD's ``u`` and ``x-strict``
sets as options), Adam with lr 1e-5 and 1000 iterations (ESD's), λ = 1. The paper's second application, purifying
real images by DDIM inversion with the edited model, is not part of an eraser and is not implemented.

SD3 / FLUX (our mapping): the parameter sets are ESD's by role (``esd.variant_group``: ``x`` every block's joint
attention, ``x-strict`` the joint blocks' context K/V, ``u`` the rest), x_t is sampled with the model's
flow-matching Euler and the predictions are velocities (the guidance term is their difference just the same). On
FLUX, whose sampling runs one branch by default, ∅ is the empty prompt's prediction, as FLUX's true CFG uses it.

Several concepts at once: yes; each iteration draws one keyword of one concept, with that concept's replacement.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from safediff.adapters import Conditioning
from safediff.erasers.base import Eraser
from safediff.adapters.roles import in_group
from safediff.erasers.esd import variant_group
from safediff.erasers.modules import denoiser_group
from safediff.erasers.training import fit_denoiser, loss_summary
from safediff.errors import SafediffError
from safediff.options import option
from safediff.sampling import Trajectories, denoiser_output

logger = logging.getLogger("safediff")


@dataclass
class AllButOne(Eraser):
    """All but One (see the module docstring)."""

    name: ClassVar[str] = "all-but-one"
    paper: ClassVar[str] = ("Hong, Lee, Woo, All but One: Surgical Concept Erasing with Model Preservation in "
                            "Text-to-Image Diffusion Models, AAAI 2024")
    # benchmark: 150 iterations with x_t from at most 10 DDIM steps (~0.6 s each on the 4.3M-parameter sandbox UNet
    # at 16x16 latents on one CPU core, measured on its architecture with random weights), about 1.5 CPU-minutes;
    # lr 1e-3 as ESD-x's sandbox setting (the same parameters)
    sandbox: ClassVar[dict[str, dict]] = {
        "benchmark": {"iterations": 150, "lr": 1e-3, "ddim_steps": 10},
        "demo": {"iterations": 40, "lr": 1e-3, "ddim_steps": 10},
        "smoke": {"iterations": 2, "lr": 1e-3, "ddim_steps": 2}}
    zero_strength: ClassVar[dict] = {"lr": 0.0}

    variant: str = option("x", help="trained parameters: 'x' (attn2), 'u' (ESD-u's set) or 'x-strict' (attn2 K/V)")
    iterations: int = option(1000, low=1, help="Adam steps")
    lr: float = option(1e-5, low=0.0, help="learning rate")
    preserve_weight: float = option(1.0, low=0.0, help="λ, weight of the unconditional drift")
    start_guidance: float = option(3.0, low=0.0, help="CFG scale of the partial DDIM sampling")
    ddim_steps: int | None = option(None, low=1, help="S, DDIM steps of x_t's sampling (None: the model's default)")
    seed: int = 0
    checkpoint: str | None = option(None, hyperparameter=False)  # safetensors path (resume)
    checkpoint_every: int = option(100, low=1, hyperparameter=False)

    def __post_init__(self):
        super().__post_init__()
        if self.variant not in ("x", "u", "x-strict"):
            raise SafediffError(f"all-but-one: unknown variant '{self.variant}'; accepted: x, u, x-strict")
        self.losses: list[float] = []

    def touches(self, name: str) -> bool:
        return in_group(variant_group(self.variant), name)

    def compute(self, model, concepts, preserve, guide, progress):
        if preserve is not None:
            logger.warning("All but One preserves the unconditional prediction; preserve prompts are ignored")
        pairs = [(w, c.guide if guide is None else guide) for c in concepts for w in c.keywords if w.strip()]
        if not pairs:
            raise SafediffError("no concept keywords to erase; give at least one concept with a keyword")
        trajectories = Trajectories(model, self.ddim_steps)
        with torch.no_grad():
            erase = model.adapter.encode([w for w, _ in pairs])
            replace = model.adapter.encode([r for _, r in pairs])
            uncond = model.adapter.encode_negative(None, 1)
        params = denoiser_group(model, variant_group(self.variant))
        frozen = {n: p.detach().clone() for n, p in params.items()}
        g = torch.Generator(device="cpu").manual_seed(int(self.seed))
        e = self

        def step(_: int):
            k = int(torch.randint(len(pairs), (1,), generator=g))
            c_e, c_r = erase[k:k + 1], replace[k:k + 1]
            _, t, x = trajectories.draw(g, c_e, uncond, e.start_guidance, frozen)
            with torch.no_grad():
                r_u, r_c = denoiser_output(model, torch.cat([x, x]), t, Conditioning.cat([uncond, c_r]),
                                           params=frozen).chunk(2)
            p_u, p_e = denoiser_output(model, torch.cat([x, x]), t, Conditioning.cat([uncond, c_e])).chunk(2)
            loss = F.mse_loss(p_e - p_u, r_c - r_u) + e.preserve_weight * F.mse_loss(p_u, r_u)
            return loss, {"t": t}

        def optimizer():
            return torch.optim.Adam(list(params.values()), lr=e.lr)

        new, state, resumed_at = fit_denoiser(self, model, params, optimizer, step, {"training": g},
                                              {"pairs": pairs}, progress, frozen=frozen)
        self.losses = list(state.losses)
        info = {"pairs": [list(p) for p in pairs], "variant": self.variant, "ddim_steps": trajectories.steps,
                "height": trajectories.height, "width": trajectories.width, "trained_tensors": len(params),
                "resumed_at_iteration": resumed_at, **loss_summary(state.losses)}
        return new, info
