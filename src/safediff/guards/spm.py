"""SPM's Facilitated Transport as a guard: the trained membrane applied to each prompt at its transport rate.

Lyu et al., "One-dimensional Adapter to Rule Them All: Concepts, Diffusion Models and Erasing Applications", CVPR
2024 (arXiv 2312.16145), Facilitated Transport; reference code Con6924/SPM ``infer_spm.py``. The membrane is trained
by the eraser ``spm`` (``safediff.erasers.spm``), whose edit holds it merged: ΔW = (α/r) U D on every adapted layer.
Merged into the weights it acts on every prompt at full strength; this guard applies it per prompt P instead:

    W x  ->  W x + s · f(γ_k(P)) · ΔW_k x       for every adapted Linear/Conv2d and every membrane k
    γ_k(P) = max_{c ∈ C_k} max( cos(vec E(P), vec E(c)),  |T(P) ∩ T(c)| / |T(c)| )

E(·): the text conditioning the denoiser reads ([L, D], flattened; SD3: the CLIP and T5 segments, FLUX: T5);
T(·): the set of a text's token ids without special tokens (of the first tokenizer: CLIP on every architecture);
C_k: the keywords membrane k was trained to erase (from its edit's record). f(γ) = γ (``scaling=linear``, the paper's
modulation of the membrane by the transport rate); ``scaling=reference`` gives f(γ) = γ², what
``infer_spm.py`` computes by multiplying both factors U and D by γ. ``metric`` picks the reference's matching scores
(``clipcos_tokenuni``: the maximum of both, the default; ``clipcos``; ``tokenuni``). The rate of sample b scales the
membrane on every branch of that sample (∅, the prompt, a negative prompt), as the reference applies one multiplier
to its whole pipeline call; a prompt given as conditioning only (attacks) is matched by its conditioning, and by the
text it is labelled with for the token overlap. ``transport=false`` sets γ = 1: the merged membrane, through the
same hooks, so both forms are measured alike. ``s`` (``strength``) scales everything; 0 is plain CFG.

Options: ``edit`` (required): one or more SPM edits (``;``-separated paths, each made by ``safediff erase --method
spm`` for this model's weights and the edits it carries); their membranes stack, each with its own rate (the
reference's several ``--spm_path``). ``--concept`` must name the concepts the membranes erase. Presets: ``paper``
(default), ``reference`` (γ² scaling), ``merged`` (no transport). One denoiser call per step; the hooks add one matrix
product per adapted layer and membrane and are removed after the call.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from safediff.concepts import Concept
from safediff.errors import SafediffError
from safediff.guards.base import GenerationContext, Guard, Session
from safediff.identity import ByIdentity
from safediff.options import check_fields, option, with_preset

METRICS = ("clipcos_tokenuni", "clipcos", "tokenuni")
SCALINGS = ("linear", "reference")
PRESETS = {
    "paper": {"edit": (), "strength": 1.0, "transport": True, "scaling": "linear", "metric": "clipcos_tokenuni"},
    "reference": {"edit": (), "strength": 1.0, "transport": True, "scaling": "reference",
                  "metric": "clipcos_tokenuni"},
    "merged": {"edit": (), "strength": 1.0, "transport": False, "scaling": "linear", "metric": "clipcos_tokenuni"},
}


@dataclass(frozen=True)
class SPMParams:
    edit: tuple[str, ...] = option(help="SPM edit file(s), ';'-separated (made by `safediff erase --method spm`)")
    strength: float = option(low=0.0, high=100.0, help="s, scale of every membrane (0: plain CFG)")
    transport: bool = option(help="facilitated transport (true) or the merged membrane on every prompt (false)")
    scaling: str = option(help="'linear' (γ ΔW, paper) or 'reference' (γ² ΔW, infer_spm.py)")
    metric: str = option(help="'clipcos_tokenuni' (reference default), 'clipcos' or 'tokenuni'")

    def __post_init__(self):
        check_fields(self, "spm")
        if self.scaling not in SCALINGS:
            raise SafediffError(f"spm: unknown scaling '{self.scaling}'; accepted: {', '.join(SCALINGS)}")
        if self.metric not in METRICS:
            raise SafediffError(f"spm: unknown metric '{self.metric}'; accepted: {', '.join(METRICS)}")


def token_sets(tokenizer, texts: list[str]) -> list[set[int]]:
    """Each text's token ids without special tokens (BOS, EOS, padding)."""
    special = set(tokenizer.all_special_ids)
    ids = tokenizer(texts, truncation=True, max_length=tokenizer.model_max_length).input_ids
    return [set(x) - special for x in ids]


def transport_rates(adapter, prompts: list[str], embeds: torch.Tensor, erased: list[str], metric: str) -> torch.Tensor:
    """γ(P) [B] for prompts with conditioning ``embeds`` [B, L, D]: the best match over the ``erased`` texts."""
    erased_embeds = adapter.encode(erased).embeds
    cos = F.cosine_similarity(embeds.flatten(1).float()[:, None], erased_embeds.flatten(1).float()[None], dim=-1)
    tok = adapter.tokenizers[0]
    mine, theirs = token_sets(tok, prompts), token_sets(tok, erased)
    overlap = torch.tensor([[len(p & e) / max(len(e), 1) for e in theirs] for p in mine], dtype=torch.float32,
                           device=cos.device)
    score = {"clipcos": cos, "tokenuni": overlap, "clipcos_tokenuni": torch.maximum(cos, overlap)}[metric]
    return score.max(dim=1).values


@dataclass
class MembraneLayer:
    module: torch.nn.Module
    deltas: list[torch.Tensor]  # one ΔW per membrane, in the layer's weight shape


class SPMSession(Session):
    """One batch: per-sample coefficients s·f(γ_k) and the hooks that add them times ΔW_k x."""

    def __init__(self, ctx: GenerationContext, layers: dict[str, MembraneLayer], coefficients: torch.Tensor):
        super().__init__(ctx)
        self.layers = layers
        self.coefficients = coefficients  # [K, B]

    def unet_hooks(self) -> contextlib.AbstractContextManager:
        return self._hooks()

    @contextlib.contextmanager
    def _hooks(self):
        handles = [layer.module.register_forward_hook(partial(self._add, layer)) for layer in self.layers.values()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _add(self, layer: MembraneLayer, module, args, output):
        x = args[0]
        rows, batch = output.shape[0], self.coefficients.shape[1]
        if rows % batch:
            raise SafediffError(f"spm: a denoiser call of {rows} rows does not hold whole branches of {batch} samples")
        extra = torch.zeros_like(output, dtype=torch.float32)
        for delta, coefficient in zip(layer.deltas, self.coefficients):
            if isinstance(module, torch.nn.Conv2d):
                y = F.conv2d(x.float(), delta, None, module.stride, module.padding, module.dilation, module.groups)
            else:
                y = F.linear(x.float(), delta)
            extra = extra + coefficient.repeat(rows // batch).view(rows, *[1] * (y.ndim - 1)) * y
        return output + extra.to(output.dtype)


class SPMGuard(Guard):
    """``spm[:PRESET],edit=PATH[;PATH...]``; see the module docstring."""

    name = "spm"
    default_concept = None
    sandbox_preset = None
    edit_from = "spm"  # the eraser whose edits this guard applies (its ``edit`` option)
    zero_strength = "strength=0"
    continuous = ""  # γ is continuous in the conditioning; no threshold
    presets = PRESETS
    default_preset = "paper"
    params_class = SPMParams

    def __init__(self, concepts: list[Concept], preset: str | None = None, **overrides):
        from safediff.edits import Edit

        self.concepts = list(concepts)
        self.preset, self.params = with_preset(self.name, self.params_class, self.presets, self.default_preset,
                                               preset, overrides)
        if not self.params.edit:
            raise SafediffError("the spm guard needs edit=PATH: an SPM edit made for this model by "
                                "`safediff erase --method spm --concept ... --out PATH`")
        self.edits = [Edit.load(p) for p in self.params.edit]
        for path, edit in zip(self.params.edit, self.edits):
            if edit.method != "spm":
                raise SafediffError(f"spm: '{path}' is a {edit.method} edit; the spm guard applies SPM membranes")
        self.erased = [[k for c in e.metadata["concepts"] for k in c["keywords"] if k.strip()] for e in self.edits]
        trained = sorted({c["name"] for e in self.edits for c in e.metadata["concepts"]})
        if sorted({c.name for c in self.concepts}) != trained:
            raise SafediffError(f"spm: the membranes erase {', '.join(trained)}; give --concept {','.join(trained)}")
        self.values = dataclasses.asdict(self.params)
        self._layers: ByIdentity[tuple[tuple, dict[str, MembraneLayer]]] = ByIdentity()  # model -> (edits, layers)

    def layers(self, model) -> dict[str, MembraneLayer]:
        """Module name -> the module and its ΔW per membrane (computed once per model state)."""
        key = tuple(e.digest for e in model.edits)
        if model not in self._layers or self._layers[model][0] != key:
            per_edit = [edit.deltas(model) for edit in self.edits]
            names = sorted({n for d in per_edit for n in d})
            layers = {}
            for name in names:
                module_name = name.partition(".")[2].removesuffix(".weight")
                module = model.denoiser.get_submodule(module_name)
                zero = torch.zeros(module.weight.shape, dtype=torch.float32, device=module.weight.device)
                layers[module_name] = MembraneLayer(module, [d.get(name, zero) for d in per_edit])
            self._layers[model] = (key, layers)
        return self._layers[model][1]

    def start(self, ctx: GenerationContext) -> Session:
        p = self.params
        if p.strength == 0.0:
            return Session(ctx)
        model = ctx.model
        rates = []
        for erased in self.erased:
            if p.transport:
                gamma = transport_rates(model.adapter, ctx.prompts, ctx.cond.embeds, erased, p.metric)
            else:
                gamma = torch.ones(len(ctx.prompts), device=ctx.cond.embeds.device)
            rates.append(gamma * gamma if p.scaling == "reference" else gamma)
        return SPMSession(ctx, self.layers(model), p.strength * torch.stack(rates).float())

    def config(self) -> dict:
        return {"name": self.name, "preset": self.preset, **self.values,
                "edit_sha256": [e.digest for e in self.edits], "concepts": [c.name for c in self.concepts],
                "erased": self.erased}
