"""ConceptPrune: concept editing by pruning "skilled" neurons (Chavhan, Li, Hospedales; ICLR 2025, arXiv 2405.19237;
reference code ruchikachavhan/concept-prune ``wanda/wanda.py``, ``wanda/save_union_over_time.py``). Training-free,
multi-concept (the union of every concept's skilled neurons, as the reference's ``multi_concept_union``).

For every feed-forward output layer ``W`` (``ff.net.2``: d × d_ff, after the GEGLU) of the UNet's transformer blocks:

1. Activations. Generate from paired prompts with the same seeds: *concept* prompts (each keyword in the concept's
   contexts, ``erasers.prompts.contexts``) and *base* prompts (the same with the word replaced by the guide, "" by
   default: the reference's "a {thing} in the style of {target}" vs "a photo of a {thing}"). At denoising step t,
   the layer's input rows X (every token of every image of the classifier-free-guidance batch, each row normalised
   to unit L2 norm, as the reference) accumulate into the column norms ``‖X_j‖₂`` (j = 1..d_ff).
2. WANDA scores (Sun et al. 2024) ``S_ij(t) = |W_ij| · ‖X_j(t)‖`` for concept (``S^c``) and base (``S^b``) prompts.
3. Skilled at step t: ``j`` among the ``⌊ρ d_ff⌋`` largest ``S^c_ij(t)`` of row i (ρ = ``skill_ratio``) and
   ``S^c_ij(t) > S^b_ij(t)``.
4. Pruned: the weights skilled at more than ``τ T`` of the T steps (τ = ``select_ratio``; 0 = the union over steps,
   as the reference's ``save_union_over_time``). The edit sets those weights to zero: ``W ← W ⊙ (1 − M)``.

Defaults: ρ = 0.01 (reference config), τ = 0 (union; the reference passes τ on its command line and its value for
each experiment could not be read), T = the model's default number of sampling steps (the reference: its pipeline's
50), one image per prompt pair. The edit records the fraction of the FFN weights it zeroes (the paper: ~0.12 % of
all UNet weights).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from safediff.concepts import Concept
from safediff.erasers.base import Eraser
from safediff.erasers.prompts import contexts, replace_word
from safediff.erasers.training import keywords_of
from safediff.options import option
from safediff.sampling import cfg_session, denoise, initial_noise, make_scheduler

FFN_OUT = ".ff.net.2"


def evenly(items: list, n: int | None) -> list:
    """At most ``n`` of ``items``, evenly spaced (all of them when ``n`` is None or not smaller)."""
    if n is None or n >= len(items):
        return items
    return [items[round(i * (len(items) - 1) / max(1, n - 1))] for i in range(n)]


def skilled(weight_abs: torch.Tensor, on: torch.Tensor, off: torch.Tensor, skill_ratio: float,
            select_ratio: float) -> torch.Tensor:
    """Bool [d, d_ff]: the weights to prune, from ``|W|`` and the column norms [T, d_ff] of the concept (``on``) and
    base (``off``) activations: skilled at step t when among the ``⌊ρ d_ff⌋`` largest WANDA scores of their row and
    above the base score; pruned when skilled at more than ``τ T`` steps."""
    k = int(skill_ratio * weight_abs.shape[1])
    counts = torch.zeros(weight_abs.shape, dtype=torch.int32)
    for t in range(len(on)):
        s_on, s_off = weight_abs * on[t], weight_abs * off[t]
        top = torch.zeros(weight_abs.shape, dtype=torch.bool)
        if k:
            top.scatter_(1, s_on.topk(k, dim=1).indices, True)
        counts += (top & (s_on > s_off)).int()
    return counts > select_ratio * len(on)


def ffn_layers(unet) -> dict[str, torch.nn.Linear]:
    """The feed-forward output Linear of every transformer block, by module name (sorted, as the reference)."""
    return dict(sorted((n, m) for n, m in unet.named_modules()
                       if n.endswith(FFN_OUT) and isinstance(m, torch.nn.Linear)))


class ColumnNorms:
    """Per (denoising step, layer): the squared column norms of the unit-normalised input rows seen there."""

    def __init__(self, layers: dict[str, torch.nn.Linear], steps: int):
        self.layers = layers
        self.sq = {name: torch.zeros(steps, m.in_features, dtype=torch.float64) for name, m in layers.items()}
        self.step = 0

    @contextlib.contextmanager
    def recording(self):
        def hook(name, module, args):
            rows = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            self.sq[name][self.step] += (F.normalize(rows, dim=1) ** 2).sum(0).cpu()

        handles = [m.register_forward_pre_hook(lambda module, args, name=name: hook(name, module, args))
                   for name, m in self.layers.items()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def norms(self, name: str) -> torch.Tensor:
        return self.sq[name].sqrt()


@dataclass
class ConceptPrune(Eraser):
    name: ClassVar[str] = "concept-prune"
    paper: ClassVar[str] = ("Chavhan et al., ConceptPrune: Concept Editing in Diffusion Models via Skilled Neuron "
                            "Pruning, ICLR 2025 (arXiv 2405.19237)")
    # each fit generates its prompt pairs once: with all 33 context pairs of a colour, 74 CPU-seconds (1 thread) on
    # random weights of the v2 sandbox architecture (7.0M-parameter UNet, 25 steps); 8 evenly spaced pairs, about
    # 18 s per concept (6 CPU-minutes for 20 concepts)
    sandbox: ClassVar[dict[str, dict]] = {"benchmark": {"max_prompts": 8}, "demo": {"max_prompts": 4},
                                          "smoke": {"max_prompts": 2, "steps": 2}}
    zero_strength: ClassVar[dict] = {"skill_ratio": 0.0}

    skill_ratio: float = option(0.01, low=0.0, high=1.0, help="ρ: share of each row's inputs that can be skilled")
    select_ratio: float = option(0.0, low=0.0, high=1.0, help="τ: pruned if skilled at more than τ·T steps")
    steps: int | None = option(None, low=1, help="denoising steps T (None: the model's default)")
    guidance: float | None = option(None, low=0.0, help="CFG scale of the generations (None: the model's default)")
    expand_prompts: bool = option(True, help="the word in the concept's contexts (off: the word alone)")
    max_prompts: int | None = option(None, low=1, help="at most this many prompt pairs per keyword (evenly spaced)")
    batch: int = option(16, low=1, help="prompt pairs generated together")
    seed: int = 0

    def touches(self, name: str) -> bool:
        component, _, rest = name.partition(".")
        return component == "unet" and rest.endswith(FFN_OUT[1:] + ".weight")

    def prompt_pairs(self, concepts: list[Concept], guide: str | None) -> tuple[list[str], list[str]]:
        """(concept prompts, base prompts): each keyword in its contexts, and the same with the guide instead."""
        target, base = [], []
        for c in concepts:
            g = c.guide if guide is None else guide
            for word in keywords_of([c]):
                prompts = evenly(contexts(c, word, self.expand_prompts), self.max_prompts)
                target += prompts
                base += [replace_word(p, word, g) for p in prompts]
        return target, base

    @torch.no_grad()
    def activations(self, model, prompts: list[str], steps: int, guidance: float) -> ColumnNorms:
        """Column norms of every FFN output layer's inputs at every step, over images of ``prompts`` (seed + k)."""
        layers = ffn_layers(model.unet)
        norms = ColumnNorms(layers, steps)
        height, width = int(model.defaults["height"]), int(model.defaults["width"])
        adapter = model.adapter
        with norms.recording():
            for start in range(0, len(prompts), self.batch):
                part = prompts[start:start + self.batch]
                scheduler = make_scheduler(model)
                scheduler.set_timesteps(steps)
                latents, _ = initial_noise(model, [self.seed + start + k for k in range(len(part))], height, width)
                session = cfg_session(model, adapter.encode(part), adapter.encode_negative(None, len(part)),
                                      guidance, scheduler, height, width)

                denoise(session, scheduler, latents * scheduler.init_noise_sigma, kwargs={"eta": 0.0},
                        callback=lambda i, t, x: setattr(norms, "step", i))
        return norms

    def compute(self, model, concepts: list[Concept], preserve, guide, progress):
        steps = int(self.steps or model.defaults["steps"])
        guidance = float(model.defaults["guidance"] if self.guidance is None else self.guidance)
        out, info_layers = {}, {}
        masks: dict[str, torch.Tensor] = {}
        for concept in concepts:  # one concept's skilled neurons at a time, then their union
            target, base = self.prompt_pairs([concept], guide)
            on, off = (self.activations(model, p, steps, guidance) for p in (target, base))
            for name, layer in ffn_layers(model.unet).items():
                pruned = skilled(layer.weight.detach().abs().double().cpu(), on.norms(name), off.norms(name),
                                 self.skill_ratio, self.select_ratio)
                masks[name] = masks.get(name, torch.zeros_like(pruned)) | pruned
        total = 0
        for name, layer in ffn_layers(model.unet).items():
            if masks[name].any():
                w = layer.weight.detach()
                out[f"unet.{name}.weight"] = torch.where(masks[name].to(w.device), torch.zeros_like(w), w)
            info_layers[name] = round(float(masks[name].double().mean()), 6)
            total += int(masks[name].sum())
        n_ffn = sum(m.weight.numel() for m in ffn_layers(model.unet).values())
        n_unet = sum(p.numel() for p in model.unet.parameters())
        info = {"keywords": keywords_of(concepts), "steps": steps, "guidance": guidance,
                "prompt_pairs": len(self.prompt_pairs(concepts, guide)[0]), "pruned_weights": total,
                "pruned_share_of_ffn": total / n_ffn, "pruned_share_of_unet": total / n_unet,
                "pruned_share_per_layer": info_layers}
        return out, info
