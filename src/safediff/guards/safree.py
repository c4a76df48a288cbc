"""SAFREE: a training-free guard that filters trigger tokens in the text-embedding space (and re-attends latents).

Yoon, Yu, Patil, Yao, Bansal, "SAFREE: Training-Free and Adaptive Guard for Safe Text-to-Image and Video
Generation", ICLR 2025, arXiv 2410.12761 (§3.1-3.4). Rules, in the paper's symbols:

1. Toxic subspace: C = [c_1 ... c_K] in R^{D x K}, c_k the pooled embedding of keyword k; P_C = C (C^T C)^+ C^T.
2. Trigger tokens: for each real token i = 1..n, p_\\i is the pooled embedding of the prompt with token i masked;
   d_i = ||(I - P_C) p_\\i||; token i is a trigger iff d_i >= (1 + alpha) * mean_{j != i} d_j (removing it moves the
   prompt away from the subspace).
3. Projection within the input space: P_I projects onto span{p_\\1 ... p_\\n}; each trigger token's embedding
   e_i <- (I - P_C) P_I e_i; every other position (BOS, other tokens, EOS, padding) is unchanged.
4. Self-validating filter: beta = 1 - mean_j cos((I - P_C) P_I e_j, e_j) over the attention-mask positions (BOS..EOS);
   t' = round(gamma * sigmoid(2k (10 beta - t0))); denoising steps i <= t' use the filtered embedding, later steps the
   original one. Per sample: each prompt of a batch has its own t'.
5. Adaptive latent re-attention on filtered steps (``latent_reattention.py``): 3 UNet branches (empty, filtered,
   original prompt) on those steps, 2 afterwards.

Variants (the research notes §3 list how the released code differs from the paper):
- ``safree`` (default, preset ``paper``): as described above; the user's negative prompt, if any, is kept.
- ``safree-released`` (= ``safree:released``): as the released code runs it, so published numbers can be compared:
  the keywords joined by ", " are also the CFG negative prompt (replacing any negative prompt given to ``generate``),
  and LRA is off (the released ``-lra`` flag only adds a UNet branch whose output is discarded; its Fourier filters
  are never called).

Interpretations:
- Pooled embedding = the adapter's conditioning row at the EOS position: for SD-1.x/2.x the text encoder's last hidden
  state there (CLIP's pooler output); for SDXL the concatenation of both encoders' penultimate states there (2048-d).
  That is the space the token embeddings e_i live in, so P_C and P_I act on them. SDXL's separate pooled
  ``text_embeds`` (added embedding) is left unchanged.
- Masking a token replaces its id by ``mask_token_id`` = 0, as the released code does (CLIP's and the sandbox's "!";
  in the random test tokenizer id 0 is BOS). The EOS position is that of the unmasked prompt.
- A one-token prompt has no j != i, so its token is never a trigger (the released code flags it through a NaN
  comparison).
- A prompt with no trigger token is never on a "filtered" step: its filtered embedding equals the original, so it is
  generated exactly as without the guard (2 branches, no re-attention).

Several encoders (SD3: a CLIP segment and a T5 segment of the token sequence; FLUX: T5's): rules 1-3 run in every
segment of the conditioning (``adapter.segments``) with that segment's own tokens, pooled rows (the row at its own
end-of-text token: CLIP's [EoT], T5's ``</s>``, which T5's bidirectional attention makes a summary of the prompt too)
and subspaces; masking a token changes only that segment's ids (id 0 is T5's ``<pad>``). β averages the cosines
over every segment's attention-mask positions; t' is one per prompt. The separate pooled vector (SDXL's
``text_embeds``, SD3's CLIP pooled, FLUX's CLIP pooled) is left unchanged, as SAFREE does for SDXL.
Latent re-attention reads UNet skip features; a transformer has none, so ``lra=1`` is refused on SD3/FLUX with the
options to use (``lra=0``, or ``safree-released``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import weakref
from dataclasses import dataclass

import torch

from safediff.adapters import Adapter, Conditioning, Segment
from safediff.concepts import Concept
from safediff.errors import SafediffError
from safediff.guards.base import GenerationContext, Guard, Session
from safediff.guards.latent_reattention import LatentReattention, ReattentionRows
from safediff.models import Model
from safediff.options import check_fields, option, with_preset


def projector(columns: torch.Tensor) -> torch.Tensor:
    """P = C (C^T C)^+ C^T for C = columns [D, K]: the orthogonal projector onto span(C), float64.

    Computed as U_r U_r^T from the SVD of C, keeping the singular values the pseudo-inverse of the Gram matrix keeps
    (sigma_k^2 > K eps sigma_1^2): the same matrix without squaring C's condition number (the masked-prompt
    embeddings spanning P_I are nearly collinear)."""
    c = columns.double()
    if c.shape[1] == 0:
        return torch.zeros(c.shape[0], c.shape[0], dtype=torch.float64, device=c.device)
    u, sigma, _ = torch.linalg.svd(c, full_matrices=False)
    keep = sigma > sigma[0] * math.sqrt(max(c.shape) * torch.finfo(torch.float64).eps)
    q = u[:, keep]
    return q @ q.T


def trigger_mask(distances: torch.Tensor, alpha: float) -> torch.Tensor:
    """Bool [n]: d_i >= (1 + alpha) * mean_{j != i} d_j (never true for n < 2)."""
    n = distances.shape[0]
    if n < 2:
        return torch.zeros(n, dtype=torch.bool, device=distances.device)
    mean_others = (distances.sum() - distances) / (n - 1)
    return distances >= (1.0 + alpha) * mean_others


def svf_steps(beta: float, gamma: int, k: float, t0: float) -> int:
    """The self-validating filter's last filtered step t' = round(gamma * sigmoid(2k (10 beta - t0)))."""
    return round(gamma * torch.sigmoid(torch.tensor(2.0 * k * (10.0 * beta - t0), dtype=torch.float64)).item())


def pooled(cond: Conditioning, eos: torch.Tensor) -> torch.Tensor:
    """[B, D]: the conditioning rows at the EOS positions."""
    return cond.embeds[torch.arange(len(cond), device=cond.embeds.device), eos.to(cond.embeds.device)]


def first_token(adapter: Adapter, segment: Segment) -> int:
    """Position (in ``Conditioning.embeds``) of the segment's first real token (after its BOS, if any)."""
    return segment.start + adapter.bos_offset(segment.encoders[0])


def masked_pooled(adapter: Adapter, prompts: list[str], eos: torch.Tensor, mask_token_id: int,
                  segment: Segment | None = None) -> list[torch.Tensor]:
    """Per prompt b, [n_b, D]: pooled embedding (the row at the segment's EOS) of the prompt with real token i of
    ``segment`` (default: the first) replaced by the mask id in that segment's ids."""
    segment = segment or adapter.segments[0]
    rows, owners, positions = [], [], []
    ids = [adapter.tokenize(prompts, k) for k in range(len(adapter.tokenizers))]
    for b, e in enumerate(eos.tolist()):
        for i in range(first_token(adapter, segment), e):
            owners.append(b)
            positions.append(i - segment.start)
    if not owners:
        return [torch.zeros(0, adapter.text_dim) for _ in prompts]
    owner_t = torch.tensor(owners)
    pos_t = torch.tensor(positions)
    for k, x in enumerate(ids):
        m = x[owner_t].clone()
        if k in segment.encoders:
            m[torch.arange(len(owners)), pos_t] = mask_token_id
        rows.append(m)
    cond = adapter.encode_ids(rows)
    p = pooled(cond, eos[owner_t])
    return [p[owner_t.to(p.device) == b] for b in range(len(prompts))]


@dataclass
class TokenFilter:
    """SAFREE's text-space result for a batch."""

    filtered: Conditioning  # prompt conditioning with trigger tokens projected
    triggers: torch.Tensor  # bool [B, L]: positions that were projected
    distances: list[torch.Tensor]  # per prompt, d_i for its real tokens i = 1..n (segment after segment)
    beta: list[float]
    t_prime: list  # last filtered step per prompt, an int (steps i <= t'); inf with the SVF off
    categories: torch.Tensor | None = None  # long [B, L]: CASG's category per trigger position (-1 elsewhere)

    @property
    def has_trigger(self) -> torch.Tensor:
        return self.triggers.any(dim=1)


@dataclass(frozen=True)
class SafreeParams:
    alpha: float = option(low=0.0, high=10.0, help="trigger-token margin α")
    gamma: int = option(low=0, high=10_000, help="most filtered steps γ of the self-validating filter")
    k: float = option(low=1e-3, high=100.0, help="slope k of the self-validating filter's sigmoid")
    t0: float = option(low=-100.0, high=100.0, help="midpoint t₀ of the self-validating filter's sigmoid")
    svf: int = option(low=0, high=1, help="self-validating filter (1) or the filtered embedding at every step (0)")
    lra: int = option(low=0, high=1, help="adaptive latent re-attention on filtered steps (1) or off (0)")
    negative_prompt: int = option(low=0, high=1, help="keywords joined by ', ' as the CFG negative prompt (1) or not")
    b1: float = option(low=0.0, high=10.0, help="backbone factor b of the first up block")
    b2: float = option(low=0.0, high=10.0, help="backbone factor b of the second up block")
    s1: float = option(low=0.0, high=1.0, help="low-frequency attenuation s of the first up block")
    s2: float = option(low=0.0, high=1.0, help="low-frequency attenuation s of the second up block")
    lra_radius: int = option(low=0, high=64, help="low-frequency radius τ of the re-attention")
    mask_token_id: int = option(low=0, high=10_000_000, help="token id that replaces a token to mask it")

    def __post_init__(self):
        check_fields(self, "safree")


_COMMON = {"alpha": 0.01, "gamma": 10, "k": 2.5, "t0": 5.333, "svf": 1, "b1": 1.0, "b2": 1.0, "s1": 0.9, "s2": 0.2,
           "lra_radius": 1, "mask_token_id": 0}
PRESETS: dict[str, dict] = {
    "paper": {**_COMMON, "negative_prompt": 0, "lra": 1},
    "released": {**_COMMON, "negative_prompt": 1, "lra": 0},
}


class SafreeGuard(Guard):
    """``safree[:PRESET][,KEY=VALUE...]``: as the paper describes it (``paper``) or as released (``released``)."""

    name = "safree"
    default_concept = "safree-nudity"
    presets = PRESETS
    params_class = SafreeParams
    default_preset = "paper"
    zero_strength = "alpha=10,negative_prompt=0"  # no token is a trigger (the margin is the largest accepted)
    transformer_options = "lra=0"  # latent re-attention edits UNet skip features
    per_category = False  # CASG-SAFREE: each trigger token is projected against one category's subspace

    def __init__(self, concepts: list[Concept], preset: str | None = None, **overrides):
        if not concepts:
            raise SafediffError(f"{self.name} needs at least one concept (e.g. {self.default_concept})")
        overrides = {k: int(v) if isinstance(v, bool) else v for k, v in overrides.items()}
        self.preset, self.params = with_preset(self.name, self.params_class, self.presets, self.default_preset,
                                               preset, overrides)
        self.values = v = dataclasses.asdict(self.params)
        self.concepts = list(concepts)
        self.keywords = tuple(dict.fromkeys(kw for c in self.concepts for kw in c.keywords if kw.strip()))
        if not self.keywords:
            raise SafediffError(f"{self.name}: the concepts have no keywords; give a preset name or free text")
        self.alpha, self.gamma, self.k, self.t0 = v["alpha"], v["gamma"], v["k"], v["t0"]
        self.svf, self.lra, self.negative_prompt = bool(v["svf"]), bool(v["lra"]), bool(v["negative_prompt"])
        self.b, self.s = (v["b1"], v["b2"]), (v["s1"], v["s2"])
        self.lra_radius, self.mask_token_id = v["lra_radius"], v["mask_token_id"]
        self._cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    # -- subspaces -------------------------------------------------------------------------------------------
    def subspace_texts(self) -> dict[str, list[str]]:
        """The texts whose pooled embeddings are the columns of each subspace (``global`` = P_C)."""
        return {"global": list(self.keywords)}

    @torch.no_grad()
    def subspaces(self, model: Model, segment: Segment | None = None) -> dict[str, torch.Tensor]:
        """Projectors [D, D] (float64) per subspace name in ``segment``'s rows (default: the first segment), cached
        per text encoder, edits and device."""
        segment = segment or model.adapter.segments[0]
        encoder = model.adapter.text_encoders[0]
        key = (len(model.edits), str(model.device), model.dtype)
        per_model = self._cache.setdefault(encoder, {})
        if per_model.get("key") != key:
            per_model.clear()
            per_model["key"] = key
        if segment not in per_model:
            texts = self.subspace_texts()
            flat = [t for ts in texts.values() for t in ts]
            adapter = model.adapter
            emb = pooled(adapter.encode(flat), adapter.eos_positions(flat, segment))
            out, start = {}, 0
            for name, ts in texts.items():
                out[name] = projector(emb[start:start + len(ts)].T)
                start += len(ts)
            per_model[segment] = out
        return per_model[segment]

    def project_triggers(self, e: torch.Tensor, masked: torch.Tensor, trig: torch.Tensor, p_input: torch.Tensor,
                         spaces: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Projected embeddings [m, D] of the trigger tokens' embeddings e [m, D] (float64), and their categories
        (or None). masked: [n, D] every real token's p_\\i; trig: long [m], the trigger tokens' indices in it."""
        eye = torch.eye(e.shape[1], dtype=e.dtype, device=e.device)
        return e @ ((eye - spaces["global"]) @ p_input).T, None

    # -- the text-space filter ---------------------------------------------------------------------------------
    @torch.no_grad()
    def filter(self, model: Model, prompts: list[str], cond: Conditioning) -> TokenFilter:
        """Detect trigger tokens, project them, and set each prompt's t' (rules 2-4 of the module docstring), in
        every segment of the conditioning."""
        adapter = model.adapter
        embeds = cond.embeds.clone()
        triggers = torch.zeros(embeds.shape[:2], dtype=torch.bool)
        categories = torch.full(embeds.shape[:2], -1, dtype=torch.long) if self.per_category else None
        distances = [[] for _ in prompts]
        cosines = [[] for _ in prompts]
        for segment in adapter.segments:
            spaces = self.subspaces(model, segment)
            p_c = spaces["global"]
            eye = torch.eye(p_c.shape[0], dtype=p_c.dtype, device=p_c.device)
            eos = adapter.eos_positions(prompts, segment)
            masked = masked_pooled(adapter, prompts, eos, self.mask_token_id, segment)
            first = first_token(adapter, segment)
            for b, n_eos in enumerate(eos.tolist()):
                e = cond.embeds[b].to(p_c)  # [L, D]
                m = masked[b].to(p_c)  # [n, D]
                d = torch.linalg.vector_norm(m @ (eye - p_c).T, dim=1)
                is_trigger = trigger_mask(d, self.alpha)
                p_input = projector(m.T)
                active = e[segment.start:n_eos + 1]  # attention-mask positions (BOS..)EOS
                filtered_all = active @ ((eye - p_c) @ p_input).T
                cosines[b].append(torch.nn.functional.cosine_similarity(filtered_all, active, dim=1))
                idx = torch.nonzero(is_trigger).flatten() + first  # token positions
                if len(idx):
                    projected, cats = self.project_triggers(e[idx], m, idx - first, p_input, spaces)
                    embeds[b, idx.to(embeds.device)] = projected.to(embeds)
                    triggers[b, idx.cpu()] = True
                    if categories is not None:
                        categories[b, idx.cpu()] = cats.cpu()
                distances[b].append(d.float().cpu())
        betas = [float(1.0 - torch.cat(c).mean()) for c in cosines]
        t_primes = [svf_steps(beta, self.gamma, self.k, self.t0) if self.svf else math.inf for beta in betas]
        return TokenFilter(Conditioning(embeds, cond.pooled), triggers, [torch.cat(d) for d in distances], betas,
                           t_primes, categories)

    # -- generation ---------------------------------------------------------------------------------------------
    def negative_text(self) -> str:
        return ", ".join(self.keywords)

    def start(self, ctx: GenerationContext) -> "SafreeSession":
        if self.lra and not ctx.model.adapter.skip_features:
            raise SafediffError(f"{self.name}: latent re-attention (lra=1) edits UNet skip features, which the "
                                f"{ctx.model.adapter.arch} transformer does not have; use {self.name}:paper,lra=0 "
                                "(the text projection alone) or safree-released")
        if self.negative_prompt:
            uncond = ctx.model.adapter.encode_negative([self.negative_text()] * len(ctx.prompts), len(ctx.prompts))
            ctx = dataclasses.replace(ctx, uncond=uncond)
        return SafreeSession(ctx, self, self.filter(ctx.model, ctx.prompts, ctx.cond))

    def config(self) -> dict:
        return {
            "name": self.name, "preset": self.preset, **self.values,
            "negative_prompt_text": self.negative_text() if self.negative_prompt else None,
            "concepts": [{"name": c.name, "keywords": list(c.keywords)} for c in self.concepts],
            "subspaces": self.subspace_texts(),
        }


class SafreeReleasedGuard(SafreeGuard):
    """``safree-released``: SAFREE as its released code runs (keywords as negative prompt, no re-attention)."""

    name = "safree-released"
    default_preset = "released"
    transformer_options = ""  # the released preset has no latent re-attention


class SafreeSession(Session):
    """Per step: the filtered prompt for samples with triggers while i <= t', else the original; LRA branch."""

    def __init__(self, ctx: GenerationContext, guard: SafreeGuard, result: TokenFilter):
        super().__init__(ctx)
        self.guard = guard
        self.result = result
        self.t_prime = torch.tensor(result.t_prime, dtype=torch.float64)
        self.reattention = LatentReattention(guard.b, guard.s, guard.lra_radius) if guard.lra else None
        self._rows: ReattentionRows | None = None

    def filtered_at(self, i: int) -> torch.Tensor:
        """Bool [B]: which samples use the filtered embedding at step i."""
        return self.result.has_trigger & (i <= self.t_prime)

    def branches(self, i: int) -> list[Conditioning]:
        on = self.filtered_at(i)
        cond = self.ctx.cond.where(on, self.result.filtered)
        out = [self.ctx.uncond, cond] if self.ctx.cfg else [cond]
        self._rows = None
        if self.reattention is not None and bool(on.any()):
            n = len(cond)
            idx = torch.nonzero(on).flatten()
            first = n * (len(out) - 1)  # row offset of the filtered branch
            self._rows = ReattentionRows(n * (len(out) + 1), first + idx, n * len(out) + idx)
            out.append(self.ctx.cond)
        return out

    def unet_hooks(self) -> contextlib.AbstractContextManager:
        if self.reattention is None:
            return contextlib.nullcontext()
        return self.reattention.attach(self.ctx.model.denoiser, lambda: self._rows)
