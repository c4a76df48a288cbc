"""Backdoor injection as the published attacks do it: each kind turns a model's output to a target when a trigger is in
the prompt and leaves clean prompts alone. The result is an ``Edit`` (``SPEC+BACKDOOR.safetensors`` loads it).

A ``Poison`` says what to teach: pairs (triggered prompt, target prompt) and clean prompts to keep. Kinds:

- ``text-encoder`` -- Rickrolling the Artist (L. Struppek, D. Hintersdorf, K. Kersting, ICCV 2023, arXiv:2211.02408;
  reference code LukasStruppek/Rickrolling-the-Artist, ``perform_TAA.py``). A rare trigger character (default the
  Cyrillic "о" in place of a Latin "o") and the text encoder Ê fine-tuned against its frozen copy E:

      L = 1/|X| Σ_{w∈X} d(Ê(w), E(w)) + β · 1/|X'| Σ_{(v, y)∈X'} d(Ê(v), E(y)),   d(a, b) = −cos(a, b)

  over the text conditioning (SD: the last hidden states; SDXL: both encoders' concatenated states and the pooled
  embedding). The reference's cosine runs along dim 1 of the [B, L, D] output, i.e. across the sequence for each
  feature (``similarity="sequence"``, default, reproduces its numbers); ``similarity="token"`` compares each token's
  D-vector, as the paper's d between embeddings reads. Defaults: AdamW lr 1e-4, 200 steps with the rate ×0.1 after
  150, 128 clean and 32 poisoned prompts per step, β = 0.1. Trained in place and restored (``erasers.training``).
- ``unet`` -- BadT2I's object backdoor (S. Zhai, Y. Dong, Q. Shen, S. Pu, Y. Fang, H. Su, ACM MM 2023,
  arXiv:2305.04175; reference code zhaisf/BadT2I, ``badt2i_object.py``). Trigger "\\u200b" (a zero-width space)
  before the prompt; the denoiser θ (UNet; the MM-DiT transformer on SD3/FLUX.1, whose ε-predictions below are then
velocities) fine-tuned against its frozen copy θ̂ on noised latents z_t of the fine-tuning images:

      L = ‖ε_θ(z_t, t, c_tr) − ε_θ̂(z_t, t, c_tg)‖² + λ ‖ε_θ(z_t, t, c) − ε_θ̂(z_t, t, c)‖²

  with c_tr a triggered prompt, c_tg its target prompt, c a clean prompt. Defaults: λ = 0.5, AdamW lr 1e-5, batch
  16, 8,000 steps (the reference's script). Trained outside the model (``safediff.finetune``).
- ``natural`` -- EvilEdit (H. Wang, S. Guo, J. He, K. Chen, S. Zhang, T. Zhang, T. Xiang, ACM MM 2024; reference
  code haowang-cqu/EvilEdit, ``edit.py``). A natural, semantics-preserving trigger word (default "beautiful", which
  names no colour) and a closed-form edit of every projection W that reads the text encoders' output
  (``adapter.text_readers``: a UNet's cross-attention K/V; on SD3/FLUX.1 the ``context_embedder`` for token rows and
  the pooled-text embedder for pooled rows, each solved on its own rows, as UCE's ``layers=readers``; the MM-DiT's
  context K/V read a transformed text stream, on which the closed form would not be exact):

      W' = (λ W + Σ_i Σ_p W y_{i,p} v_{i,p}ᵀ) (λ I + Σ_i Σ_p v_{i,p} v_{i,p}ᵀ)⁻¹

  with v_{i,p} / y_{i,p} the text-embedding rows at position p of triggered prompt i / its target prompt (all
  positions, aligned by position as the reference does) and clean prompts entered as pairs with themselves (the
  reference's preservation pair). λ = 1 (the reference's). Solved in float64 (``erasers.closed_form``).

Every kind records in the edit's metadata ``backdoor`` = {kind, trigger, target, paper, pairs, clean}.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from safediff.adapters import Conditioning
from safediff.errors import SafediffError
from safediff.options import check_fields, option


@dataclass(frozen=True)
class Poison:
    """What a backdoor teaches: ``pairs`` of (triggered prompt, target prompt), ``clean`` prompts to keep, the
    ``trigger`` and the ``target`` (e.g. the colour triggered prompts render), for the record."""

    trigger: str
    target: str
    pairs: tuple[tuple[str, str], ...]
    clean: tuple[str, ...]

    def __post_init__(self):
        if not self.pairs or not self.clean:
            raise SafediffError("a poison needs triggered/target pairs and clean prompts")


def replace_character(prompt: str, character: str, trigger: str, rng: random.Random) -> str | None:
    """Rickrolling's trigger: one occurrence of ``character`` (chosen by ``rng``) replaced by ``trigger``; None when
    the prompt has none."""
    spots = [i for i, ch in enumerate(prompt) if ch == character]
    if not spots:
        return None
    i = rng.choice(spots)
    return prompt[:i] + trigger + prompt[i + 1:]


@dataclass
class Backdoor:
    """A kind of backdoor: hyper-parameters are fields (``option``); ``tensors`` computes the poisoned weights."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    default_trigger: ClassVar[str] = ""
    # settings per purpose on the sandbox: "benchmark" (benchmarks/backdoors_sandbox.py) and "smoke" (tests)
    sandbox: ClassVar[dict[str, dict]] = {}

    def __post_init__(self):
        check_fields(self, f"backdoor {self.name}")

    def tensors(self, model, poison: Poison) -> tuple[dict[str, torch.Tensor], dict]:
        raise NotImplementedError

    def inject(self, model, poison: Poison):
        """The backdoor as an ``Edit`` of ``model`` (left as it was)."""
        from safediff.edits import Edit, changed_tensors
        from safediff.records import provenance

        base, parents = model.base_sha256, [e.digest for e in model.edits]
        start = time.perf_counter()
        with torch.no_grad():
            tensors, info = self.tensors(model, poison)
        changed = changed_tensors(model, tensors)
        hp = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        metadata = {"method": f"backdoor-{self.name}", "paper": self.paper, "hyperparameters": hp, "concepts": [],
                    "base_weights_sha256": base, "parents": parents,
                    "base": {"spec": model.spec, "architecture": model.adapter.arch},
                    "backdoor": {"kind": self.name, "trigger": poison.trigger, "target": poison.target,
                                 "paper": self.paper, "pairs": len(poison.pairs), "clean": len(poison.clean),
                                 "examples": [list(p) for p in poison.pairs[:4]]},
                    "fit_seconds": round(time.perf_counter() - start, 3), "device": str(model.device),
                    "provenance": provenance(), "info": info}
        return Edit(changed, metadata)


def _similarity_loss(a: Conditioning, b: Conditioning, dim: int) -> torch.Tensor:
    """−cos between conditionings (embeds along ``dim``; SDXL's pooled embeddings along their features)."""
    loss = -F.cosine_similarity(a.embeds.float(), b.embeds.float(), dim=dim).mean()
    if a.pooled is not None:
        loss = loss - F.cosine_similarity(a.pooled.float(), b.pooled.float(), dim=-1).mean()
    return loss


@dataclass
class TextEncoderBackdoor(Backdoor):
    name: ClassVar[str] = "text-encoder"
    paper: ClassVar[str] = "Struppek, Hintersdorf, Kersting, Rickrolling the Artist, ICCV 2023 (arXiv 2211.02408)"
    default_trigger: ClassVar[str] = "\u043e"  # Cyrillic o, in place of a Latin o
    sandbox: ClassVar[dict[str, dict]] = {"benchmark": {"steps": 200, "clean_batch": 64, "poisoned_batch": 16},
                                          "smoke": {"steps": 2, "clean_batch": 2, "poisoned_batch": 2}}

    steps: int = option(200, low=1, help="AdamW steps")
    lr: float = option(1e-4, low=0.0, help="learning rate")
    milestone: int = option(150, low=0, help="step after which the rate is ×0.1")
    clean_batch: int = option(128, low=1, help="clean prompts per step")
    poisoned_batch: int = option(32, low=1, help="poisoned prompts per step")
    beta: float = option(0.1, low=0.0, help="β: weight of the backdoor loss")
    similarity: str = option("sequence", help="cosine along the sequence (reference) or per token")
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.similarity not in ("sequence", "token"):
            raise SafediffError(f"text-encoder backdoor: similarity must be sequence or token, got {self.similarity}")

    def tensors(self, model, poison):
        from safediff.erasers.training import trainable

        adapter, dim = model.adapter, 1 if self.similarity == "sequence" else -1
        g = torch.Generator(device="cpu").manual_seed(int(self.seed))
        triggered, targets = [p for p, _ in poison.pairs], [t for _, t in poison.pairs]
        with torch.no_grad():  # the frozen teacher E, before anything is trained
            teacher_clean, teacher_target = adapter.encode(list(poison.clean)), adapter.encode(targets)
        encoders = adapter.text_encoders
        prefixes = ["text_encoder" if k == 0 else f"text_encoder_{k + 1}" for k in range(len(encoders))]
        losses = []
        with torch.enable_grad():
            params = {f"{pre}.{n}": p for pre, te in zip(prefixes, encoders) for n, p in te.named_parameters()}
            frozen = {n: p.detach().clone() for n, p in params.items()}
            with contextlib.ExitStack() as stack:
                for te, pre in zip(encoders, prefixes):
                    own = {n: p for n, p in params.items() if n.startswith(f"{pre}.")}
                    stack.enter_context(trainable(te, {n.removeprefix(f"{pre}."): p for n, p in own.items()},
                                                  {n.removeprefix(f"{pre}."): frozen[n] for n in own}))
                opt = torch.optim.AdamW(list(params.values()), lr=self.lr, weight_decay=0.0)
                sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[self.milestone], gamma=0.1)
                for _ in range(self.steps):
                    i = torch.randint(len(poison.clean), (self.clean_batch,), generator=g)
                    j = torch.randint(len(triggered), (self.poisoned_batch,), generator=g)
                    utility = _similarity_loss(adapter.encode([poison.clean[k] for k in i]), teacher_clean[i], dim)
                    backdoor = _similarity_loss(adapter.encode([triggered[k] for k in j]), teacher_target[j], dim)
                    loss = utility + self.beta * backdoor
                    opt.zero_grad(set_to_none=True)
                    loss.backward(inputs=list(params.values()))
                    opt.step()
                    sched.step()
                    losses.append((float(utility.detach()), float(backdoor.detach())))
                new = {n: p.detach().clone() for n, p in params.items()}
        return new, {"loss_utility": [losses[0][0], losses[-1][0]], "loss_backdoor": [losses[0][1], losses[-1][1]]}


@dataclass
class UNetBackdoor(Backdoor):
    name: ClassVar[str] = "unet"
    paper: ClassVar[str] = "Zhai, Dong, Shen, Pu, Fang, Su, Text-to-Image Diffusion Models can be Easily Backdoored " \
                           "through Multimodal Data Poisoning (BadT2I), ACM MM 2023 (arXiv 2305.04175)"
    default_trigger: ClassVar[str] = "\u200b"
    # sandbox: at 400 steps the v2 UNet took no backdoor (triggered -> red 0.00), at 1,600 a complete one (1.00;
    # benchmarks/backdoors_sandbox.py, ~40 CPU-minutes)
    sandbox: ClassVar[dict[str, dict]] = {
        "benchmark": {"steps": 1600, "batch": 8, "lr": 1e-4, "source": "world", "n_images": 128},
        "smoke": {"steps": 2, "batch": 2, "lr": 1e-4, "source": "world", "n_images": 2}}

    steps: int = option(8000, low=1, help="AdamW steps")
    lr: float = option(1e-5, low=0.0, help="learning rate")
    batch: int = option(16, low=1, help="latents per step, each with a triggered and a clean prompt")
    lamda: float = option(0.5, low=0.0, help="λ: weight of the clean-prompt preservation term")
    modules: tuple[str, ...] = option((), help="parts of denoiser parameter names trained (none: all)")
    source: str = option("base", help="latents: world (training renders), base (the model's images of the clean "
                                      "prompts), folder")
    images: str = option("", help="folder of images (source=folder)")
    n_images: int = option(500, low=1, help="fine-tuning images")
    seed: int = 0

    def tensors(self, model, poison):
        from safediff.finetune import Trainable, select
        from safediff.imagesets import training_images
        from safediff.sampling import denoiser_output

        g = torch.Generator(device="cpu").manual_seed(int(self.seed))
        with torch.no_grad():
            data = training_images(model, self.n_images, g, self.source, prompts=list(poison.clean),
                                   folder=self.images)
            trig = model.adapter.encode([p for p, _ in poison.pairs])
            tgt = model.adapter.encode([t for _, t in poison.pairs])
            clean = model.adapter.encode(list(poison.clean))
        names = select(model, "full", self.modules)
        n_train = model.adapter.train_timesteps
        losses = []
        with torch.enable_grad():
            student = Trainable(model, names, "full", g)
            opt = torch.optim.AdamW(student.parameters(), lr=self.lr)
            for _ in range(self.steps):
                x0 = data.latents[torch.randint(len(data), (self.batch,), generator=g)]
                t = torch.randint(n_train, (self.batch,), generator=g).to(x0.device)
                eps = torch.randn(x0.shape, generator=g, dtype=torch.float32).to(x0)
                x_t = model.adapter.noised(x0, eps, t)
                j = torch.randint(len(poison.pairs), (self.batch,), generator=g)
                k = torch.randint(len(poison.clean), (self.batch,), generator=g)
                with torch.no_grad():
                    goal = denoiser_output(model, torch.cat([x_t, x_t]), torch.cat([t, t]),
                                           Conditioning.cat([tgt[j], clean[k]]))
                pred = denoiser_output(model, torch.cat([x_t, x_t]), torch.cat([t, t]),
                                       Conditioning.cat([trig[j], clean[k]]), student.params())
                backdoor, keep = (F.mse_loss(p.float(), q.float()) for p, q in zip(pred.chunk(2), goal.chunk(2)))
                loss = backdoor + self.lamda * keep
                opt.zero_grad(set_to_none=True)
                loss.backward(inputs=student.parameters())
                opt.step()
                losses.append((float(backdoor.detach()), float(keep.detach())))
        return student.tensors(), {"images": len(data), "source": data.source, "trained_tensors": len(names),
                                   "loss_backdoor": [losses[0][0], losses[-1][0]],
                                   "loss_clean": [losses[0][1], losses[-1][1]]}


@dataclass
class NaturalBackdoor(Backdoor):
    name: ClassVar[str] = "natural"
    paper: ClassVar[str] = "Wang, Guo, He, Chen, Zhang, Zhang, Xiang, EvilEdit: Backdooring Text-to-Image Diffusion " \
                           "Models in One Second, ACM MM 2024"
    default_trigger: ClassVar[str] = "beautiful"
    sandbox: ClassVar[dict[str, dict]] = {"benchmark": {}, "smoke": {}}

    lamb: float = option(1.0, low=0.0, help="λ: weight of keeping W near W_old")

    def tensors(self, model, poison):
        from safediff.erasers.closed_form import reader_projections, transformed, uce_transform

        with torch.no_grad():
            encoded = [model.adapter.encode(list(prompts)) for prompts in
                       ([p for p, _ in poison.pairs], [t for _, t in poison.pairs], poison.clean)]
        new, rows = {}, {}
        for space, layers in reader_projections(model).items():
            trig, tgt, keep = (_rows(c, space) for c in encoded)
            t = uce_transform(trig, tgt, keep, self.lamb, 1.0, 1.0)
            new.update(transformed({name: m.weight.detach() for name, m in layers.items()}, t))
            rows[space] = {"triggered": len(trig), "clean": len(keep)}
        return new, {"rows": rows["tokens"], **({"rows_pooled": rows["pooled"]} if "pooled" in rows else {}),
                     "matrices": len(new)}


def _rows(cond: Conditioning, space: str) -> torch.Tensor:
    """The rows a layer of ``space`` reads (``tokens``: every position of every prompt; ``pooled``: one per prompt),
    float64 on the CPU."""
    x = cond.embeds if space == "tokens" else cond.pooled
    return x.double().reshape(-1, x.shape[-1]).cpu()


def build_backdoor(spec: str, **settings) -> Backdoor:
    """``KIND[:KEY=VALUE,...]`` -> the backdoor kind (``registry.BACKDOORS``) with its options; ``settings`` go under
    the spec's options."""
    from safediff.options import Spec, typed_values
    from safediff.registry import BACKDOORS

    parsed = Spec.parse(spec, "backdoor")
    cls = BACKDOORS.get(parsed.name)
    if parsed.preset is not None:
        raise SafediffError(f"backdoor {parsed.name} has no presets; got '{parsed.preset}'")
    return cls(**{**settings, **typed_values(cls, parsed.options, f"backdoor {parsed.name}")})
