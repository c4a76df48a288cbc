"""STEREO: search thoroughly enough, then robustly erase once (Srivatsan, Shamshad, Naseer, Patel, Nandakumar;
CVPR 2025, arXiv 2408.16807; reference code koushiksrivats/robust-concept-erasing, ``utils/stereo.py``).

Stage 1, "search thoroughly enough" (adversarial training used only to find prompts): for rounds k = 0..K−1,
   (a) erase the current target c_k from the denoiser (c_0: the concept's keywords; c_k: the word mined in round k−1),
       on top of the previous round's weights θ_{k−1} (frozen during the round), ESD's objective
           ‖ε_θ(x_t, c_k) − [ε_θ_{k−1}(x_t, ∅) − η_s (ε_θ_{k−1}(x_t, c_k) − ε_θ_{k−1}(x_t, ∅))]‖²
       with x_t from partial DDIM sampling on c_k (``sampling.Trajectories.draw``);
   (b) mine: learn a new word v_k against the erased model by concept inversion on images of the concept (the
       objective of safediff's ``concept-inversion`` recipe, ``attacks.concept_inversion.Inversion``: textual
       inversion of one placeholder, Adam on v_k only); c_{k+1} = v_k.
Stage 2, "robustly erase once": from the *original* weights θo, with E = {keywords} ∪ {v_0..v_{K−1}} and anchor
prompts A (the concept's words inside scenes), for e ∈ E and a ∈ A drawn in turn:

    ε̃ = ε_θo(x_t, ∅) + η_a (ε_θo(x_t, a) − ε_θo(x_t, ∅)) − η_n · mean_{e′∈E} (ε_θo(x_t, e′) − ε_θo(x_t, ∅))
    L = ‖ε_θ(x_t, e) − ε̃‖²                            (x_t sampled on e by the model being trained)

The reference writes both stages with APG's normalised guidance (Sadat et al. 2024); at its settings (η = 1, no
momentum, no norm threshold) the normalised update is the plain difference, so the rules above are exactly its
computation: its ``negative_guidance=2`` in ``ε(c) − (g−1)(ε(c) − ε(∅))`` is ESD's η_s = g − 2 = 0 (the concept is
mapped to the unconditional prediction), and its ``compositional_guidance_scale=2`` weighs the anchor by s − 1 = 1
and the erased words by −(s + 1) = −3 (η_a = 1, η_n = 3, the defaults here; the README describes one scale,
``negative_scale=1`` gives that symmetric reading). The paper's text was not available here.

Anchors: the reference ships ~200 LLM-written scene sentences containing the concept's word per concept
("A nude figure stands amidst a field ..."); here A is the concept's keywords in its contexts (``prompt_pairs``).
Mining images: ``n_images`` drawn by the original model from those prompts (the reference's gallery of 500);
templates: the concept's contexts with the placeholder for the word. The mined words live only in training: the
edit holds denoiser weights. Defaults: the README's command (``--train_method noxattn --n_iterations 2
--num_of_adv_concepts 2 --compositional_guidance_scale 2``) and train.py's: 200 iterations per erasing stage, lr
5e-6 (stage 1) and 2e-5 (stage 2), AdamW; inversion 3,000 steps of batch 1 at lr 5e-3; x_t from 50 DDIM steps at
guidance 3, sampled with the model being trained (``sample_with="trained"``). Differences: x_t's prediction
timestep is the DDIM step's own bin (the reference maps step i to DDPM i/50·1000, counting from the noisy end);
erase targets and anchors are taken in turn, not as a shuffled balanced list. Stage 2 checkpoints to
``checkpoint`` (the mined words with it) and resumes bit-identically; an interrupted stage 1 is redone from the seed.

SD3 / FLUX (no STEREO code exists for them; our mapping): both stages carry over unchanged in form. The module
groups are ESD's roles on the MM-DiT (``adapters.roles`` groups: ``noxattn`` = ESD-u's set), x_t comes from the
flow-matching Euler trajectory, the guidance combinations are taken on velocities (linear, as on ε), and a mined word
is one learned vector per text encoder (CLIP-L, CLIP-G, T5 on SD3; CLIP-L, T5 on FLUX), each encoder reading the
placeholder in its own tokens (``concept_inversion.Inversion``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from safediff.adapters import Conditioning
from safediff.attacks.concept_inversion import Inversion, initial_vectors, placeholder_conditioning
from safediff.concepts import Concept, fill_context
from safediff.erasers.base import Eraser
from safediff.imagesets import generated_images
from safediff.adapters.roles import check_group, in_group
from safediff.erasers.modules import denoiser_keys, group_parameters
from safediff.erasers.prompts import GENERIC_TEMPLATES
from safediff.erasers.training_prompts import prompt_pairs
from safediff.erasers.training import Fit, TrainingState, cycled, loss_summary, train
from safediff.errors import SafediffError
from safediff.options import option
from safediff.sampling import Trajectories, denoiser_output

SAMPLE_WITH = ("trained", "frozen")


@dataclass
class STEREO(Eraser):
    name: ClassVar[str] = "stereo"
    paper: ClassVar[str] = ("Srivatsan et al., STEREO: A Two-Stage Framework for Adversarially Robust Concept Erasing "
                            "from Text-to-Image Diffusion Models, CVPR 2025 (arXiv 2408.16807)")
    # a few CPU minutes on the sandbox: 2 rounds of 100 erasing steps and 100 inversion steps of batch 4, then
    # 150 steps of stage 2; x_t from 10 DDIM steps; to be re-tuned on the v2 model
    sandbox: ClassVar[dict[str, dict]] = {
        "benchmark": {"erase_iterations": 100, "iterations": 150, "erase_lr": 1e-4, "lr": 1e-4,
                      "inversion_steps": 100, "inversion_batch": 4, "n_images": 16, "ddim_steps": 10},
        "demo": {"erase_iterations": 10, "iterations": 20, "erase_lr": 1e-4, "lr": 1e-4, "inversion_steps": 20,
                 "inversion_batch": 4, "n_images": 4, "ddim_steps": 10},
        "smoke": {"rounds": 1, "erase_iterations": 1, "iterations": 2, "erase_lr": 1e-3, "lr": 1e-3,
                  "inversion_steps": 1, "n_images": 1, "ddim_steps": 2}}
    zero_strength: ClassVar[dict] = {"lr": 0.0}

    module: str = option("noxattn", help="trained denoiser parameters: noxattn (README), xattn, kv, full")
    rounds: int = option(2, low=0, high=100, help="K: erase-then-mine rounds of stage 1")
    erase_iterations: int = option(200, low=1, high=1_000_000, help="AdamW steps of each stage-1 erasure")
    erase_lr: float = option(5e-6, low=0.0, high=1.0, help="stage-1 learning rate")
    erase_negative_guidance: float = option(0.0, low=-100.0, high=100.0, help="η_s (reference: 0, see docstring)")
    inversion_steps: int = option(3000, low=1, high=1_000_000, help="Adam steps of each mined word")
    inversion_lr: float = option(5e-3, low=0.0, high=10.0)
    inversion_batch: int = option(1, low=1, high=1024)
    n_images: int = option(500, low=1, high=100_000, help="images of the concept the mining inverts")
    init_word: str = option("", help="the mined word's starting embedding ('': the concept's first keyword)")
    iterations: int = option(200, low=1, high=1_000_000, help="AdamW steps of stage 2")
    lr: float = option(2e-5, low=0.0, high=1.0, help="stage-2 learning rate")
    weight_decay: float = option(0.01, low=0.0, high=1.0, help="AdamW weight decay (PyTorch's default)")
    anchor_scale: float = option(1.0, low=0.0, high=100.0, help="η_a")
    negative_scale: float = option(3.0, low=0.0, high=100.0, help="η_n (reference's effective 3)")
    start_guidance: float = option(3.0, low=0.0, high=100.0, help="CFG scale of x_t's partial sampling")
    ddim_steps: int | None = option(None, low=1, high=1000, help="DDIM steps of x_t's sampling (None: the model's)")
    sample_with: str = option("trained", help="x_t sampled with the model being 'trained' (reference) or 'frozen'")
    seed: int = 0
    checkpoint: str | None = option(None, hyperparameter=False)
    checkpoint_every: int = option(50, low=1, hyperparameter=False)

    def __post_init__(self):
        super().__post_init__()
        check_group(self.module, "eraser stereo", trains="denoiser")
        if self.sample_with not in SAMPLE_WITH:
            raise SafediffError(f"eraser stereo: sample_with must be one of {', '.join(SAMPLE_WITH)}, got "
                                f"'{self.sample_with}'")
        self.losses: list[float] = []

    def touches(self, name: str) -> bool:
        return in_group(self.module, name)

    def compute(self, model, concepts: list[Concept], preserve, guide, progress):
        params = group_parameters(model, self.module)
        original = {n: p.detach().clone() for n, p in params.items()}
        run = StereoRun(self, model, concepts, guide, denoiser_keys(model, original))
        extra = {"anchors": run.anchors, "words": run.words}
        with Fit(self, model, params, {"sampling": run.generator}, extra, progress, frozen=original) as fit:
            state = fit.state
            if fit.start(torch.optim.AdamW(list(params.values()), lr=self.lr, weight_decay=self.weight_decay)):
                mined = run.mined_from(state.carried)
            else:
                mined = run.search(params, progress)
                with torch.no_grad():
                    for n, p in params.items():
                        p.copy_(original[n])
                state.carried.update(run.carried(mined))
            targets = run.targets(mined)
            fit.train(lambda it: run.erase_once(it, targets), desc=f"{self.name} stage 2")
            new = fit.trained()
        self.losses, resumed_at = list(state.losses), fit.resumed_at
        info = {"module": self.module, "anchors": run.anchors[:6], "erased_words": run.words,
                "mined_words": len(mined), "search": run.search_log, "ddim_steps": run.trajectories.steps,
                "resumed_at_iteration": resumed_at, **loss_summary(state.losses)}
        return new, info


class StereoRun:
    """Prompts, images, the model's trajectories (partial sampling); stage 1 (``search``) and a step of stage 2
    (``erase_once``)."""

    @torch.no_grad()
    def __init__(self, eraser: STEREO, model, concepts: list[Concept], guide, original: dict[str, torch.Tensor]):
        self.eraser, self.model, self.original = eraser, model, original
        self.words = list(dict.fromkeys(w for c in concepts for w in c.keywords if w.strip()))
        pairs = prompt_pairs(concepts, guide)
        self.anchors = [p for p, _ in pairs if p not in self.words] or [p for p, _ in pairs]
        self.templates = list(dict.fromkeys(fill_context(t, "{}") for c in concepts
                                            for t in (c.contexts or GENERIC_TEMPLATES))) + ["{}"]
        self.slots, _ = initial_vectors(model.adapter, eraser.init_word or self.words[0], "eraser stereo")
        self.generator = torch.Generator().manual_seed(int(eraser.seed))
        self.images = generated_images(model, self.anchors, eraser.n_images, self.generator, batch_size=16).latents
        self.trajectories = Trajectories(model, eraser.ddim_steps)
        self.uncond = model.adapter.encode_negative(None, 1)
        self.word_conds = model.adapter.encode(self.words)
        self.anchor_conds = model.adapter.encode(self.anchors)
        self.search_log: list[dict] = []

    # -- conditioning of erase targets ----------------------------------------------------------------------------
    def mined_condition(self, vectors: list[torch.Tensor]) -> Conditioning:
        """A mined word alone as a prompt (the reference erases the bare placeholder token)."""
        return placeholder_conditioning(self.model.adapter, ["{}"], self.slots, vectors)

    def targets(self, mined: list[list[torch.Tensor]]) -> Conditioning:
        """E: the keywords, then every mined word."""
        with torch.no_grad():
            return Conditioning.cat([self.word_conds, *(self.mined_condition(v) for v in mined)])

    def carried(self, mined: list[list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {f"mined.{k}.{j}": v.detach() for k, vs in enumerate(mined) for j, v in enumerate(vs)}

    def mined_from(self, carried: dict[str, torch.Tensor]) -> list[list[torch.Tensor]]:
        n_enc = len(self.model.adapter.text_encoders)
        return [[carried[f"mined.{k}.{j}"] for j in range(n_enc)] for k in range(self.eraser.rounds)]

    # -- stage 1 --------------------------------------------------------------------------------------------------
    def search(self, params: dict[str, torch.nn.Parameter], progress: bool) -> list[list[torch.Tensor]]:
        e = self.eraser
        current = self.word_conds
        mined: list[list[torch.Tensor]] = []
        for k in range(e.rounds):
            start = denoiser_keys(self.model, {n: p.detach().clone() for n, p in params.items()})
            self._erase(params, current, start, progress, k)
            vectors = self._mine(progress, k)
            mined.append(vectors)
            current = self.targets([vectors])[len(self.words):]
        return mined

    def _erase(self, params, targets: Conditioning, start: dict[str, torch.Tensor], progress: bool, k: int) -> None:
        e, g = self.eraser, self.generator
        state = TrainingState(params, torch.optim.AdamW(list(params.values()), lr=e.erase_lr,
                                                        weight_decay=e.weight_decay), {}, losses=[])

        def step(it: int):
            c = targets[it % len(targets):it % len(targets) + 1]
            _, t_value, x = self.trajectories.draw(g, c, self.uncond, e.start_guidance,
                                                   None if e.sample_with == "trained" else start)
            t = torch.tensor([t_value], device=self.model.device)
            with torch.no_grad():
                e_0, e_c = denoiser_output(self.model, torch.cat([x, x]), t, Conditioning.cat([self.uncond, c]),
                                           params=start).chunk(2)
            target = e_0 - e.erase_negative_guidance * (e_c - e_0)
            return F.mse_loss(denoiser_output(self.model, x, t, c).float(), target.float()), {"t": t_value}

        train(state, e.erase_iterations, step, checkpoint=None, checkpoint_every=1, fingerprint="",
              desc=f"stereo round {k + 1} erase", progress=progress)
        self.search_log.append({"round": k, **loss_summary(state.losses)})

    def _mine(self, progress: bool, k: int) -> list[torch.Tensor]:
        e, g = self.eraser, self.generator
        _, vectors = initial_vectors(self.model.adapter, e.init_word or self.words[0], "eraser stereo")
        inversion = Inversion(self.model, self.images, self.templates, self.slots, vectors)

        def noise(x_t, t, cond):
            return denoiser_output(self.model, x_t, t, cond)

        probe = inversion.draw(g, e.inversion_batch)
        with torch.no_grad():
            before = float(inversion.loss(noise, probe))
        opt = torch.optim.Adam(vectors, lr=e.inversion_lr)
        for _ in range(e.inversion_steps):
            loss = inversion.loss(noise, inversion.draw(g, e.inversion_batch))
            opt.zero_grad()
            loss.backward(inputs=vectors)
            opt.step()
        with torch.no_grad():
            after = float(inversion.loss(noise, probe))
        self.search_log[-1].update(inversion_probe_before=before, inversion_probe_after=after)
        return [v.detach() for v in vectors]

    # -- stage 2 --------------------------------------------------------------------------------------------------
    def erase_once(self, iteration: int, targets: Conditioning) -> tuple[torch.Tensor, dict]:
        e, g, model = self.eraser, self.generator, self.model
        item = cycled(e.seed, len(targets), iteration, 1)[0]
        anchor = cycled(e.seed + 1, len(self.anchors), iteration, 1)[0]
        c = targets[item:item + 1]
        _, t_value, x = self.trajectories.draw(g, c, self.uncond, e.start_guidance,
                                               None if e.sample_with == "trained" else self.original)
        t = torch.tensor([t_value], device=model.device)
        n = len(targets)
        with torch.no_grad():
            out = denoiser_output(model, torch.cat([x] * (n + 2)), t,
                                  Conditioning.cat([self.uncond, self.anchor_conds[anchor:anchor + 1], targets]),
                                  params=self.original)
        e_0, e_a, e_neg = out[:1], out[1:2], out[2:]
        target = e_0 + e.anchor_scale * (e_a - e_0) - e.negative_scale * (e_neg - e_0).mean(dim=0, keepdim=True)
        loss = F.mse_loss(denoiser_output(model, x, t, c).float(), target.float())
        return loss, {"t": t_value}

