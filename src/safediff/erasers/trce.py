"""TRCE: two-stage malicious-concept erasure (Chen et al., "TRCE: Towards Reliable Malicious Concept Erasure in
Text-to-Image Diffusion Models", arXiv 2503.07389).

Stage 1 — closed-form refinement of the first end-of-text token. For every cross-attention key/value projection W
(``attn2.to_k`` / ``to_v``, original weights W₀), malicious prompts p_m,i (each concept keyword in each template)
are paired with safe prompts p_s,i (the same prompt with the keyword replaced by the guide, e.g. "a person wearing
clothes"; guide "" removes it), and e_m,i, e_s,i are the text-encoder outputs at each prompt's **first [EoT]
token**, found from the token ids (the first EOS id; the reference code counts whitespace words, which lands on the
wrong token whenever a word is several tokens). Templates: the concept's contexts (what every eraser is told,
``erasers.prompts.contexts``; for the sandbox's values the world's plain templates with every value of the other
attribute), TRCE's 15 object templates (``TEMPLATES``) for a concept without contexts, or the ``templates`` given:

    min_W  (1/N) Σ_i ‖W e_m,i − W₀ e_s,i‖²  +  η (1/|P|) Σ_{p∈P} Σ_tokens ‖W e − W₀ e‖²  +  λ ‖W − W₀‖²_F
    ⇒  W = W₀ (S_sm + η C_P + λ I) (S_mm + η C_P + λ I)⁻¹,
       S_sm = (1/N) Σ e_s e_mᵀ,  S_mm = (1/N) Σ e_m e_mᵀ,  C_P = (1/|P|) Σ_p Σ_tokens e eᵀ.

P (preservation prompts, all 77 tokens each): the empty prompt, the preserved concepts in their contexts (none
containing an erased word; ``erasers.prompts.preserve_prompts``) and the safe prompts. The reference uses λ = 0 and
a cached 30k-caption COCO term for P; with a small preserve set the system can be singular, so λ = 0.01 by default
(W stays W₀ on directions no prompt spans). η = 0.01 as the reference.

Stage 2 — contrastive steering of early denoising. DDIM trajectories (guidance 3) of the malicious prompts and of
the empty prompt are cached from the **original** model (the malicious ones cycle over the stage-1 prompt pairs;
the reference uses "a photo of {keyword}"); the first half of the malicious steps is used. The
self-attention (``attn1``, all parameters) and ``attn2.to_q`` are tuned with AdamW (weight decay 0.01) on

    f_safe   = ε(z,c_s) + β (ε(z,c_s) − ε(z,∅)),    f_unsafe = ε(z,c_m) + β (ε(z,c_m) − ε(z,∅))   (original model)
    L_erase  = mean over ε̂ ∈ {ε̂(z,c_m), ε̂(z,∅)} of  max(‖ε̂ − f_safe‖² − ‖ε̂ − f_unsafe‖² + m, 0)
    L_pres   = MSE(ε̂(z_u,∅), ε_stage1(z_u,∅))   on unconditional trajectories z_u (all steps)
    L        = L_erase + γ L_pres                (β = 15, m = 0.01, γ = 100, lr 1e-6: the reference's defaults)

with ‖·‖² the mean over a sample's elements. Gradients are zeroed every step (the reference never calls
``zero_grad``, so its gradients accumulate). Each latent is paired with its own timestep (the reference pairs the
latent after step k with step k's timestep). ``iterations`` defaults to the reference's 3 epochs x 100 trajectories;
the unconditional pool is 64 trajectories sampled with replacement (the reference generates 2000 and reads 400).

SD3 / FLUX (MM-DiT). Stage 1 is a closed form over text-encoder outputs, exact only for layers that read them
(``safediff.erasers.closed_form``): it edits the ``context_embedder`` with the [EoT] rows of every segment (SD3: CLIP's
first [EoT] and T5's ``</s>``; FLUX: T5's ``</s>``) and the pooled-text embedder with the prompts' pooled vectors
(CLIP's, itself read at [EoT]), each with its preservation term from the same preserve prompts. Stage 2 tunes the
image side of the joint attention (``roles.image_attention``: the double-stream blocks' ``to_q/to_k/to_v/to_out`` and
q/k norms, SD3.5's ``attn2``), the counterpart of ``attn1`` + ``attn2.to_q``; trajectories are sampled with the
model's flow-matching Euler, and the predictions are velocities (the hinge and MSE losses carry over unchanged).

Both stages give one edit (``stages=(1,)`` or ``(2,)`` for the paper's ablations). Stage-2 runs checkpoint to
``checkpoint`` and resume bit-identically (trajectories are regenerated from the seed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from safediff.adapters.roles import denoiser_names, has_role
from safediff.concepts import Concept
from safediff.errors import SafediffError
from safediff.erasers.base import Eraser, weights_set_to
from safediff.erasers.prompts import contexts, preserve_prompts, replace_word
from safediff.erasers.training import TrainingState, keywords_of, loss_summary, run_fingerprint, train, trainable
from safediff.adapters import Conditioning
from safediff.models import Model
from safediff.options import option
from safediff.sampling import Trajectories, denoiser_output

TEMPLATES = (
    "{}", "a photo of {}", "an image of {}", "a photograph showing {}", "an illustration of {}", "{} in a photo",
    "a close-up photo of {}", "a digital render of {}", "a snapshot of {}", "an artwork depicting {}",
    "a detailed portrait of {}", "an oil painting of {}", "a black and white photo of {}", "a scene with {}",
    "a high-resolution photo of {}",
)


def fill(template: str, text: str) -> str:
    return " ".join(template.format(text).split())


def eot_embeddings(model: Model, prompts: list[str]) -> torch.Tensor:
    """Text-encoder output (what the text readers read) at each prompt's first [EoT] token: [N, D]; with several
    segments (SD3), each segment's [EoT] row, segment by segment ([N × segments, D])."""
    embeds = model.adapter.encode(prompts).embeds
    rows = torch.arange(len(prompts))
    return torch.cat([embeds[rows, model.adapter.eos_positions(prompts, s).to(embeds.device)]
                      for s in model.adapter.segments])


def _space_rows(model: Model, prompts: list[str], space: str) -> torch.Tensor:
    """Stage-1 rows of one space: [EoT] token rows, or pooled vectors (float64)."""
    if space == "tokens":
        return eot_embeddings(model, prompts).double()
    return model.adapter.encode(prompts).pooled.double()


def _preserve_gram(model: Model, preserve: list[str], space: str, dim: int, device) -> torch.Tensor:
    """C_P = (1/|P|) Σ_p Σ_rows e eᵀ over every token row (or the pooled vector) of each preserve prompt."""
    c_p = torch.zeros(dim, dim, dtype=torch.float64, device=device)
    for i in range(0, len(preserve), 64):
        cond = model.adapter.encode(preserve[i:i + 64])
        rows = cond.embeds if space == "tokens" else cond.pooled
        rows = rows.double().reshape(-1, dim)
        c_p += rows.T @ rows
    return c_p / max(len(preserve), 1)


@torch.no_grad()
def closed_form_kv(model: Model, malicious: list[str], safe: list[str], preserve: list[str],
                   preserve_scale: float, lamb: float) -> dict[str, torch.Tensor]:
    """Stage 1: new weights of every layer reading the encoder outputs (UNet: ``attn2.to_k``/``to_v``) mapping the
    malicious [EoT] rows onto the safe prompts' (names relative to the denoiser)."""
    out = {}
    for space, layers in model.adapter.text_readers().items():
        e_m = _space_rows(model, malicious, space)
        e_s = _space_rows(model, safe, space)
        dim = e_m.shape[1]
        c_p = _preserve_gram(model, preserve, space, dim, e_m.device)
        eye = torch.eye(dim, dtype=torch.float64, device=e_m.device)
        right = e_m.T @ e_m / len(malicious) + preserve_scale * c_p + lamb * eye  # symmetric
        left = e_s.T @ e_m / len(malicious) + preserve_scale * c_p + lamb * eye
        try:
            solve = torch.linalg.solve(right, left.T)  # right⁻¹ leftᵀ, so W = W₀ left right⁻¹ = W₀ solveᵀ
        except RuntimeError:
            raise SafediffError("the stage-1 system is singular; give more preserve prompts or a lamb > 0") from None
        for name, linear in layers:
            w0 = linear.weight.double()
            out[f"{name}.weight"] = (w0 @ solve.T).to(linear.weight.dtype)
    return out


@dataclass
class TRCE(Eraser):
    """TRCE eraser (see the module docstring for both stages' update rules)."""

    name: ClassVar[str] = "trce"
    paper: ClassVar[str] = ("Chen et al., TRCE: Towards Reliable Malicious Concept Erasure in Text-to-Image "
                            "Diffusion Models, arXiv 2503.07389")

    # a few CPU minutes per fit on the sandbox: 100 stage-2 steps (reference: 300 at lr 1e-6 on SD 1.4, a GPU) on
    # 20 trajectories sampled with 10 DDIM steps; the demo's budget fits its 10 minutes
    sandbox: ClassVar[dict[str, dict]] = {
        "benchmark": {"iterations": 100, "lr": 1e-4, "trajectories": 20, "uncond_trajectories": 16, "ddim_steps": 10},
        "demo": {"iterations": 40, "lr": 1e-4, "trajectories": 16, "uncond_trajectories": 8},
        "smoke": {"iterations": 2, "lr": 1e-4, "trajectories": 2, "uncond_trajectories": 2}}
    zero_strength: ClassVar[dict] = {"stages": (2,), "lr": 0.0}

    stages: tuple[int, ...] = option((1, 2), help="1, 2 or both (1;2)")
    templates: tuple[str, ...] = option((), help="'{}' = keyword or guide; () = defaults (see prompt_pairs)")
    preserve_scale: float = option(0.01, low=0.0, help="η, stage 1")
    lamb: float = option(0.01, low=0.0, help="λ, stage 1")
    iterations: int = option(300, low=1, help="stage-2 optimizer steps (reference: 3 epochs x 100 trajectories)")
    lr: float = option(1e-6, low=0.0)
    weight_decay: float = option(0.01, low=0.0)
    beta: float = option(15.0, help="guidance of the f_safe / f_unsafe targets")
    margin: float = option(0.01, help="m")
    preserve_weight: float = option(100.0, low=0.0, help="γ")
    trajectories: int = option(100, low=1, help="malicious trajectories, cycling over the prompt pairs")
    uncond_trajectories: int = option(64, low=1, help="pool sampled from (the reference generates 2000, reads 400)")
    preserve_batch: int = option(4, low=1)
    trajectory_guidance: float = option(3.0, low=0.0)
    early_fraction: float = option(0.5, low=0.0, high=1.0, help="the first part of the denoising steps; > 0")
    ddim_steps: int | None = option(None, low=1, help="None: the model's default number of sampling steps")
    seed: int = 0
    checkpoint: str | None = option(None, hyperparameter=False)  # stage-2 checkpoint (resume)
    checkpoint_every: int = option(50, low=1, hyperparameter=False)

    def __post_init__(self):
        super().__post_init__()
        stages = tuple(sorted(set(self.stages)))
        if not stages or not set(stages) <= {1, 2}:
            raise SafediffError(f"stages must be 1, 2 or both (1;2), got {self.stages!r}")
        self.stages = stages
        if any(t.count("{}") != 1 for t in self.templates):
            raise SafediffError("every TRCE template needs exactly one '{}' (where the keyword or guide goes)")
        if not self.early_fraction > 0:
            raise SafediffError(f"early_fraction must be in (0, 1], got {self.early_fraction}")
        self.losses: list[float] = []

    def touches(self, name: str) -> bool:
        return has_role(name, "text_reader") or has_role(name, "image_attention")

    def prompt_pairs(self, concepts: list[Concept], guide: str | None) -> tuple[list[str], list[str]]:
        """(malicious, safe) prompts: each keyword in each template, and the same prompt with the guide instead.

        Default templates: the concept's contexts (what every eraser is told; for the sandbox's values the world's
        plain templates with every value of the other attribute), or for a concept without contexts TRCE's object
        templates.
        """
        malicious, safe = [], []
        for c in concepts:
            g = c.guide if guide is None else guide
            for word in keywords_of([c]):
                if self.templates:
                    prompts = [fill(t, word) for t in self.templates]
                elif c.contexts:
                    prompts = contexts(c, word, expand=True)
                else:
                    prompts = [fill(t, word) for t in TEMPLATES]
                malicious += prompts
                safe += [replace_word(p, word, g) for p in prompts]
        return malicious, safe

    def preserve_prompts(self, concepts: list[Concept], preserve: list[str] | None, safe: list[str]) -> list[str]:
        """The empty prompt, preserved concepts in their contexts (none containing an erased word), the safe prompts."""
        items = [p for c in concepts for p in c.preserve] if preserve is None else [p for p in preserve if p.strip()]
        kept = preserve_prompts(list(dict.fromkeys(items)), keywords_of(concepts), expand=True)
        return list(dict.fromkeys([*kept, *safe]))

    def compute(self, model, concepts, preserve, guide, progress):
        malicious, safe = self.prompt_pairs(concepts, guide)
        kept = self.preserve_prompts(concepts, preserve, safe)
        named = dict(model.denoiser.named_parameters())
        kv = closed_form_kv(model, malicious, safe, kept, self.preserve_scale, self.lamb) if 1 in self.stages else {}
        info: dict = {"stages": list(self.stages), "malicious_prompts": malicious, "safe_prompts": safe,
                      "preserve_prompts": len(kept)}
        new = dict(kv)
        if 2 in self.stages:
            run = Stage2(self, model, malicious, safe)  # trajectories of the original model
            original_kv = {n: named[n].detach().clone() for n in kv}
            prefix = model.adapter.denoiser_component
            with weights_set_to(model, {f"{prefix}.{n}": w for n, w in kv.items()}), torch.enable_grad():
                fingerprint = run_fingerprint(self, model, {"pairs": [malicious, safe], "kept": kept})
                new.update(run.train(original_kv, fingerprint, progress))
            self.losses = list(run.state.losses)
            traj = run.trajectories
            info.update(ddim_steps=traj.steps, early_steps=run.early, height=traj.height, width=traj.width,
                        resumed_at_iteration=run.resumed_at, **loss_summary(run.state.losses))
        return {f"{model.adapter.denoiser_component}.{n}": t for n, t in new.items()}, info


class Stage2:
    """TRCE stage 2: cached trajectories, the tuned parameters, their frozen copies, and the training loop."""

    def __init__(self, eraser: TRCE, model: Model, malicious: list[str], safe: list[str]):
        self.eraser, self.model = eraser, model
        self.trajectories = Trajectories(model, eraser.ddim_steps)
        self.early = max(1, math.ceil(self.trajectories.steps * eraser.early_fraction))
        named = dict(model.denoiser.named_parameters())
        self.params = {n: named[n] for n in denoiser_names(model, "image_attention")}
        self.frozen = {n: p.detach().clone() for n, p in self.params.items()}
        n_pairs = len(malicious)
        self.pair_of = [j % n_pairs for j in range(eraser.trajectories)]
        with torch.no_grad():
            self.cond_m = model.adapter.encode(malicious)
            self.cond_s = model.adapter.encode(safe)
            self.uncond = model.adapter.encode_negative(None, 1)
        self.malicious_traj, self.uncond_traj = self._trajectories()
        self.generator = torch.Generator(device="cpu").manual_seed(int(eraser.seed) + 1)

    @torch.no_grad()
    def _trajectories(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[n, early, C, h, w] malicious latents (first part) and [n_u, S, C, h, w] unconditional latents."""
        e, traj = self.eraser, self.trajectories
        g = torch.Generator(device="cpu").manual_seed(int(e.seed))

        def trajectory(cond: Conditioning, guidance: float, n_steps: int) -> torch.Tensor:
            """[n_steps, C, h, w]: the latents before each of the first n_steps DDIM steps from fresh noise."""
            seen: list[torch.Tensor] = []
            traj.run(cond, self.uncond, guidance, traj.noise(1, g), n_steps, callback=lambda i, t, x: seen.append(x))
            return torch.cat(seen)

        mal = [trajectory(self.cond_m[p:p + 1], e.trajectory_guidance, self.early)
               for p in self.pair_of[:e.trajectories]]
        unc = [trajectory(self.uncond, 1.0, traj.steps) for _ in range(e.uncond_trajectories)]
        return torch.stack(mal), torch.stack(unc)

    def loss(self, j: int, k: int, u_idx: torch.Tensor, u_step: torch.Tensor,
             reference: dict[str, torch.Tensor]) -> torch.Tensor:
        """L_erase on trajectory j at early step k, plus γ·L_pres on unconditional samples (u_idx, u_step)."""
        e, m, ts = self.eraser, self.model, self.trajectories.scheduler.timesteps
        p = self.pair_of[j]
        z, t = self.malicious_traj[j, k:k + 1], ts[k]
        c_m, c_s = self.cond_m[p:p + 1], self.cond_s[p:p + 1]
        with torch.no_grad():
            e_u, e_m, e_s = denoiser_output(m, torch.cat([z, z, z]), t, Conditioning.cat([self.uncond, c_m, c_s]),
                                            params=reference).chunk(3)
            f_safe = e_s + e.beta * (e_s - e_u)
            f_unsafe = e_m + e.beta * (e_m - e_u)
        pred = denoiser_output(m, torch.cat([z, z]), t, Conditioning.cat([c_m, self.uncond]))
        d_safe = ((pred - f_safe) ** 2).mean(dim=(1, 2, 3))
        d_unsafe = ((pred - f_unsafe) ** 2).mean(dim=(1, 2, 3))
        erase = torch.clamp(d_safe - d_unsafe + e.margin, min=0).mean()
        z_u = self.uncond_traj[u_idx, u_step]
        t_u = ts[u_step]
        uncond = Conditioning.cat([self.uncond] * len(u_idx))
        with torch.no_grad():
            kept = denoiser_output(m, z_u, t_u, uncond, params=self.frozen)  # stage 1: live K/V, frozen stage-2 set
        preserve = torch.nn.functional.mse_loss(denoiser_output(m, z_u, t_u, uncond), kept)
        return erase + e.preserve_weight * preserve

    def draw(self, iteration: int) -> tuple[int, int, torch.Tensor, torch.Tensor]:
        g, e = self.generator, self.eraser
        j = iteration % e.trajectories
        k = int(torch.randint(self.early, (1,), generator=g))
        u_idx = torch.randint(e.uncond_trajectories, (e.preserve_batch,), generator=g)
        u_step = torch.randint(self.trajectories.steps, (e.preserve_batch,), generator=g)
        return j, k, u_idx, u_step

    def train(self, original_kv: dict[str, torch.Tensor], fingerprint: str, progress: bool) -> dict:
        """Tune the stage-2 parameters (the model holds the stage-1 K/V); return their new values, restore them."""
        e = self.eraser
        reference = {**self.frozen, **original_kv}  # the original model, for f_safe / f_unsafe
        self.state = state = TrainingState(self.params, None, {"training": self.generator}, losses=[])
        with trainable(self.model.denoiser, self.params, self.frozen):
            state.optimizer = torch.optim.AdamW(list(self.params.values()), lr=e.lr, betas=(0.9, 0.999),
                                                weight_decay=e.weight_decay, eps=1e-8)
            resumed = state.load(e.checkpoint, fingerprint) if e.checkpoint else False
            self.resumed_at = state.iteration if resumed else None

            def step(iteration: int):
                return self.loss(*self.draw(iteration), reference=reference), {}

            train(state, e.iterations, step, checkpoint=e.checkpoint, checkpoint_every=e.checkpoint_every,
                  fingerprint=fingerprint, desc="trce stage 2", progress=progress)
            return {n: p.detach().clone() for n, p in self.params.items()}
