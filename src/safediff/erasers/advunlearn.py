"""AdvUnlearn: robust unlearning by adversarial training (Zhang, Chen, Jia, Zhang, Fan, Liu, Hong, Ding, Liu;
NeurIPS 2024, arXiv 2405.15234; reference code OPTML-Group/AdvUnlearn, ``train-scripts/AdvUnlearn.py``).

Bi-level adversarial training with a utility-retaining regulariser, θ the trained module (by default the text
encoder, which the paper finds the module to robustify; it then plugs into any model that shares the encoder):

    min_θ  ℓ_u(θ, c*) + γ ℓ_R(θ)                     s.t.  c* = [δ*; c],  δ* = argmin_δ ℓ_atk(θ, [δ; c])

    ℓ_u(θ, c*) = ‖ε_θ(x_t, c*) − [ε_θo(x_t, ∅) − η (ε_θo(x_t, c) − ε_θo(x_t, ∅))]‖²        (ESD, θo frozen)
    ℓ_R(θ)     = E_{r ∈ C_retain} ‖ε_θ(x_t^r, r) − ε_θo(x_t^r, r)‖²

x_t (and x_t^r) come from partial DDIM sampling of the frozen model under guidance on c (on r), as ESD's
(``sampling.Trajectories.draw``); δ is k soft word embeddings prefixed to the concept's prompt (``SoftPrefix``).
The lower level is the paper's fast attack: δ from a random vocabulary token's embedding, then one signed gradient
step δ ← δ − α sign(∇_δ ℓ_atk) (FGSM; ``attacks.search.SoftPrompt``), with ℓ_atk UnlearnDiffAtk's objective, the
denoising error on images of the concept (``adapter.noised``/``training_target``; images drawn by the given model
at setup, ``imagesets.generated_images``). Options give the reference code's attack instead: ``attack_update="adam"``,
``attack_steps=30`` (its multi-step attack, Adam on δ at lr α = 1e-3; ``"sign"`` with several steps is its
``fast_at``, sign then Adam's first step being α·sign) and ``attack_objective="matching"`` (its loss: match the frozen
model's conditional prediction ε_θo(x_t, c) on the sampled x_t, P4D's objective). Before ``warmup`` iterations the
upper level trains on c itself; the adversarial prompt is refreshed every ``attack_every`` iterations (reference 1),
on a keyword drawn anew then.

Modules (``module``; ``adapters.roles`` groups): ``text_encoder`` (default; the reference's ``text_encoder_full``: every
transformer layer and the final layer norm of every CLIP encoder; SDXL: both), or denoiser groups ``xattn``, ``kv``,
``noxattn``, ``full`` (the paper's UNet comparison; on SD3/FLUX the MM-DiT parameters of the same roles). Frozen
predictions use the weights before training (the encoder's frozen outputs are computed once; denoiser groups are
swapped back per call, as ESD).

SD3 / FLUX (no AdvUnlearn code exists for them; our mapping): ``text_encoder`` trains the CLIP encoders (SD3: CLIP-L
and CLIP-G, which fill the first 77 positions of the sequence and the pooled vector; FLUX: CLIP-L, which gives only
the pooled vector); T5 stays as it is (4.7 B parameters; its encoding still carries the concept, so on FLUX the
robust CLIP acts through the pooled modulation alone: for a strong erasure there, train a denoiser group, e.g.
``module=xattn``). The adversary is k soft tokens after the BOS of *every* encoder's tokenization, CLIP and T5 (δ_j
in encoder j's input-embedding space; SD 1.x/2.x and SDXL: the CLIP encoder(s) alone, as the reference), so the
trained encoders learn against an attacker that also moves the frozen T5. x_t comes from the flow-matching Euler
trajectory (``sampling.Trajectories.draw``), and the ESD target is taken on velocities (a linear combination, as ESD's).

Retain set C_retain: every preserved concept in its contexts (the reference uses COCO object prompts,
``coco_object``), ``retain_batch`` per step without replacement. Prompts: ``prompts="word"`` (reference: each keyword
alone) or ``"contexts"`` (the keyword in the concept's contexts). Defaults: the README's command
(``--attack_init random --retain_train reg --dataset_retain coco_object --train_method text_encoder_full
--retain_loss_w 0.3``) with the fast attack: 1000 iterations at lr 1e-5 (Adam), warm-up 200, η = 1, start guidance
3, retain batch 5, k = 1 prefix token, α = 1e-3. The trained encoder is exported with
``Edit.export_text_encoders`` (a transformers folder per encoder, as the authors release theirs). Runs checkpoint
to ``checkpoint`` and resume bit-identically (the adversarial prompt is carried in the checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from safediff.adapters import Conditioning
from safediff.attacks.objectives import repeat_conditioning
from safediff.attacks.search import SoftPrompt
from safediff.attacks.spaces import vocabulary
from safediff.attacks.token_sequences import padded_ids
from safediff.concepts import Concept
from safediff.erasers.base import Eraser
from safediff.imagesets import generated_images
from safediff.adapters.roles import check_group, in_group, is_text_group
from safediff.erasers.modules import denoiser_keys, group_parameters
from safediff.erasers.training_prompts import prompt_pairs, retain_prompts
from safediff.erasers.training import Fit, cycled, loss_summary
from safediff.errors import SafediffError
from safediff.options import option
from safediff.sampling import Trajectories, denoiser_output

class SoftPrefix:
    """``prompt`` with k soft tokens δ_j [k, D_j] right after the BOS of every text encoder j's own tokenization:
    [BOS] δ p [EOS] pad (the prompt's tail is cut to fit the window). The slots hold a fixed ordinary token id (the
    smallest non-special one), which only marks positions; the encoders read δ there."""

    def __init__(self, adapter, prompt: str, k: int):
        self.adapter, self.k = adapter, k
        self.ids, self.starts = [], []
        for j, tok in enumerate(adapter.tokenizers):
            bos = adapter.bos_offset(j)
            words = tok(prompt, add_special_tokens=False).input_ids[:max(0, adapter.window(j) - bos - 1 - k)]
            filler = int(vocabulary(tok, "all")[0])
            self.ids.append(padded_ids(adapter, j, torch.tensor([[filler] * k + words])))
            self.starts.append(bos)

    def encode(self, deltas: list[torch.Tensor]) -> Conditioning:
        """The conditioning with encoder j's slot embeddings = ``deltas[j]`` (differentiable)."""
        embeds = []
        for j, ids in enumerate(self.ids):
            table = self.adapter.token_embedding(j)
            e = table(ids.to(table.weight.device)).detach()[0]
            a = self.starts[j]
            embeds.append(torch.cat([e[:a], deltas[j].to(e.dtype), e[a + self.k:]])[None])
        return self.adapter.encode_token_embeddings(self.ids, embeds)


CHOICES = {"attack_update": SoftPrompt.UPDATES, "attack_init": ("random", "latest"),
           "attack_objective": ("denoising", "matching"), "prompts": ("word", "contexts")}


@dataclass
class AdvUnlearn(Eraser):
    name: ClassVar[str] = "advunlearn"
    paper: ClassVar[str] = ("Zhang et al., Defensive Unlearning with Adversarial Training for Robust Concept Erasure "
                            "in Diffusion Models, NeurIPS 2024 (arXiv 2405.15234)")
    # a few CPU minutes on the sandbox (x_t from 10 DDIM steps, 200 iterations, 40 of warm-up; the paper's 1,000
    # at lr 1e-5 are for SD 1.4's 123M-parameter encoder on a GPU); to be re-tuned on the v2 model
    sandbox: ClassVar[dict[str, dict]] = {
        "benchmark": {"iterations": 200, "warmup": 40, "lr": 1e-4, "ddim_steps": 10, "attack_images": 8},
        "demo": {"iterations": 20, "warmup": 5, "lr": 1e-4, "ddim_steps": 10, "attack_images": 4},
        "smoke": {"iterations": 3, "warmup": 1, "lr": 1e-3, "ddim_steps": 2, "attack_images": 1, "retain_batch": 2,
                  "attack_init": "latest", "attack_every": 2}}
    zero_strength: ClassVar[dict] = {"lr": 0.0}

    module: str = option("text_encoder", help="trained parameters: text_encoder (paper), xattn, kv, noxattn, full")
    iterations: int = option(1000, low=1, high=1_000_000, help="upper-level Adam steps")
    lr: float = option(1e-5, low=0.0, high=1.0, help="upper-level learning rate")
    negative_guidance: float = option(1.0, low=-100.0, high=100.0, help="η of the ESD target")
    start_guidance: float = option(3.0, low=0.0, high=100.0, help="CFG scale of x_t's partial sampling")
    ddim_steps: int | None = option(None, low=1, high=1000, help="DDIM steps of x_t's sampling (None: the model's)")
    retain_weight: float = option(0.3, low=0.0, high=1e4, help="γ: weight of the utility-retaining term")
    retain_batch: int = option(5, low=1, high=1024, help="retain prompts per step")
    warmup: int = option(200, low=0, high=1_000_000, help="iterations on c itself before the attack starts")
    attack_every: int = option(1, low=1, high=1_000_000, help="iterations between adversarial-prompt updates")
    attack_update: str = option("sign", help="sign (FGSM, the paper's fast step) or adam (the reference's attack)")
    attack_steps: int = option(1, low=1, high=1000, help="inner steps per update (fast: 1; reference: 30)")
    attack_lr: float = option(1e-3, low=0.0, high=10.0, help="α: the signed step, or the inner Adam's lr")
    attack_tokens: int = option(1, low=1, high=32, help="k soft tokens prefixed to the prompt")
    attack_init: str = option("random", help="random (a random token's embedding, README) or latest (the last δ)")
    attack_objective: str = option("denoising", help="denoising (paper, UnlearnDiffAtk's) or matching (reference)")
    attack_images: int = option(4, low=1, high=10_000, help="images of the concept for the denoising objective")
    prompts: str = option("word", help="word (reference: the keyword alone) or contexts (it in its contexts)")
    seed: int = 0
    checkpoint: str | None = option(None, hyperparameter=False)
    checkpoint_every: int = option(50, low=1, hyperparameter=False)

    def __post_init__(self):
        super().__post_init__()
        check_group(self.module, "eraser advunlearn")
        if self.module == "text_encoder_all":
            raise SafediffError("eraser advunlearn: module text_encoder_all would train the token embeddings the "
                                "attack searches over; use text_encoder (the reference's text_encoder_full)")
        for key, accepted in CHOICES.items():
            if getattr(self, key) not in accepted:
                raise SafediffError(f"eraser advunlearn: {key} must be one of {', '.join(accepted)}, got "
                                    f"'{getattr(self, key)}'")
        self.losses: list[float] = []

    def touches(self, name: str) -> bool:
        return in_group(self.module, name)

    def compute(self, model, concepts: list[Concept], preserve, guide, progress):
        params = group_parameters(model, self.module)
        frozen = {n: p.detach().clone() for n, p in params.items()}
        run = AdvUnlearnRun(self, model, concepts, preserve, guide, denoiser_keys(model, frozen))
        extra = {"prompts": run.prompts, "retain": run.retain}
        with Fit(self, model, params, {"sampling": run.generator}, extra, progress, frozen=frozen) as fit:
            state = fit.state
            fit.start(torch.optim.Adam(list(params.values()), lr=self.lr))
            fit.train(lambda it: run.step(it, state.carried))
            new = fit.trained()
        self.losses, resumed_at = list(state.losses), fit.resumed_at
        info = {"module": self.module, "trained_tensors": len(params), "prompts": run.prompts[:6],
                "retain_prompts": len(run.retain), "attack": {"update": self.attack_update, "steps": self.attack_steps,
                                                              "objective": self.attack_objective,
                                                              "rounds": run.attack_rounds},
                "ddim_steps": run.trajectories.steps, "resumed_at_iteration": resumed_at, **loss_summary(state.losses)}
        return new, info


class AdvUnlearnRun:
    """One fit: prompts and their frozen encodings, the attack's images, the model's trajectories (partial
    sampling) and the two levels' steps."""

    @torch.no_grad()
    def __init__(self, eraser: AdvUnlearn, model, concepts: list[Concept], preserve, guide,
                 frozen_denoiser: dict[str, torch.Tensor]):
        self.eraser, self.model = eraser, model
        # None: the denoiser is not trained, its live weights are the frozen ones
        self.frozen_denoiser = frozen_denoiser or None
        pairs = prompt_pairs(concepts, guide)
        words = list(dict.fromkeys(w for c in concepts for w in c.keywords if w.strip()))
        self.prompts = words if eraser.prompts == "word" else [p for p, _ in pairs if p not in words]
        self.retain = [r for r in retain_prompts(concepts, preserve) if r] or [""]
        adapter = model.adapter
        self.original = adapter.encode(self.prompts)  # E_o of every prompt, before any training
        self.retain_original = Conditioning.cat([adapter.encode(self.retain[i:i + 256])
                                                 for i in range(0, len(self.retain), 256)])
        self.uncond = adapter.encode_negative(None, 1)
        self.slots = [SoftPrefix(adapter, p, eraser.attack_tokens) for p in self.prompts]
        toks = adapter.tokenizers
        self.vocabs = [vocabulary(tok, "all") for tok in toks]
        # encoders whose tokenizer shares an earlier one's vocabulary start from the same random tokens (SDXL, SD3's
        # two CLIPs); the others draw their own (T5)
        self.shares = [next(i for i in range(j + 1) if i == j or toks[i].get_vocab() == toks[j].get_vocab())
                       for j in range(len(toks))]
        self.trajectories = Trajectories(model, eraser.ddim_steps)
        self.generator = torch.Generator().manual_seed(int(eraser.seed))
        self.images = None
        if eraser.attack_objective == "denoising":
            drawn = generated_images(model, self.prompts, eraser.attack_images, self.generator, batch_size=16)
            self.images = drawn.latents, drawn.captions
        self.n_train = model.adapter.train_timesteps
        self.attack_rounds = 0

    # -- predictions --------------------------------------------------------------------------------------------
    def current(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return denoiser_output(self.model, x, t, cond)

    def frozen(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        with torch.no_grad():
            return denoiser_output(self.model, x, t, cond, params=self.frozen_denoiser)

    def _uncond(self, n: int) -> Conditioning:
        return repeat_conditioning(self.uncond, n)

    # -- the lower level ------------------------------------------------------------------------------------------
    def attack_loss(self, k: int, embeds: list[torch.Tensor]) -> torch.Tensor:
        g = self.generator
        cond = self.slots[k].encode(embeds)
        if self.eraser.attack_objective == "denoising":
            images, of = self.images
            choices = [i for i, p in enumerate(of) if p == self.prompts[k]] or list(range(len(images)))
            x0 = images[choices[int(torch.randint(len(choices), (1,), generator=g))]][None]
            t = torch.randint(self.n_train, (1,), generator=g).to(x0.device)
            eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype).to(x0.device)
            pred = self.current(self.model.adapter.noised(x0, eps, t), t, cond)
            return F.mse_loss(pred.float(), self.model.adapter.training_target(x0, eps, t).float())
        _, t_value, x = self.trajectories.draw(g, self.original[k:k + 1], self._uncond(1), self.eraser.start_guidance,
                                               self.frozen_denoiser)
        t = torch.tensor([t_value], device=self.model.device)
        return F.mse_loss(self.current(x, t, cond).float(), self.frozen(x, t, self.original[k:k + 1]).float())

    def attack(self, k: int, carried: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """δ* for prompt k: from a random token's embedding (or the last δ), ``attack_steps`` updates."""
        e = self.eraser
        n_enc = len(self.model.adapter.text_encoders)
        if e.attack_init == "latest" and "delta.0" in carried:
            init = [carried[f"delta.{j}"] for j in range(n_enc)]
        else:
            ids: list[torch.Tensor] = []
            for j, vocab in enumerate(self.vocabs):
                ids.append(ids[self.shares[j]] if self.shares[j] < j else
                           vocab[torch.randint(len(vocab), (e.attack_tokens,), generator=self.generator)])
            adapter = self.model.adapter
            init = [adapter.token_embedding(j).weight[i.to(adapter.token_embedding(j).weight.device)]
                    for j, i in enumerate(ids)]
        soft = SoftPrompt(init, e.attack_lr, e.attack_update)
        for _ in range(e.attack_steps):
            soft.step(self.attack_loss(k, soft.embeds))
        self.attack_rounds += 1
        return [x.detach() for x in soft.embeds]

    # -- the upper level ------------------------------------------------------------------------------------------
    def step(self, iteration: int, carried: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        e, g = self.eraser, self.generator
        if iteration % e.attack_every == 0 or "prompt" not in carried:
            carried["prompt"] = torch.randint(len(self.prompts), (1,), generator=g)
            if iteration >= e.warmup:
                for j, d in enumerate(self.attack(int(carried["prompt"]), carried)):
                    carried[f"delta.{j}"] = d
        k = int(carried["prompt"])
        adversarial = iteration >= e.warmup and "delta.0" in carried
        r = cycled(e.seed, len(self.retain), iteration * e.retain_batch, e.retain_batch)
        retain_o = self.retain_original[r]
        cond_o = Conditioning.cat([self.original[k:k + 1], retain_o])
        _, t_value, x = self.trajectories.draw(g, cond_o, self._uncond(len(cond_o)), e.start_guidance,
                                               self.frozen_denoiser)
        t = torch.tensor([t_value], device=self.model.device)
        x_c, x_r = x[:1], x[1:]
        frozen = self.frozen(torch.cat([x_c, x_c, x_r]), t,
                             Conditioning.cat([self._uncond(1), self.original[k:k + 1], retain_o]))
        e_0, e_p, e_r = frozen[:1], frozen[1:2], frozen[2:]
        n_enc = len(self.model.adapter.text_encoders)
        if adversarial:
            c_n = self.slots[k].encode([carried[f"delta.{j}"] for j in range(n_enc)])
        else:
            c_n = self.model.adapter.encode([self.prompts[k]])
        c_r = self.model.adapter.encode([self.retain[i] for i in r]) if is_text_group(e.module) else retain_o
        pred = self.current(x, t, Conditioning.cat([c_n, c_r]))
        unlearn = F.mse_loss(pred[:1].float(), (e_0 - e.negative_guidance * (e_p - e_0)).float())
        retain = F.mse_loss(pred[1:].float(), e_r.float())
        loss = unlearn + e.retain_weight * retain
        return loss, {"unlearn": f"{float(unlearn.detach()):.4g}", "adv": int(adversarial)}
