"""SPM: the concept Semi-Permeable Membrane (Lyu, Yang, Hong, Chen, Jin, He, Xue, Han, Ding, "One-dimensional Adapter
to Rule Them All: Concepts, Diffusion Models and Erasing Applications", CVPR 2024, arXiv 2312.16145; reference code
Con6924/SPM, ``train_spm.py``).

The membrane. Every Linear and Conv2d inside the UNet's transformer blocks (diffusers' ``Transformer2DModel``:
``proj_in``, self- and cross-attention ``to_q/k/v/out``, the feed-forward, ``proj_out``) gets a rank-r adapter, r = 1
("one-dimensional"):

    W x  ->  W x + (α/r) U D x,     U ∈ R^{d_out×r} (zeros), D ∈ R^{r×d_in(×k×k)} (Kaiming-uniform, a = √5), α = 1

Only U and D are trained; the model's weights stay frozen (the trained model θ' is θ with its membrane).

Training, per iteration (reference ``train_spm.py``; θ the frozen model, θ' θ with the membrane):
- a target c is drawn among the concepts' keywords (several concepts train one membrane), its guide n ("" = the
  unconditional prompt; the reference's ``neutral``);
- x_t by partial DDIM sampling from noise (classifier-free guidance 3 on c) at a random one of S = 30 steps, with the
  membrane on (``sample_with="trained"``, the reference) or off (``"frozen"``), t drawn in that step's DDPM bin
  (``sampling.Trajectories.draw``);
- erasing:      L_erase = ‖ε_θ'(x_t, c, t) − [ε_θ(x_t, n, t) − η (ε_θ(x_t, c, t) − ε_θ(x_t, n, t))]‖²   (η = 1)
- latent anchoring: M = 4 surrogate conditionings a_m are drawn in the text-embedding space: a Gaussian direction over
  the whole conditioning, accepted with probability 1 − cos(a, e_c) (directions far from the target are preferred),
  scaled to ‖e_c‖·U(0.8, 1.2) (SDXL: the pooled embedding likewise);
                L_LA = (1/M) Σ_m ‖ε_θ'(x_t, a_m, t) − ε_θ(x_t, a_m, t)‖²
- L = L_erase + λ L_LA (λ = 1000); AdamW (lr 1e-4, weight decay 0.01; the reference uses bitsandbytes' 8-bit AdamW),
  diffusers' cosine schedule with 3 hard restarts after 500 warm-up iterations, 3000 iterations.

Edit and Facilitated Transport. A safediff edit is a dense weight delta, so the edit is the merged membrane:
W + (α/r) U D for every adapted weight. Merged, the membrane acts on every prompt at full strength: the paper's
*Facilitated Transport* is lost, exactly as the reference README says of loading an SPM as a plain LoRA (WebUI,
the demo notebook). Facilitated Transport acts at inference (it scales the membrane by how close the prompt is to the
erased concept), so it is the guard ``spm`` (``safediff.guards.spm``), which reads this edit and applies the same
membrane per prompt with its transport rate: both forms are available and measured the same way. SPMs transfer to
other models of the same architecture in the reference; a safediff edit is tied to its base weights, so transfer
means refitting (or exporting the delta with ``Edit.export_lora``).

Choices and deviations from the reference code:
- t: the reference takes the DDPM timestep T − 1 − ⌊k T/S⌋ for k ∈ [1, S) DDIM steps done, one bin above where x_t
  lies; here t is drawn in the bin of the step x_t is at, k ∈ [0, S) (ESD's sampling, shared);
- sampling at the model's native size (the reference draws bucketed resolutions, ``dynamic_resolution``);
- float32 AdamW instead of 8-bit AdamW; no gradient clipping (the reference's ``max_grad_norm`` is 0).

SD3 / FLUX (no SPM code was published for them; our mapping): the membrane covers every Linear of every MM-DiT block
(``transformer_blocks.N``, FLUX's ``single_transformer_blocks.N``): the joint attention's image and text
projections, both streams' feed-forwards, the single-stream MLPs; not the adaLN modulation layers (``norm*``), which
read the timestep embedding rather than tokens (as the UNet's membrane leaves its norms alone). x_t is sampled with
the model's flow-matching Euler and t drawn in the step's bin of its (shifted) schedule
(``sampling.Trajectories.draw``); the anchors perturb the whole conditioning (SD3: CLIP and T5 segments; FLUX: T5)
and the pooled CLIP vector.

Several concepts at once: yes, one membrane learns them all (the reference's list of prompt settings, one drawn per
iteration); several membranes can also be stacked by the guard, each with its own transport rate.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from safediff.adapters import Conditioning
from safediff.concepts import Concept
from safediff.erasers.base import Eraser
from safediff.erasers.training import (TrainingState, cosine_restarts, loss_summary, run_fingerprint,
                                       train, trainable)
from safediff.errors import SafediffError
from safediff.models import Model
from safediff.options import option
from safediff.sampling import Trajectories, denoiser_output

logger = logging.getLogger("safediff")

TRANSFORMER_BLOCK = "Transformer2DModel"  # UNet: the modules whose Linear/Conv2d layers carry the membrane
DIT_BLOCK = re.compile(r"(single_)?transformer_blocks\.\d+")  # MM-DiT: the blocks whose Linear layers carry it


def is_modulation(path: str) -> bool:
    """Whether a module path inside an MM-DiT block is (inside) a normalisation/adaLN modulation layer."""
    return any(part.startswith("norm") for part in path.split("."))


def membrane_modules(denoiser: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Denoiser module name -> a layer the membrane adapts: every Linear/Conv2d inside a UNet transformer block, every
    Linear of an MM-DiT block but its modulation layers."""
    out = {}
    for name, module in denoiser.named_modules():
        if type(module).__name__ == TRANSFORMER_BLOCK:
            for child, layer in module.named_modules():
                if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                    out[f"{name}.{child}"] = layer
        elif DIT_BLOCK.fullmatch(name):
            for child, layer in module.named_modules():
                if isinstance(layer, torch.nn.Linear) and not is_modulation(child):
                    out[f"{name}.{child}"] = layer
    return out


def is_membrane_weight(name: str) -> bool:
    """Whether a parameter (``unet.…``, ``transformer.…``) is a weight the membrane can change: a non-norm weight in
    a UNet transformer block (``….attentions.N.….weight``), a non-modulation weight in an MM-DiT block."""
    component, _, rest = name.partition(".")
    module, _, leaf = rest.rpartition(".")
    if leaf != "weight":
        return False
    if component == "unet":
        return ".attentions." in f".{rest}" and not module.rpartition(".")[2].startswith("norm")
    if component == "transformer":
        block = DIT_BLOCK.match(module)
        return block is not None and module != block.group(0) and not is_modulation(module[block.end() + 1:])
    return False


class Membrane:
    """The rank-r factors (U, D) of every adapted layer, and the merged deltas (α/r) U D."""

    def __init__(self, denoiser: torch.nn.Module, rank: int, alpha: float, generator: torch.Generator):
        self.layers = membrane_modules(denoiser)
        if not self.layers:
            raise SafediffError("this denoiser has no transformer blocks (UNet Transformer2DModel, MM-DiT "
                                "transformer_blocks) for the SPM membrane")
        self.scale = alpha / rank
        self.up: dict[str, torch.Tensor] = {}
        self.down: dict[str, torch.Tensor] = {}
        for name, layer in self.layers.items():
            w = layer.weight
            down = torch.empty((rank, *w.shape[1:]), dtype=w.dtype)
            torch.nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
            self.down[name] = down.to(w.device).requires_grad_(True)
            self.up[name] = torch.zeros((w.shape[0], rank), dtype=w.dtype, device=w.device).requires_grad_(True)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The trained tensors by name (what a training checkpoint holds)."""
        return {**{f"{n}.up": t for n, t in self.up.items()}, **{f"{n}.down": t for n, t in self.down.items()}}

    def delta(self, name: str) -> torch.Tensor:
        """(α/r) U D in the layer's weight shape (differentiable in U and D)."""
        d = self.down[name]
        return (self.scale * (self.up[name] @ d.reshape(d.shape[0], -1))).reshape(self.layers[name].weight.shape)

    def weights(self) -> dict[str, torch.Tensor]:
        """Denoiser parameter name -> W + (α/r) U D (the membrane merged; for ``params=`` and the edit)."""
        return {f"{n}.weight": layer.weight.detach() + self.delta(n) for n, layer in self.layers.items()}


def surrogate(target: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One latent-anchoring sample around ``target`` (any shape): a Gaussian direction accepted with probability
    1 − cos(direction, target), scaled to ‖target‖·U(0.8, 1.2)."""
    flat = target.reshape(-1).float()
    while True:
        noise = torch.randn(flat.shape, generator=generator, dtype=torch.float32)
        noise = noise / noise.norm()
        similarity = float(F.cosine_similarity(flat.cpu(), noise, dim=0))
        if float(torch.rand((), generator=generator)) < 1.0 - similarity:
            break
    scale = float(torch.rand((), generator=generator)) * 0.4 + 0.8
    return (scale * noise * flat.norm().cpu()).reshape(target.shape).to(target.device, target.dtype)


def anchors(cond: Conditioning, m: int, generator: torch.Generator) -> Conditioning:
    """M surrogate conditionings around ``cond`` [1, ...] (embeddings and, for SDXL, the pooled embedding)."""
    items = []
    for _ in range(m):
        embeds = surrogate(cond.embeds[0], generator)[None]
        pooled = None if cond.pooled is None else surrogate(cond.pooled[0], generator)[None]
        items.append(Conditioning(embeds, pooled))
    return Conditioning.cat(items)


@dataclass
class SPM(Eraser):
    """SPM eraser: trains the membrane, returns it merged (see the module docstring)."""

    name: ClassVar[str] = "spm"
    paper: ClassVar[str] = ("Lyu et al., One-dimensional Adapter to Rule Them All: Concepts, Diffusion Models and "
                            "Erasing Applications, CVPR 2024 (arXiv 2312.16145)")
    # benchmark: 150 iterations with x_t from at most 10 DDIM steps and 4 anchors is ~1.1 s per iteration on the
    # 4.3M-parameter sandbox UNet at 16x16 latents on one CPU core (measured on its architecture with random
    # weights), i.e. ~3 CPU-minutes; lr 1e-3 (the membrane starts at zero and the reference's 3000 steps at 1e-4
    # are out of reach) with the schedule's warm-up scaled to the same sixth of the run (25 of 150)
    sandbox: ClassVar[dict[str, dict]] = {
        "benchmark": {"iterations": 150, "lr": 1e-3, "warmup": 25, "ddim_steps": 10},
        "demo": {"iterations": 40, "lr": 1e-3, "warmup": 6, "ddim_steps": 10},
        "smoke": {"iterations": 2, "lr": 1e-2, "warmup": 0, "ddim_steps": 2, "anchors": 1}}
    zero_strength: ClassVar[dict] = {"lr": 0.0}

    rank: int = option(1, low=1, help="r, the membrane's rank (1: one-dimensional)")
    alpha: float = option(1.0, low=0.0, help="α; the membrane is scaled by α/r")
    iterations: int = option(3000, low=1, help="AdamW steps")
    lr: float = option(1e-4, low=0.0, help="learning rate")
    weight_decay: float = option(0.01, low=0.0, help="AdamW weight decay")
    warmup: int = option(500, low=0, help="linear warm-up iterations of the cosine schedule")
    cycles: int = option(3, low=1, help="hard restarts of the cosine schedule")
    negative_guidance: float = option(1.0, help="η")
    anchor_weight: float = option(1000.0, low=0.0, help="λ, weight of latent anchoring (0: plain erasing)")
    anchors: int = option(4, low=1, help="M, surrogate concepts per iteration")
    start_guidance: float = option(3.0, low=0.0, help="CFG scale of the partial DDIM sampling")
    ddim_steps: int | None = option(30, low=1, help="S, DDIM steps of x_t's sampling (None: the model's default)")
    sample_with: str = option("trained", help="x_t sampled with the 'trained' membrane on (reference) or 'frozen'")
    seed: int = 0
    checkpoint: str | None = option(None, hyperparameter=False)  # safetensors path (resume)
    checkpoint_every: int = option(100, low=1, hyperparameter=False)

    def __post_init__(self):
        super().__post_init__()
        if self.sample_with not in ("frozen", "trained"):
            raise SafediffError(f"sample_with must be 'frozen' or 'trained', got {self.sample_with!r}")
        self.losses: list[float] = []

    def touches(self, name: str) -> bool:
        return is_membrane_weight(name)

    def compute(self, model: Model, concepts: list[Concept], preserve, guide, progress):
        if preserve is not None:
            logger.warning("SPM preserves through latent anchoring; preserve prompts are ignored")
        pairs = [(word, c.guide if guide is None else guide) for c in concepts for word in c.keywords if word.strip()]
        if not pairs:
            raise SafediffError("no concept keywords to erase; give at least one concept with a keyword")
        generator = torch.Generator(device="cpu").manual_seed(int(self.seed))
        membrane = Membrane(model.denoiser, self.rank, self.alpha, generator)
        trajectories = Trajectories(model, self.ddim_steps)
        with torch.no_grad():
            targets = model.adapter.encode([w for w, _ in pairs])
            neutrals = model.adapter.encode([g for _, g in pairs])
            uncond = model.adapter.encode_negative(None, 1)
        e = self

        def step(_: int):
            k = int(torch.randint(len(pairs), (1,), generator=generator))
            cond, neutral = targets[k:k + 1], neutrals[k:k + 1]
            with torch.no_grad():
                sampler = membrane.weights() if e.sample_with == "trained" else None
                _, t, x = trajectories.draw(generator, cond, uncond, e.start_guidance, sampler)
                surrogates = anchors(cond, e.anchors, generator)
                frozen = denoiser_output(model, torch.cat([x] * (2 + e.anchors)), t,
                                         Conditioning.cat([neutral, cond, surrogates]))
                e_n, e_c, e_a = frozen[:1], frozen[1:2], frozen[2:]
                target = e_n - e.negative_guidance * (e_c - e_n)
            pred = denoiser_output(model, torch.cat([x] * (1 + e.anchors)), t, Conditioning.cat([cond, surrogates]),
                                   params=membrane.weights())
            erase = F.mse_loss(pred[:1], target)
            anchoring = F.mse_loss(pred[1:], e_a)
            return erase + e.anchor_weight * anchoring, {"t": t}

        state = TrainingState(membrane.tensors(), None, {"training": generator}, losses=[])
        # the schedule depends on the number of iterations, so a checkpoint resumes only a run of the same length
        fingerprint = run_fingerprint(self, model, {"pairs": pairs, "iterations": self.iterations})
        with trainable(model.denoiser, {}, {}), torch.enable_grad():
            state.optimizer = torch.optim.AdamW(list(state.params.values()), lr=self.lr,
                                                weight_decay=self.weight_decay)
            resumed = state.load(self.checkpoint, fingerprint) if self.checkpoint else False
            resumed_at = state.iteration if resumed else None
            train(state, self.iterations, step, checkpoint=self.checkpoint, checkpoint_every=self.checkpoint_every,
                  fingerprint=fingerprint, desc=self.name, progress=progress,
                  lr_factor=cosine_restarts(self.warmup, self.iterations, self.cycles))
        with torch.no_grad():
            prefix = model.adapter.denoiser_component
            new = {f"{prefix}.{n}": w.detach().clone() for n, w in membrane.weights().items()}
        self.losses = list(state.losses)
        info = {"targets": [list(p) for p in pairs], "adapted_layers": len(membrane.layers),
                "membrane_parameters": sum(t.numel() for t in state.params.values()),
                "ddim_steps": trajectories.steps, "height": trajectories.height, "width": trajectories.width,
                "resumed_at_iteration": resumed_at, **loss_summary(state.losses)}
        return new, info
