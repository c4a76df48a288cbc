"""AdaVD: training-free erasure in the cross-attention value space, as a guard (Wang et al., "Precise, Fast, and
Low-cost Concept Erasure in Value Space: Orthogonal Complement Matters", CVPR 2025, arXiv 2412.06143; reference code
WYuan1001/AdaVD). Multi-concept: every keyword of every concept is erased at once.

For every cross-attention value projection ``W_v`` (``attn2.to_v``) and concept keyword k, the target value is
``t_k = W_v e_k``, with ``e_k`` the text-encoder row of the keyword's last token in the prompt made of the keyword
alone (the reference "spreads" that row over positions 1..L-1, so one vector serves every position). At every
position l >= 1 of every conditioning row that the UNet reads (all CFG branches, as the reference), the value
``v = W_v c_l`` is replaced by its shifted orthogonal complement:

    one keyword:  v' = v − σ(cos(v, t)) (vᵀt / tᵀt) t
    n keywords:   u = G t (Gram–Schmidt: G lower-triangular, the u_i orthogonal),
                  v' = v − Σ_i (vᵀu_i / u_iᵀu_i) Σ_j G_ij σ(cos(v, t_j)) t_j
    shift factor: σ(x) = c / (1 + exp(−a (x − b)))

so a value close to a target (cos above b) loses c times its projection on it (c = 2 over-corrects, the "shift"),
and one far from every target is left as it is. With every σ = 1 the rule is the orthogonal projection onto the
complement of span{t_i}. Position 0 (BOS) is never changed; timesteps t <= ``decomp_timestep`` are left alone.

Defaults (the reference's): a = 100, b = 0.93, c = 2, decomp_timestep = 0. Values are decomposed on every CFG branch
(the reference's processor does not tell them apart). The rule acts through forward hooks on the ``to_v`` Linears
for the duration of the denoising loop (``Session.unet_hooks``), removed afterwards; with c = 0 no hook is installed
(plain classifier-free guidance, bit for bit). Each row of the batch is decomposed on its own, so batch members are
independent.

Where (``space``). ``values`` (the paper, default): the outputs of the cross-attention value projections
``attn2.to_v``, which read the encoder rows, so ``t_k = W_v e_k`` is the value the keyword's row would give. SD3/FLUX
(MM-DiT) have no such layer: their context value projections ``attn.add_v_proj`` read the text stream after k
blocks (normalised, modulated by the timestep, mixed with the image by joint attention), for which the encoder row
e_k gives no target; ``space=values`` is refused there in one line. ``readers`` (our port, not in the paper): the
same rule on the outputs of every layer that reads the encoders' token rows (``adapter.text_readers()["tokens"]``:
MM-DiT ``context_embedder``, whose output is the text stream every block reads; UNet models: ``attn2.to_k`` and
``to_v``, keys decomposed too), with ``t_k = W e_k + b``, ``e_k`` the keyword's last-token row in every segment
(SD3: CLIP and T5; FLUX: T5), and every segment's BOS position left as it is (T5 has none). This is the
``transformer_options`` the guard contract runs SD3/FLUX with.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch

from safediff.concepts import Concept
from safediff.errors import SafediffError
from safediff.guards.base import GenerationContext, Guard, Session
from safediff.options import check_fields, option, with_preset

SPACES = ("values", "readers")
BASIS_RTOL = 1e-6  # a Gram–Schmidt vector this much shorter than the longest target is dropped (collinear targets)


@dataclass(frozen=True)
class AdaVDParams:
    a: float = option(low=0.0, high=1e4, help="sharpness a of the shift factor σ")
    b: float = option(low=-1.0, high=1.0, help="cosine b at which σ reaches c/2")
    c: float = option(low=0.0, high=10.0, help="shift scale c (the largest σ); 0 = off")
    decomp_timestep: int = option(low=0, high=10_000, help="values are decomposed at timesteps t > this")
    space: str = option("values", help="'values': cross-attention values (the paper; UNet models); 'readers': the "
                                       "outputs of the layers reading the encoder rows (SD3/FLUX: context_embedder)")

    def __post_init__(self):
        check_fields(self, "adavd")
        if self.space not in SPACES:
            raise SafediffError(f"adavd: unknown space {self.space!r}; accepted: {', '.join(SPACES)}")


PRESETS = {"paper": {"a": 100.0, "b": 0.93, "c": 2.0, "decomp_timestep": 0, "space": "values"}}


def shift_factor(cos: torch.Tensor, p: AdaVDParams) -> torch.Tensor:
    """σ(cos) = c / (1 + exp(−a (cos − b))), as a sigmoid: the quotient form overflows exp at a = 100 far from b,
    which is harmless forward but makes its gradient inf/inf = NaN, and attacks differentiate through the guard."""
    return p.c * torch.sigmoid(p.a * (cos - p.b))


def gram_schmidt(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(G [n, n] lower-triangular, keep [n] bool): ``u = G t`` orthogonal (float64), ``keep`` False where u_i ≈ 0."""
    t = targets.double()
    n = len(t)
    g = torch.eye(n, dtype=torch.float64, device=t.device)
    for i in range(1, n):
        u = g[:i] @ t  # the orthogonal basis so far
        coef = (u @ t[i]) / (u * u).sum(1).clamp_min(torch.finfo(torch.float64).tiny)
        g[i, :i] = -(coef @ g[:i, :i])
    norms = (g @ t).norm(dim=1)
    return g, norms > BASIS_RTOL * t.norm(dim=1).max()


def decompose(values: torch.Tensor, targets: torch.Tensor, p: AdaVDParams, fixed: tuple[int, ...] = (0,)
              ) -> torch.Tensor:
    """The AdaVD rule on ``values`` [B, L, D] for ``targets`` [n, D] (module docstring); the positions ``fixed``
    (BOS) unchanged."""
    v, t = values.float(), targets.float()
    g, keep = gram_schmidt(targets)
    u = (g @ targets.double()).float()
    cos = torch.nn.functional.cosine_similarity(v[..., None, :], t, dim=-1)  # [B, L, n]
    sigma = shift_factor(cos, p)
    weight = (v @ u.T) / (u * u).sum(1).clamp_min(torch.finfo(torch.float32).tiny)  # [B, L, n]: vᵀu_i / u_iᵀu_i
    weight = torch.where(keep.to(weight.device), weight, torch.zeros_like(weight))
    weight[:, list(fixed)] = 0.0
    erased = ((weight @ g.float()) * sigma) @ t  # Σ_i w_i Σ_j G_ij σ_j t_j
    return (v - erased).to(values.dtype)


def hooked_layers(adapter, space: str) -> list[torch.nn.Linear]:
    """The Linears whose outputs are decomposed: ``values``: every ``attn2.to_v``; ``readers``: the layers reading
    the encoders' token rows."""
    if space == "values":
        return [m for n, m in adapter.text_kv() if n.endswith("to_v")]
    return [m for _, m in adapter.text_readers()["tokens"]]


def bos_positions(adapter) -> tuple[int, ...]:
    """Positions of ``Conditioning.embeds`` holding a begin-of-text token (each segment's first, where it has one)."""
    return tuple(s.start for s in adapter.segments if adapter.bos_offset(s.encoders[0]))


class AdaVDSession(Session):
    """Hooks on every hooked layer (``hooked_layers``): each call's outputs are decomposed against its targets."""

    def __init__(self, ctx: GenerationContext, params: AdaVDParams, rows: torch.Tensor):
        super().__init__(ctx)
        self.params = params
        self.layers = hooked_layers(ctx.model.adapter, params.space)
        # t_k = W e_k (+ b) per hooked layer, read here, at the session's start, through the weights loaded now (so
        # ``concept_weights=base`` reads them through the unedited ones, ``guards.unedited``)
        self.targets = [torch.nn.functional.linear(rows.to(device=m.weight.device, dtype=m.weight.dtype), m.weight,
                                                   m.bias) for m in self.layers]
        self.fixed = bos_positions(ctx.model.adapter)
        self.step = 0

    def branches(self, i: int):
        self.step = i
        return super().branches(i)

    def active(self) -> bool:
        return int(self.ctx.timesteps[self.step]) > self.params.decomp_timestep

    @contextlib.contextmanager
    def unet_hooks(self):
        def hook_for(target: torch.Tensor):
            def hook(module, args, output):
                return decompose(output, target, self.params, self.fixed) if self.active() else None
            return hook

        handles = [m.register_forward_hook(hook_for(t)) for m, t in zip(self.layers, self.targets)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


class AdaVD(Guard):
    """``adavd[:paper][,KEY=VALUE...]``; see the module docstring for the rule and defaults."""

    name = "adavd"
    default_concept = "sexual"
    default_preset = "paper"
    zero_strength = "c=0"
    presets = PRESETS
    params_class = AdaVDParams
    transformer_options = "space=readers"  # MM-DiT context value projections do not read the encoder rows
    concept_read_at_start = True  # keyword rows and targets are computed in start() (``concept_weights=base``)

    def __init__(self, concepts: list[Concept], preset: str | None = None, **overrides):
        self.concepts = list(concepts)
        self.keywords = list(dict.fromkeys(k for c in self.concepts for k in c.keywords if k.strip()))
        if not self.keywords:
            raise SafediffError("adavd: the concepts have no keyword; give presets (red, sexual) or free text")
        self.preset, self.params = with_preset(self.name, self.params_class, self.presets, self.default_preset,
                                               preset, overrides)

    def keyword_rows(self, adapter) -> torch.Tensor:
        """[n·S, D]: each keyword's conditioning row at its last token, in the prompt made of the keyword alone, in
        each of the S segments (SD3: CLIP, then T5)."""
        cond = adapter.encode(self.keywords).embeds
        index = torch.arange(len(self.keywords), device=cond.device)
        return torch.cat([cond[index, (adapter.eos_positions(self.keywords, s) - 1).clamp(min=s.start).to(cond.device)]
                          for s in adapter.segments])

    def start(self, ctx: GenerationContext) -> Session:
        arch = ctx.model.adapter.arch
        if self.params.space == "values" and not ctx.model.adapter.text_stream_is_encoder_output():
            raise SafediffError(f"adavd: space=values decomposes cross-attention values of the encoder rows, which the "
                                f"{arch} transformer does not have (its context values read a text stream transformed "
                                f"block by block); use adavd:paper,{self.transformer_options}")
        if self.params.c == 0.0:
            return Session(ctx)
        return AdaVDSession(ctx, self.params, self.keyword_rows(ctx.model.adapter))

    def config(self) -> dict:
        return {"name": self.name, "preset": self.preset, **dataclasses.asdict(self.params),
                "concepts": [c.name for c in self.concepts], "keywords": self.keywords}
