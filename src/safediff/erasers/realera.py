"""RealEra: semantic-level concept erasure via neighbour-concept mining (Liu, An, Zhang, Li, Wu, Gu, Lin, Wang;
arXiv 2410.09140, an ICLR 2025 submission, withdrawn). No public code was found: this is implemented from the paper's
description, and every choice the description leaves open is ours and said so below. Multi-concept.

Neighbour-concept mining. The concept's embedding rows ``e`` (the rows UCE edits: each keyword's last token through
the end of each of its prompts, ``erasers.prompts.build_rows``) are perturbed, ``e + η``, under the paper's
constraints ``d(e, e + η) <= D₁`` and ``cos(e, e + η) ∈ [S₁, S₂]``: these mined neighbours stand for the associated
concepts that would otherwise regenerate it (concept residue) and are erased with it. Beyond-concept regularisation:
perturbations that land *outside* that neighbourhood are kept where they were, so the wider erasure stays local.

1. Closed-form cross-attention alignment, for every ``attn2.to_k`` / ``to_v`` ``W`` (UCE's solve,
   ``closed_form.uce_transform``; SD3/FLUX: the layers reading the encoder outputs, see below):
       min_W  s_e Σ_{e ∈ E ∪ N(E)} ‖W e − W₀ g_e‖² + s_p Σ_{p ∈ P} ‖W p − W₀ p‖² + s_b Σ_{b ∈ B(E)} ‖W b − W₀ b‖²
              + λ ‖W − W₀‖²
   with ``g_e`` the guide row paired with e (its neighbours share it), P the preserve rows (the empty prompt always),
   N(E) the mined neighbours and B(E) the beyond-concept rows. (A row weighted w enters the solve as √w times the
   row, since its target is its own image under W₀.)
2. Prediction-noise alignment with a LoRA (rank r on the same layers, on top of step 1; ``erasers.low_rank``):
       L = ‖ε_θ(x_t, c_N) − ε₀(x_t, c_g)‖² + β ‖ε_θ(x_t, c_B) − ε₀(x_t, c_B)‖²
   where ``c_N`` is a concept prompt's conditioning with its concept rows moved to fresh neighbours, ``c_B`` the same
   moved beyond the neighbourhood, ``c_g`` the guide prompt's, ε₀ the model as given to ``fit`` (ε: the denoiser's
   output, the velocity on SD3/FLUX) and x_t drawn as ESD does (partial sampling of the concept prompt with the
   given model and ``sampling.Trajectories``: DDIM on UNet models, flow-matching Euler on SD3/FLUX; CFG
   ``start_guidance``; t is the last step's timestep). The LoRA is merged: the edit is ``W₁ + B A``.

Our readings of what the paper leaves open: distances are relative to ‖e‖ (``d = ‖η‖/‖e‖``); η is drawn as a
uniformly random direction at a radius uniform in [0, D₁] (neighbours, kept when the cosine falls in [S₁, S₂]) or in
(D₁, D_b] (beyond-concept rows); each concept row gets ``neighbours`` and ``beyond`` samples; the LoRA sits on the
cross-attention K/V; defaults D₁ = 0.3, [S₁, S₂] = [0.95, 0.99], D_b = 0.6, UCE's λ, s_e, s_p, s_b = 1, rank 4,
lr 1e-4, 200 steps, β = 1.

SD3 / FLUX (MM-DiT). Both stages act on the layers that read the encoder outputs (``adapter.text_readers()``, as
``UCE(layers="readers")``): ``context_embedder`` (token rows: concept rows, their neighbours and beyond-concept rows
in every segment the word is found in, SD3's CLIP and T5, FLUX's T5) and the pooled embedder's first layer (pooled
rows, one per prompt, mined the same way); their inputs are exactly the rows mined, where the joint blocks' K/V read
a text stream transformed block by block. The noise stage moves the token rows only (the pooled vector is the
prompt's), and its LoRA sits on both layers. On UNet models the readers are the cross-attention K/V, as above.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from safediff.adapters import Conditioning
from safediff.concepts import Concept
from safediff.errors import SafediffError
from safediff.erasers.base import Eraser
from safediff.adapters.roles import has_role
from safediff.erasers.closed_form import reader_projections, transformed, uce_transform
from safediff.erasers.low_rank import LowRankDeltas
from safediff.erasers.prompts import WordFinder, build_rows, contexts, replace_word, word_positions
from safediff.erasers.training import TrainingState, keywords_of, loss_summary, run_fingerprint, train, trainable
from safediff.options import option
from safediff.sampling import Trajectories, denoiser_output

DRAWS_PER_ROUND = 8  # candidates per wanted sample and round of the rejection sampler
ROUNDS = 20


def perturb(rows: torch.Tensor, n: int, radius: tuple[float, float], cosine: tuple[float, float],
            generator: torch.Generator) -> torch.Tensor:
    """[N·n, D]: ``n`` samples ``e + η`` per row e of ``rows`` [N, D], with ``‖η‖/‖e‖`` uniform in ``radius`` and a
    random direction, kept when ``cos(e, e + η)`` lies in ``cosine`` (rejection sampling; SafediffError when the
    bounds leave (almost) nothing)."""
    e = rows.double()
    picked = [[] for _ in range(len(e))]
    for _ in range(ROUNDS):
        need = [i for i, got in enumerate(picked) if len(got) < n]
        if not need:
            break
        base = e[need].repeat_interleave(DRAWS_PER_ROUND * n, dim=0)
        direction = F.normalize(torch.randn(base.shape, generator=generator, dtype=torch.float64), dim=1)
        r = radius[0] + (radius[1] - radius[0]) * torch.rand(len(base), 1, generator=generator, dtype=torch.float64)
        cand = base + r * base.norm(dim=1, keepdim=True) * direction
        cos = F.cosine_similarity(base, cand, dim=1)
        ok = (cos >= cosine[0]) & (cos <= cosine[1])
        for k, i in enumerate(need):
            block = slice(k * DRAWS_PER_ROUND * n, (k + 1) * DRAWS_PER_ROUND * n)
            picked[i].extend(list(cand[block][ok[block]][: n - len(picked[i])]))
    if any(len(got) < n for got in picked):
        raise SafediffError(f"realera: no embedding within relative distance {radius} and cosine {cosine} of the "
                            "concept rows; widen the bounds")
    return torch.stack([x for got in picked for x in got])


@dataclass
class RealEra(Eraser):
    name: ClassVar[str] = "realera"
    paper: ClassVar[str] = ("Liu et al., RealEra: Semantic-level Concept Erasure via Neighbor-Concept Mining, "
                            "arXiv 2410.09140 (ICLR 2025 submission, withdrawn; no public code)")
    # sandbox: 100 LoRA steps with x_t from 10 DDIM steps, 47 CPU-seconds (1 thread) for one concept on random
    # weights of the v2 sandbox architecture (7.0M-parameter UNet); lr 1e-3 is a guess to be checked on the v2 weights
    sandbox: ClassVar[dict[str, dict]] = {"benchmark": {"iterations": 100, "lr": 1e-3, "ddim_steps": 10},
                                          "demo": {"iterations": 30, "lr": 1e-3, "ddim_steps": 10},
                                          "smoke": {"iterations": 2, "neighbours": 1, "beyond": 1}}
    zero_strength: ClassVar[dict] = {"erase_scale": 0.0, "lr": 0.0}

    lamb: float = option(0.5, low=0.0, help="λ (UCE's default)")
    erase_scale: float = option(1.0, low=0.0, help="s_e: concept rows and their mined neighbours")
    preserve_scale: float = option(1.0, low=0.0, help="s_p: preserve rows")
    beyond_scale: float = option(1.0, low=0.0, help="s_b: beyond-concept rows")
    neighbour_distance: float = option(0.3, low=0.0, help="D₁: largest ‖η‖/‖e‖ of a neighbour")
    cos_low: float = option(0.95, low=-1.0, high=1.0, help="S₁: smallest cosine of a neighbour")
    cos_high: float = option(0.99, low=-1.0, high=1.0, help="S₂: largest cosine of a neighbour")
    beyond_distance: float = option(0.6, low=0.0, help="D_b: beyond-concept rows lie at ‖η‖/‖e‖ in (D₁, D_b]")
    neighbours: int = option(4, low=0, help="mined neighbours per concept row")
    beyond: int = option(4, low=0, help="beyond-concept rows per concept row")
    tokens: str = option("to_end", help="concept rows: 'to_end' or 'last' (erasers.prompts)")
    expand_prompts: bool = option(True, help="the word in the concept's contexts too")
    rank: int = option(4, low=1, help="LoRA rank r")
    lr: float = option(1e-4, low=0.0, help="Adam learning rate of the LoRA")
    iterations: int = option(200, low=0, help="noise-alignment steps")
    beyond_weight: float = option(1.0, low=0.0, help="β of the beyond-concept noise term")
    start_guidance: float = option(3.0, low=0.0, help="CFG scale of x_t's partial sampling")
    ddim_steps: int | None = option(None, low=1, help="DDIM steps of x_t's sampling (None: the model's default)")
    seed: int = 0
    checkpoint: str | None = option(None, hyperparameter=False)
    checkpoint_every: int = option(50, low=1, hyperparameter=False)

    def __post_init__(self):
        super().__post_init__()
        if self.tokens not in ("to_end", "last"):
            raise SafediffError(f"realera: tokens must be 'to_end' or 'last', got {self.tokens!r}")
        if not self.cos_low <= self.cos_high:
            raise SafediffError(f"realera: cos_low must be <= cos_high, got {self.cos_low} > {self.cos_high}")
        if not self.neighbour_distance < self.beyond_distance:
            raise SafediffError("realera: beyond_distance must exceed neighbour_distance (beyond-concept rows lie "
                                "outside the neighbourhood)")
        self.losses: list[float] = []  # the last fit's noise-alignment losses

    def touches(self, name: str) -> bool:
        return has_role(name, "text_reader")

    def mined(self, rows: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(neighbours [N·n, D], beyond-concept rows [N·m, D]) of the concept rows."""
        near = perturb(rows, self.neighbours, (0.0, self.neighbour_distance), (self.cos_low, self.cos_high),
                       generator) if self.neighbours else rows[:0]
        far = perturb(rows, self.beyond, (self.neighbour_distance, self.beyond_distance), (-1.0, 1.0),
                      generator) if self.beyond else rows[:0]
        return near, far

    def compute(self, model, concepts: list[Concept], preserve, guide, progress):
        generator = torch.Generator().manual_seed(int(self.seed))
        rows = build_rows(model, concepts, guide, preserve, self.tokens, self.expand_prompts)
        aligned, mined = {}, {}
        for space, layers in reader_projections(model).items():  # UNet: the cross-attention K/V (tokens)
            r = rows.space(space)
            near, far = self.mined(r.erase, generator)
            erase = torch.cat([r.erase, near])
            guides = torch.cat([r.guide, r.guide.repeat_interleave(self.neighbours, dim=0)])
            keep = torch.cat([self.preserve_scale ** 0.5 * r.preserve, self.beyond_scale ** 0.5 * far])
            t = uce_transform(erase, guides, keep, self.lamb, self.erase_scale, 1.0)
            aligned.update(transformed({name: m.weight.detach() for name, m in layers.items()}, t))
            mined[space] = (len(near), len(far))
        run = NoiseAlignment(self, model, concepts, guide, aligned, generator)
        new, losses, resumed_at = run.train(progress)
        self.losses = losses
        near, far = mined["tokens"]
        pooled = {"mined_neighbours_pooled": mined["pooled"][0], "beyond_rows_pooled": mined["pooled"][1]} \
            if "pooled" in mined else {}
        info = {**rows.info, "mined_neighbours": near, "beyond_rows": far, **pooled, "matrices": len(new),
                "noise_alignment_pairs": len(run.pairs), "ddim_steps": run.trajectories.steps,
                "resumed_at_iteration": resumed_at, **loss_summary(losses)}
        return new, info


class NoiseAlignment:
    """RealEra's LoRA stage: prompt pairs, the concept rows of each prompt, x_t sampling and the training loop."""

    def __init__(self, eraser: RealEra, model, concepts: list[Concept], guide: str | None,
                 aligned: dict[str, torch.Tensor], generator: torch.Generator):
        self.eraser, self.model, self.generator = eraser, model, generator
        segments = [(s, WordFinder(model.adapter.tokenizers[s.encoders[0]])) for s in model.adapter.segments]
        self.pairs, self.positions = [], []
        for c in concepts:
            g = c.guide if guide is None else guide
            for word in keywords_of([c]):
                for p in contexts(c, word, eraser.expand_prompts):
                    rows = []  # the concept rows in every segment (SD3: CLIP and T5), as positions of the embeds
                    for seg, finder in segments:
                        pos = word_positions(finder, p, word, seg.length)
                        if pos:
                            last = pos[-1]
                            span = range(last, seg.length) if eraser.tokens == "to_end" else [last]
                            rows += [seg.start + i for i in span]
                    if rows:
                        self.pairs.append((p, replace_word(p, word, g)))
                        self.positions.append(rows)
        with torch.no_grad():
            self.cond = [model.adapter.encode([p]) for p, _ in self.pairs]
            self.guide_cond = [model.adapter.encode([g]) for _, g in self.pairs]
            self.uncond = model.adapter.encode_negative(None, 1)
        self.trajectories = Trajectories(model, eraser.ddim_steps)
        prefix = model.adapter.denoiser_component + "."
        self.denoiser_names = {name: name.removeprefix(prefix) for name in aligned}
        self.base = {self.denoiser_names[n]: w for n, w in aligned.items()}
        self.lora = LowRankDeltas(self.base, eraser.rank, generator)

    def moved(self, j: int, radius: tuple[float, float], cosine: tuple[float, float]) -> Conditioning:
        """Prompt j's conditioning with each of its concept rows replaced by one sample within the bounds."""
        cond = self.cond[j]
        pos = self.positions[j]
        embeds = cond.embeds.clone()
        rows = perturb(embeds[0, pos].double().cpu(), 1, radius, cosine, self.generator)
        embeds[0, pos] = rows.to(embeds)
        return Conditioning(embeds, cond.pooled)

    def draw(self) -> tuple[int, torch.Tensor, int]:
        """(prompt pair j, x_t, t): x_t after a uniform number of sampling steps of prompt j with the given model."""
        traj, g = self.trajectories, self.generator
        j = int(torch.randint(len(self.pairs), (1,), generator=g))
        step = int(torch.randint(traj.steps, (1,), generator=g))
        x = traj.run(self.cond[j], self.uncond, self.eraser.start_guidance, traj.noise(1, g), n_steps=step)
        return j, x, int(traj.scheduler.timesteps[step])

    def loss(self, iteration: int):
        e, m = self.eraser, self.model
        j, x, t = self.draw()
        near = self.moved(j, (0.0, e.neighbour_distance), (e.cos_low, e.cos_high))
        far = self.moved(j, (e.neighbour_distance, e.beyond_distance), (-1.0, 1.0))
        with torch.no_grad():
            anchor, kept = denoiser_output(m, torch.cat([x, x]), t, Conditioning.cat([self.guide_cond[j], far]),
                                           ).chunk(2)
        pred_near, pred_far = denoiser_output(m, torch.cat([x, x]), t, Conditioning.cat([near, far]),
                                              params=self.lora.merged(self.base)).chunk(2)
        return F.mse_loss(pred_near, anchor) + e.beyond_weight * F.mse_loss(pred_far, kept), {"t": t}

    def train(self, progress: bool) -> tuple[dict[str, torch.Tensor], list[float], int | None]:
        e = self.eraser
        state = TrainingState(self.lora.params, None, {"training": self.generator}, losses=[])
        fingerprint = run_fingerprint(e, self.model, {"pairs": self.pairs})
        with trainable(self.model.denoiser, {}, {}), torch.enable_grad():
            state.optimizer = torch.optim.Adam(list(self.lora.params.values()), lr=e.lr)
            resumed = state.load(e.checkpoint, fingerprint) if e.checkpoint else False
            resumed_at = state.iteration if resumed else None
            train(state, e.iterations, self.loss, checkpoint=e.checkpoint, checkpoint_every=e.checkpoint_every,
                  fingerprint=fingerprint, desc="realera lora", progress=progress)
        merged = {n: (self.base[u] + self.lora.delta(0, u)).detach() for n, u in self.denoiser_names.items()}
        return merged, list(state.losses), resumed_at
