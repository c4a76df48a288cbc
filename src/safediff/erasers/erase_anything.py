"""EraseAnything: Enabling Concept Erasure in Rectified Flow Transformers (Gao, Lu, Walters, Zhou, Chu, Zhang, Zhang,
Jia, Zhao, Fan, Zhang; ICML 2025, arXiv 2412.20413; code tomguluson92/EraseAnything). FLUX's own erasure method; runs
on FLUX and SD3 (MM-DiT joint attention). Multi-concept: every concept's prompts enter the same objectives.

A LoRA ``ΔW = B A`` (``erasers.low_rank``) on the joint blocks' attention is trained on a bi-level problem:

    lower level (erase, on D_un):  L_un(θ) = L_esd + λ_attn L_attn
    upper level (keep, on D_ir):   min_θ L_ir(θ) = L_keep + λ_resco L_ReSCo    s.t.  θ ∈ argmin L_un

- L_esd (ESD in velocity space): ‖v_θ(x_t, c, t) − [v*(x_t, g, t) − η (v*(x_t, c, t) − v*(x_t, g, t))]‖², v* the
  frozen model, c a concept prompt, g its guide (the concept's guide; "" = unconditional, as ESD; the reference
  passes a concept-free prompt here, which ``guide`` gives). x_t: partial sampling of c with the frozen model
  (``sampling.Trajectories.draw``: the flow-matching Euler, CFG
  ``start_guidance``), t uniform in the step's bin, as ESD.
- L_attn (attention-map regulariser): Σ_j ‖A_j‖_F over the concept's token positions j, with A_j the attention
  probabilities of every image query on text token j ([batch, heads, image tokens]) in the joint attention,
  softmax(q kᵀ/√d) over text and image keys (RoPE included on FLUX), recomputed from the block's own (LoRA'd)
  projections. ``attention_blocks="last"`` reads the last joint block (the reference's map: its transformer returns
  the last double-stream block's); ``"all"`` sums over every joint block.
- L_keep: ‖v_θ(x_t, p, t) − v*(x_t, p, t)‖² on preserve prompts p, x_t sampled from p. The reference uses the
  flow-matching loss ‖v_θ(x_t, c) − (ε − x₀)‖² on training images of the concept prompt (its "lora loss"); no image
  set is assumed here, so the term keeps the unrelated prompts' velocities instead (our substitution).
- L_ReSCo (reverse self-contrastive): with a(·) the attention vector over image tokens of a prompt's concept (or
  preserve) tokens (mean over those tokens, heads and the read blocks), anchor s = a*(another phrasing of the
  concept) from the frozen model, centre u = a_θ(c), irrelevant r_k = a*(p_k) for K preserve prompts:
      L_ReSCo = log softmax_0 ( [cos(s, u), cos(s, r_1), …, cos(s, r_K)] / τ )
  i.e. the centre's log-probability among them; minimising it moves the erased concept's attention away from the
  concept's other phrasings, towards the unrelated concepts'. The reference samples the K irrelevant concepts with an
  LLM (GPT-4o, an OpenAI key) and the synonym from its dataset; here the K prompts are drawn from the preserve list
  (``preserve`` or each concept's own ``preserve``), the anchor from the concept's other prompts (its keywords in its
  ``contexts``), all read at the erase step's (x_t, t) (the reference reads them along a separate trajectory).

Solving the bi-level problem. The reference alternates single gradient steps: even iterations step on L_un, odd ones
on L_ir, one AdamW over the LoRA (``schedule="alternate"``, the default: a first-order alternating scheme for the
paper's formulation, whose lower-level solution is approximated by one step). ``schedule="joint"`` steps on
L_un + L_ir every iteration (a penalty relaxation, for comparison).

Parameters (``lora_on``): ``"text-qk"`` (default, the reference's target modules) the joint blocks' text query/key
projections ``attn.add_q_proj``/``add_k_proj``; ``"attention"`` every projection of the joint attention (both
streams' q/k/v/out). FLUX's single-stream blocks share projections between text and image and are not adapted. The
LoRA (rank r, α = r, A ~ N(0, 1/r²), B = 0: peft's "gaussian" init) is merged: the edit is ``W + B A``.

Defaults are the reference config's: 200 steps, AdamW lr 1e-3 (weight decay 1e-5), rank 8, η = 1, λ_esd = 1,
λ_attn = 0.001, λ_keep = 0.1, λ_resco = 0.1, τ = 0.07, K = 3, start guidance 3, x_t from the model's default number
of sampling steps (28 for FLUX.1 dev). UNet models are refused: the method's losses read MM-DiT joint attention.
Training checkpoints to ``checkpoint`` and resumes bit-identically (``erasers.training.train``).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from safediff.adapters import Conditioning
from safediff.concepts import Concept
from safediff.errors import SafediffError
from safediff.erasers.base import Eraser
from safediff.erasers.low_rank import LowRankDeltas
from safediff.erasers.prompts import WordFinder, contexts, word_positions
from safediff.erasers.training import (TrainingState, keywords_of, loss_summary, run_fingerprint,
                                       train, trainable)
from safediff.options import option
from safediff.sampling import Trajectories, denoiser_output

_JOINT_ATTN = re.compile(r"^transformer_blocks\.(\d+)\.attn$")
LORA_TARGETS = {"text-qk": ("add_q_proj", "add_k_proj"),
                "attention": ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                              "to_add_out")}


def joint_attention_modules(denoiser) -> list[tuple[str, torch.nn.Module]]:
    """The joint (double-stream) blocks' attention modules, in block order."""
    found = [(n, m) for n, m in denoiser.named_modules() if _JOINT_ATTN.match(n)]
    return sorted(found, key=lambda nm: int(_JOINT_ATTN.match(nm[0]).group(1)))


def _heads(x: torch.Tensor, attn) -> torch.Tensor:
    return x.unflatten(-1, (attn.heads, -1))  # [B, S, H, d]


def image_to_text_probs(attn, hidden: torch.Tensor, context: torch.Tensor, rotary=None) -> torch.Tensor:
    """[B, H, N, L]: the attention probabilities of the N image queries on the L text keys in one joint attention
    call (softmax over text and image keys), recomputed from the module's projections."""
    from diffusers.models.embeddings import apply_rotary_emb

    q, k_img = _heads(attn.to_q(hidden), attn), _heads(attn.to_k(hidden), attn)
    k_txt = _heads(attn.add_k_proj(context), attn)
    if attn.norm_q is not None:
        q, k_img = attn.norm_q(q), attn.norm_k(k_img)
    if attn.norm_added_k is not None:
        k_txt = attn.norm_added_k(k_txt)
    keys = torch.cat([k_txt, k_img], dim=1)  # FLUX's order (its RoPE table is text, then image)
    if rotary is not None:
        n_txt = context.shape[1]
        keys = apply_rotary_emb(keys, rotary, sequence_dim=1)
        q = apply_rotary_emb(q, tuple(r[n_txt:] for r in rotary), sequence_dim=1)
    scores = torch.einsum("bnhd,bmhd->bhnm", q, keys) * q.shape[-1] ** -0.5  # SDPA's default scale
    return scores.softmax(dim=-1)[..., :context.shape[1]]


@contextlib.contextmanager
def joint_attention_maps(denoiser, blocks: str, sink: list):
    """While active, every call of the read joint blocks (``blocks``: "last" or "all") appends its image->text
    probabilities [B, H, N, L] to ``sink``."""
    modules = joint_attention_modules(denoiser)
    read = modules[-1:] if blocks == "last" else modules

    def hook(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        sink.append(image_to_text_probs(module, hidden, kwargs["encoder_hidden_states"],
                                        kwargs.get("image_rotary_emb")))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for _, m in read]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def attention_penalty(maps: list[torch.Tensor], positions: list[int]) -> torch.Tensor:
    """L_attn: Σ over blocks and concept positions j of the Frobenius norm of the probabilities on token j."""
    return sum(m[..., positions].flatten(0, 2).norm(dim=0).sum() for m in maps)


def attention_vector(maps: list[torch.Tensor], positions: list[int]) -> torch.Tensor:
    """[B, N]: the attention on ``positions``, averaged over them, the heads and the blocks."""
    return torch.stack([m[..., positions].mean(dim=(1, 3)) for m in maps]).mean(0)


def resco_loss(anchor: torch.Tensor, centre: torch.Tensor, irrelevant: list[torch.Tensor],
               temperature: float) -> torch.Tensor:
    """L_ReSCo: the log-probability of ``centre`` among [centre, *irrelevant] under cos(anchor, ·)/τ (batch mean)."""
    others = torch.stack([centre, *irrelevant], dim=1)  # [B, 1+K, N]
    logits = F.cosine_similarity(anchor[:, None], others, dim=-1) / temperature
    return (logits[:, 0] - logits.logsumexp(dim=1)).mean()


@dataclass
class EraseAnything(Eraser):
    name: ClassVar[str] = "erase-anything"
    paper: ClassVar[str] = ("Gao et al., EraseAnything: Enabling Concept Erasure in Rectified Flow Transformers, "
                            "ICML 2025 (arXiv 2412.20413)")
    archs: ClassVar[tuple[str, ...]] = ("sd3", "flux")
    archs_reason: ClassVar[str] = ("its losses read MM-DiT joint attention (image queries on text keys) and train "
                                   "its LoRA; on UNet models use esd-x or uce")
    # no 'benchmark' entry: sandbox-flux benchmarks run it at its defaults (the UNet sandbox it refuses)
    sandbox: ClassVar[dict[str, dict]] = {"smoke": {"iterations": 2, "rank": 2, "ddim_steps": 2,
                                                    "irrelevant": 2}}
    zero_strength: ClassVar[dict] = {"lr": 0.0}

    iterations: int = option(200, low=0, help="AdamW steps (alternating levels: even erase, odd keep)")
    lr: float = option(1e-3, low=0.0, help="learning rate of the LoRA")
    weight_decay: float = option(1e-5, low=0.0, help="AdamW weight decay")
    rank: int = option(8, low=1, help="LoRA rank r (α = r)")
    lora_on: str = option("text-qk", help="'text-qk' (add_q/add_k, the reference) or 'attention' (all projections)")
    schedule: str = option("alternate", help="'alternate' (reference: even L_un, odd L_ir) or 'joint' (their sum)")
    negative_guidance: float = option(1.0, help="η of L_esd")
    esd_weight: float = option(1.0, low=0.0, help="λ_esd")
    attn_weight: float = option(1e-3, low=0.0, help="λ_attn of the attention-map regulariser")
    keep_weight: float = option(0.1, low=0.0, help="λ_keep of the preserve prompts' velocity term")
    resco_weight: float = option(0.1, low=0.0, help="λ_resco of the reverse self-contrastive term")
    temperature: float = option(0.07, low=1e-6, help="τ of L_ReSCo")
    irrelevant: int = option(3, low=1, help="K preserve prompts per L_ReSCo step")
    attention_blocks: str = option("last", help="joint blocks read: 'last' (reference) or 'all'")
    expand_prompts: bool = option(True, help="the concept word in its contexts too, not only alone")
    start_guidance: float = option(3.0, low=0.0, help="CFG scale of x_t's partial sampling")
    ddim_steps: int | None = option(None, low=1, help="sampling steps of x_t (None: the model's default)")
    seed: int = 0
    checkpoint: str | None = option(None, hyperparameter=False)
    checkpoint_every: int = option(50, low=1, hyperparameter=False)

    def __post_init__(self):
        super().__post_init__()
        for field, value, accepted in (("lora_on", self.lora_on, tuple(LORA_TARGETS)),
                                       ("schedule", self.schedule, ("alternate", "joint")),
                                       ("attention_blocks", self.attention_blocks, ("last", "all"))):
            if value not in accepted:
                raise SafediffError(f"erase-anything: {field} must be one of {', '.join(accepted)}, got {value!r}")
        self.losses: list[float] = []

    def touches(self, name: str) -> bool:
        component, _, rest = name.partition(".")
        m = re.match(r"^transformer_blocks\.\d+\.attn\.(.+)\.weight$", rest)
        return component == "transformer" and m is not None and m.group(1) in LORA_TARGETS[self.lora_on]

    def compute(self, model, concepts: list[Concept], preserve, guide, progress):
        run = EraseAnythingRun(self, model, concepts, preserve, guide)
        new, resumed_at = run.train(progress)
        info = {"prompts": len(run.prompts), "preserve_prompts": len(run.keep), "lora_layers": len(run.base),
                "steps": run.trajectories.steps, "resumed_at_iteration": resumed_at, **loss_summary(self.losses)}
        return new, info


class EraseAnythingRun:
    """One fit: the concept prompts and their token positions, the preserve prompts, the LoRA and the random stream."""

    def __init__(self, eraser: EraseAnything, model, concepts: list[Concept], preserve, guide):
        self.eraser, self.model = eraser, model
        adapter = model.adapter
        segments = [(s, WordFinder(adapter.tokenizers[s.encoders[0]])) for s in adapter.segments]

        def positions(prompt: str, word: str) -> list[int]:
            return [s.start + i for s, f in segments for i in word_positions(f, prompt, word, s.length)]

        self.prompts, self.positions, self.guides = [], [], []
        for c in concepts:
            for word in keywords_of([c]):
                for p in contexts(c, word, eraser.expand_prompts):
                    pos = positions(p, word)
                    if pos:
                        self.prompts.append(p)
                        self.positions.append(pos)
                        self.guides.append(c.guide if guide is None else guide)
        if not self.prompts:
            raise SafediffError("erase-anything: no concept word found in the text encoders' tokens")
        keep = list(preserve) if preserve is not None else [p for c in concepts for p in c.preserve]
        self.keep = [p for p in dict.fromkeys(keep) if p.strip() and positions(p, p)]
        if not self.keep:
            raise SafediffError("erase-anything: no preserve prompt (give --preserve or a concept with a preserve "
                                "list); the method keeps unrelated concepts with them")
        self.keep_positions = [positions(p, p) for p in self.keep]
        with torch.no_grad():
            self.conds = [adapter.encode([p]) for p in self.prompts]
            self.guide_conds = {g: adapter.encode_negative(None, 1) if g == "" else adapter.encode([g])
                                for g in dict.fromkeys(self.guides)}
            self.keep_conds = [adapter.encode([p]) for p in self.keep]
            self.uncond = adapter.encode_negative(None, 1)
        self.trajectories = Trajectories(model, eraser.ddim_steps)
        self.generator = torch.Generator().manual_seed(int(eraser.seed))
        targets = LORA_TARGETS[eraser.lora_on]
        named = dict(model.denoiser.named_parameters())
        self.base = {n: p.detach() for n, p in named.items()
                     if (m := re.match(r"^transformer_blocks\.\d+\.attn\.(.+)\.weight$", n)) and m.group(1) in targets}
        self.lora = LowRankDeltas(self.base, eraser.rank, self.generator)

    # -- random draws (every number from the run's generator) ------------------------------------------------
    def pick(self, n: int) -> int:
        return int(torch.randint(n, (1,), generator=self.generator))

    def draw(self, cond: Conditioning) -> tuple[int, torch.Tensor]:
        """(t, x_t) sampled from ``cond`` by the frozen model (the LoRA is never in the denoiser's weights)."""
        _, t, x = self.trajectories.draw(self.generator, cond, self.uncond, self.eraser.start_guidance)
        return t, x

    # -- forwards --------------------------------------------------------------------------------------------
    def forward(self, x, t, cond, trained: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(velocity, attention maps of the read blocks) of the trained (LoRA) or the frozen model."""
        maps: list[torch.Tensor] = []
        params = self.lora.merged(self.base) if trained else None
        with joint_attention_maps(self.model.denoiser, self.eraser.attention_blocks, maps):
            v = denoiser_output(self.model, x, t, cond, params=params)
        return v, maps

    def erase_loss(self, j: int, x, t) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(L_esd, L_attn, the trained model's attention vector on prompt j's concept tokens)."""
        e = self.eraser
        cond, anchor = self.conds[j], self.guide_conds[self.guides[j]]
        with torch.no_grad():
            v_anchor = denoiser_output(self.model, x, t, anchor)
            v_concept = denoiser_output(self.model, x, t, cond)
            target = v_anchor - e.negative_guidance * (v_concept - v_anchor)
        v, maps = self.forward(x, t, cond, trained=True)
        return (F.mse_loss(v, target), attention_penalty(maps, self.positions[j]),
                attention_vector(maps, self.positions[j]))

    def keep_loss(self, j: int, centre: torch.Tensor, x, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_keep on a preserve prompt, L_ReSCo around prompt j's attention ``centre``)."""
        e = self.eraser
        k = self.pick(len(self.keep))
        t_keep, x_keep = self.draw(self.keep_conds[k])
        with torch.no_grad():
            kept = denoiser_output(self.model, x_keep, t_keep, self.keep_conds[k])
        l_keep = F.mse_loss(self.forward(x_keep, t_keep, self.keep_conds[k], trained=True)[0], kept)
        others = [i for i in range(len(self.prompts)) if i != j] or [j]
        a = others[self.pick(len(others))]
        irrelevant = [self.pick(len(self.keep)) for _ in range(e.irrelevant)]
        with torch.no_grad():
            anchor = attention_vector(self.forward(x, t, self.conds[a], trained=False)[1], self.positions[a])
            irr = [attention_vector(self.forward(x, t, self.keep_conds[i], trained=False)[1], self.keep_positions[i])
                   for i in irrelevant]
        return l_keep, resco_loss(anchor, centre, irr, e.temperature)

    def step(self, iteration: int) -> tuple[torch.Tensor, dict]:
        e = self.eraser
        j = self.pick(len(self.prompts))
        t, x = self.draw(self.conds[j])
        l_esd, l_attn, centre = self.erase_loss(j, x, t)
        lower = e.esd_weight * l_esd + e.attn_weight * l_attn
        if e.schedule == "alternate" and iteration % 2 == 0:
            return lower, {"level": "erase", "t": t}
        l_keep, l_resco = self.keep_loss(j, centre, x, t)
        upper = e.keep_weight * l_keep + e.resco_weight * l_resco
        return (upper, {"level": "keep", "t": t}) if e.schedule == "alternate" else (lower + upper, {"t": t})

    def train(self, progress: bool) -> tuple[dict[str, torch.Tensor], int | None]:
        e = self.eraser
        state = TrainingState(self.lora.params, None, {"training": self.generator}, losses=[])
        fingerprint = run_fingerprint(e, self.model, {"prompts": self.prompts, "keep": self.keep})
        with trainable(self.model.denoiser, {}, {}), torch.enable_grad():
            state.optimizer = torch.optim.AdamW(list(self.lora.params.values()), lr=e.lr,
                                                weight_decay=e.weight_decay)
            resumed = state.load(e.checkpoint, fingerprint) if e.checkpoint else False
            resumed_at = state.iteration if resumed else None
            train(state, e.iterations, self.step, checkpoint=e.checkpoint, checkpoint_every=e.checkpoint_every,
                  fingerprint=fingerprint, desc=e.name, progress=progress)
        e.losses = list(state.losses)
        prefix = self.model.adapter.denoiser_component
        merged = {f"{prefix}.{n}": (w + self.lora.delta(0, n)).detach() for n, w in self.base.items()}
        return merged, resumed_at
