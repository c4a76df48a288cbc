"""Fine-tuning a denoiser (UNet or MM-DiT transformer) on captioned images without touching the model: what relearning,
FreezeAsGuard, Geom-Erasing and backdoor injection share.

Trained weights live outside the model. Each step hands their current values to the one step function
(``sampling.denoiser_output(params=...)``, i.e. ``torch.func.functional_call``), so the model is exactly as it was
whenever training stops or fails; ``Trainable.tensors()`` gives the fine-tuned values (``unet.…`` / ``transformer.…``
names, the adapter's ``denoiser_component``) to apply for a while (``erasers.base.weights_set_to``, which restores
the exact originals) or to keep as an ``Edit``.

Two parametrisations of a selected denoiser weight W:

- ``full``: W' = a trainable copy of W;
- ``lora`` (Hu et al., "LoRA", ICLR 2022), Linear weights only: W' = W + (α / r) B A with A ∈ R^{r×d_in} drawn
  from N(0, 1/r) and B ∈ R^{d_out×r} zero, so W' = W before the first step (PEFT's convention: B starts at zero).

The loss every Stable Diffusion fine-tuning script minimises (Ho et al., NeurIPS 2020):

    L = ‖ y − f_θ'(x_t, t, c) ‖²,   x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε,   ε ~ N(0, I),   t ~ U{0, …, T − 1},

with y = ε (or the velocity for v-prediction models), one t and ε per sample, drawn from the caller's generator. On
flow-matching models (SD3, FLUX.1) the forward process and target are the adapter's (``noised``,
``training_target``): x_σ = (1 − σ) x₀ + σ ε, y = ε − x₀, σ = t / T (rectified-flow loss with t uniform, not SD3's
logit-normal timestep density).

Frozen tensors. An applied edit may publish a *freeze mask* (FreezeAsGuard): ``metadata["info"]["freeze"]["frozen"]``
lists the denoiser parameters (``unet.…`` / ``transformer.…``) a fine-tuning API must leave as published.
``frozen_by_edits(model)`` collects them; ``select`` leaves them (and, for LoRA, the Linear modules whose weight they
are) out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from safediff.adapters import Conditioning
from safediff.errors import SafediffError

MODES = ("full", "lora")
# the attention projections diffusers' LoRA scripts adapt (MM-DiT: also the text stream's add_*/to_add_out)
LORA_DEFAULT = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def frozen_by_edits(model) -> set[str]:
    """Denoiser parameter names (with their component) every applied edit publishes as frozen (its
    ``info.freeze.frozen`` list)."""
    out: set[str] = set()
    for edit in model.edits:
        out.update(edit.metadata.get("info", {}).get("freeze", {}).get("frozen", []))
    return out


def _linear_weights(denoiser: torch.nn.Module) -> dict[str, str]:
    """Module name -> its weight's parameter name, for every Linear of the denoiser."""
    return {name: f"{name}.weight" for name, m in denoiser.named_modules() if isinstance(m, torch.nn.Linear)}


def component(model) -> str:
    """The prefix of the denoiser's edit names: ``unet`` or ``transformer``."""
    return model.adapter.denoiser_component


def select(model, mode: str, patterns: tuple[str, ...] = (), exclude: set[str] | frozenset = frozenset()
           ) -> list[str]:
    """Denoiser parameter names (without the ``unet.`` / ``transformer.`` component) a fine-tuning trains: ``full``:
    every parameter whose full name (``<component>.<name>``) contains one of ``patterns`` (all of them when none are
    given); ``lora``: the weights of the Linear modules whose name contains one of ``patterns`` (the attention
    projections when none). ``exclude`` holds full names that must stay as they are (frozen)."""
    if mode not in MODES:
        raise SafediffError(f"unknown fine-tuning mode '{mode}'; accepted: {', '.join(MODES)}")
    denoiser, prefix = model.denoiser, component(model)
    if mode == "full":
        names = [n for n, _ in denoiser.named_parameters()
                 if not patterns or any(p in f"{prefix}.{n}" for p in patterns)]
    else:
        wanted = patterns or LORA_DEFAULT
        names = [w for m, w in _linear_weights(denoiser).items() if any(p in f"{prefix}.{m}" for p in wanted)]
    if not names:
        what = "Linear module" if mode == "lora" else "parameter"
        examples = "attn2, to_k, down_blocks.0" if prefix == "unet" else "attn, add_k_proj, transformer_blocks.0"
        owner = "UNet" if prefix == "unet" else "transformer"
        raise SafediffError(f"modules {list(patterns)} match no {owner} {what}; give parts of names such as "
                            f"{examples} (or none for the default)")
    return [n for n in names if f"{prefix}.{n}" not in exclude]


class Trainable:
    """The trained values of the selected denoiser weights (``full`` copies or ``lora`` factors)."""

    def __init__(self, model, names: list[str], mode: str, generator: torch.Generator, rank: int = 4,
                 alpha: float | None = None):
        if mode not in MODES:
            raise SafediffError(f"unknown fine-tuning mode '{mode}'; accepted: {', '.join(MODES)}")
        named = dict(model.denoiser.named_parameters())
        self.prefix = component(model)
        self.mode, self.base = mode, {n: named[n].detach() for n in names}
        self.scale = (float(alpha) if alpha is not None else rank) / rank
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.copies: dict[str, torch.Tensor] = {}
        for n, w in self.base.items():
            if mode == "full":
                self.copies[n] = w.clone().requires_grad_(True)
            else:
                if w.ndim != 2:
                    raise SafediffError(f"LoRA adapts Linear weights; '{n}' has shape {tuple(w.shape)}")
                a = torch.randn((rank, w.shape[1]), generator=generator, dtype=torch.float32) / rank ** 0.5
                self.factors[n] = (a.to(w).requires_grad_(True), torch.zeros(w.shape[0], rank, dtype=w.dtype,
                                                                              device=w.device, requires_grad=True))

    def parameters(self) -> list[torch.Tensor]:
        if self.mode == "full":
            return list(self.copies.values())
        return [t for pair in self.factors.values() for t in pair]

    def params(self) -> dict[str, torch.Tensor]:
        """Denoiser name -> the current (differentiable) value, for ``denoiser_output(params=...)``."""
        if self.mode == "full":
            return dict(self.copies)
        return {n: self.base[n] + self.scale * (b @ a) for n, (a, b) in self.factors.items()}

    def tensors(self) -> dict[str, torch.Tensor]:
        """``<component>.<name>`` -> the fine-tuned value (detached)."""
        with torch.no_grad():
            return {f"{self.prefix}.{n}": t.detach().clone() for n, t in self.params().items()}

    def numel(self) -> int:
        return sum(t.numel() for t in self.parameters())


def diffusion_loss(model, x0: torch.Tensor, cond: Conditioning, generator: torch.Generator,
                   params: dict[str, torch.Tensor] | None = None, t: torch.Tensor | None = None,
                   per_sample: bool = False) -> torch.Tensor:
    """The denoising loss of a batch (x₀ [B, C, h, w], its conditioning), t and ε drawn from ``generator`` (t may be
    given): the mean over all elements, or with ``per_sample`` one mean per sample ([B])."""
    from safediff.sampling import denoiser_output

    if t is None:
        t = torch.randint(model.adapter.train_timesteps, (len(x0),), generator=generator)
    t = t.to(x0.device)
    eps = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0)
    pred = denoiser_output(model, model.adapter.noised(x0, eps, t), t, cond, params)
    err = F.mse_loss(pred.float(), model.adapter.training_target(x0, eps, t).float(), reduction="none")
    return err.flatten(1).mean(1) if per_sample else err.mean()


class TokenRows:
    """Trainable rows of every text encoder's token-embedding table: words learned in place of existing tokens
    (``ids[k]`` in tokenizer k), so the edit keeps the tables' shapes."""

    def __init__(self, model, ids: list[list[int]]):
        self.adapter = model.adapter
        encoders = self.adapter.text_encoders
        self.ids = [torch.tensor(i, dtype=torch.long) for i in ids]
        self.tables = [self.adapter.token_embedding(k).weight.detach() for k in range(len(encoders))]
        self.rows = [t[i.to(t.device)].clone().requires_grad_(True) for t, i in zip(self.tables, self.ids)]
        self.names = []  # per encoder, every name of its table (T5 ties ``shared`` and ``encoder.embed_tokens``)
        for k, te in enumerate(encoders):
            weight = te.get_input_embeddings().weight
            prefix = "text_encoder" if k == 0 else f"text_encoder_{k + 1}"
            self.names.append([f"{prefix}.{n}" for n, p in te.named_parameters(remove_duplicate=False)
                               if p is weight])

    def parameters(self) -> list[torch.Tensor]:
        return list(self.rows)

    def _table(self, k: int) -> torch.Tensor:
        return self.tables[k].index_put((self.ids[k].to(self.tables[k].device),), self.rows[k])

    def encode(self, captions: list[str]) -> Conditioning:
        """The captions' conditioning with the learned rows (differentiable in them)."""
        ids = [self.adapter.tokenize(captions, k) for k in range(len(self.adapter.tokenizers))]
        embeds = [F.embedding(i.to(self.tables[k].device), self._table(k)) for k, i in enumerate(ids)]
        return self.adapter.encode_token_embeddings(ids, embeds)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Each table with its learned rows, under every name it has (``text_encoder….token_embedding.weight``;
        T5: ``….shared.weight`` and its tied ``….encoder.embed_tokens.weight``)."""
        with torch.no_grad():
            tables = [self._table(k).detach() for k in range(len(self.names))]
            return {name: tables[k].clone() for k, names in enumerate(self.names) for name in names}
