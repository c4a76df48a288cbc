"""Reusable parts of attack recipes: search spaces, objectives and search methods (see ``attacks/base.py``).

Search spaces
- ``TokenSlots``: a prompt's token sequence with k adversarial *slots* (``prefix``, ``suffix``, ``every`` k prompt
  tokens, or ``free`` = the slots alone); slot contents are token embeddings, so they can be relaxed or soft.
- ``vocabulary(tokenizer, mode)``: the token ids a slot may hold (``all`` non-special tokens, or ``words``: whole-word
  tokens whose decoded text re-encodes to exactly that token, so an adversarial prompt survives being typed).
Objectives (scalar tensors, differentiable in the conditioning)
- ``denoising_error``: ‖ε − ε_θ*(x_t, t, c)‖² on a target image's noised latent x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε.
- ``noise_matching``: ‖ε_θ*(x_t, t, c*) − ε_θ(x_t, t, c)‖² between the target and the unconstrained reference.
- ``embedding_distance``: ‖E(c*) − e‖² between an encoding and a fixed target encoding (text-encoder-only attacks).
Search methods
- ``SimplexAdam``: each slot a distribution over the vocabulary; straight-through one-hot samples forward, Adam on the
  distribution, Euclidean projection back onto the simplex (bisection) after every step.
- ``ProjectedAdam``: soft embeddings; forward with the nearest vocabulary token (cosine), gradient applied to the soft
  embeddings (PEZ; Wen et al. 2023).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from safediff.attacks.base import AttackContext, Evaluation, Found
from safediff.errors import SafediffError
from safediff.models import Conditioning, Model

LAYOUTS = ("prefix", "suffix", "every", "free")

_VOCAB_CACHE: dict[tuple[int, str], torch.Tensor] = {}


# ---------------------------------------------------------------------------------------------------- vocabulary --

def vocabulary(tokenizer, mode: str = "words") -> torch.Tensor:
    """Sorted token ids a slot may hold. ``all``: every non-special token. ``words``: whole-word tokens (CLIP's
    ``</w>`` suffix) whose decoded text tokenizes back to exactly that one token."""
    if mode not in ("all", "words"):
        raise SafediffError(f"unknown vocabulary '{mode}'; accepted: all, words")
    key = (id(tokenizer), mode)
    if key not in _VOCAB_CACHE:
        special = set(tokenizer.all_special_ids)
        ids = [i for i in range(len(tokenizer)) if i not in special]
        if mode == "words":
            tokens = tokenizer.convert_ids_to_tokens(ids)
            ids = [i for i, tk in zip(ids, tokens) if tk.endswith("</w>")]
            texts = [tokenizer.decode([i]).strip() for i in ids]
            enc = tokenizer(texts, add_special_tokens=False).input_ids
            ids = [i for i, t, e in zip(ids, texts, enc) if t and e == [i]]
        if not ids:
            raise SafediffError(f"the tokenizer has no '{mode}' tokens to search over")
        _VOCAB_CACHE[key] = torch.tensor(ids, dtype=torch.long)
    return _VOCAB_CACHE[key]


# ---------------------------------------------------------------------------------------------------- token slots --

class TokenSlots:
    """The token sequence of ``prompt`` with ``k`` adversarial slots.

    ``prefix``: BOS, k slots, prompt, EOS (UnlearnDiffAtk's ``prefix_k``); ``suffix``: after the prompt; ``every``:
    P4D-K's layout, a slot before every group of ``every`` prompt tokens and one before the remainder (n tokens ->
    ⌊n/every⌋ + 1 slots: ``L p p p L p p p L p``), each cut moved to the end of its word so no slot splits a word
    (k is then set by the prompt's length); ``free``: the k slots alone, the prompt dropped (P4D-N). Slot tokens are
    drawn from encoder 0's vocabulary; on SDXL the same ids index encoder 1's table (both CLIP tokenizers share one
    vocabulary). Too long sequences keep the slots and drop prompt tokens from the end.
    """

    def __init__(self, model: Model, prompt: str, k: int, layout: str = "prefix", every: int = 3):
        if layout not in LAYOUTS:
            raise SafediffError(f"unknown slot layout '{layout}'; accepted: {', '.join(LAYOUTS)}")
        self.adapter = model.adapter
        self.tokenizer = self.adapter.tokenizers[0]
        sizes = {len(t) for t in self.adapter.tokenizers}
        if len(sizes) != 1:
            raise SafediffError("token-slot attacks need the text encoders to share one vocabulary")
        tok = self.tokenizer
        words = [] if layout == "free" else tok(prompt, add_special_tokens=False).input_ids
        length = tok.model_max_length
        if layout == "every":
            if every <= 0:
                raise SafediffError(f"every must be a positive number of tokens, got {every}")
            groups = self._groups(tok, words, every)
            while sum(len(g) + 1 for g in groups) + 2 > length:
                groups = self._groups(tok, sum(groups, [])[:-1], every)
            k = len(groups)
        elif k <= 0:
            raise SafediffError(f"the number of adversarial tokens must be positive, got {k}")
        else:
            words = words[:max(0, length - 2 - k)]
        if k + 2 > length:
            raise SafediffError(f"{k} adversarial tokens do not fit the {length}-token window")
        body: list[int | None] = []  # None marks a slot
        if layout == "prefix":
            body = [None] * k + words
        elif layout == "suffix":
            body = words + [None] * k
        elif layout == "free":
            body = [None] * k
        else:  # P4D-K: a slot before every full group and one before the remainder: L ppp L ppp L p
            for g in groups:
                body += [None] + g
        self.k = k
        self.layout = layout
        self.body = body
        self.slots = torch.tensor([i + 1 for i, x in enumerate(body) if x is None], dtype=torch.long)
        self.ids = [self._padded(t, [0] * k) for t in self.adapter.tokenizers]

    @staticmethod
    def _groups(tok, words: list[int], every: int) -> list[list[int]]:
        """The prompt's tokens in groups of ``every``, each cut moved to the end of the word it falls in (CLIP marks
        a word's last token with ``</w>``) so no slot splits a word; the last group holds the remainder (maybe [])."""
        ends = [t.endswith("</w>") for t in tok.convert_ids_to_tokens(words)]
        groups, current = [], []
        for w, end in zip(words, ends):
            current.append(w)
            if len(current) >= every and end:
                groups.append(current)
                current = []
        groups.append(current)
        return groups

    def _padded(self, tok, slot_ids: list[int]) -> torch.Tensor:
        it = iter(slot_ids)
        seq = [tok.bos_token_id] + [next(it) if x is None else x for x in self.body] + [tok.eos_token_id]
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        seq = seq + [pad] * (tok.model_max_length - len(seq))
        return torch.tensor([seq], dtype=torch.long)

    def token_ids(self, slot_ids: torch.Tensor | list[int]) -> list[int]:
        """Encoder 0's ids between BOS and EOS with the slots filled."""
        return self._padded(self.tokenizer, [int(x) for x in slot_ids])[0, 1:len(self.body) + 1].tolist()

    def text(self, slot_ids: torch.Tensor | list[int]) -> str:
        return self.tokenizer.decode(self.token_ids(slot_ids)).strip()

    def encode(self, slot_embeds: list[torch.Tensor]) -> Conditioning:
        """Conditioning with encoder j's slot embeddings ``slot_embeds[j]`` [k, D_j] (differentiable); the other
        positions hold their tokens' embeddings (the slots' placeholder ids only mark positions)."""
        full = []
        for j, (ids_j, e) in enumerate(zip(self.ids, slot_embeds)):
            table = self.adapter.token_embedding(j)
            base = table(ids_j.to(table.weight.device)).detach()
            mask = torch.zeros(base.shape[1], dtype=torch.bool, device=base.device)
            mask[self.slots] = True
            placed = torch.zeros_like(base).index_copy(1, self.slots.to(base.device), e.unsqueeze(0).to(base.dtype))
            full.append(torch.where(mask.view(1, -1, 1), placed, base))
        return self.adapter.encode_token_embeddings(self.ids, full)

    def embeddings_of(self, slot_ids: torch.Tensor) -> list[torch.Tensor]:
        """Each encoder's embedding rows of the given slot ids ([k, D_j])."""
        return [self.adapter.token_embedding(j).weight[slot_ids] for j in range(len(self.adapter.text_encoders))]


# ------------------------------------------------------------------------------------------------------ objectives --

def alphas_cumprod(model: Model) -> torch.Tensor:
    return model.pipe.scheduler.alphas_cumprod


def noised(model: Model, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε (the forward process the UNet was trained on)."""
    a = alphas_cumprod(model).to(x0.device)[t.long().cpu()].view(-1, 1, 1, 1).to(x0.dtype)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def training_target(model: Model, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet predicts: ε, or v = √ᾱ_t ε − √(1−ᾱ_t) x₀ for v-prediction models (SD 2.x 768)."""
    if model.pipe.scheduler.config.get("prediction_type", "epsilon") == "v_prediction":
        a = alphas_cumprod(model).to(x0.device)[t.long().cpu()].view(-1, 1, 1, 1).to(x0.dtype)
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    return noise


def denoising_error(target, cond: Conditioning, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                    prompts: list[str] | None = None, guided: bool | None = None) -> torch.Tensor:
    """UnlearnDiffAtk's objective: MSE(ε, ε_θ*(x_t, t, c)) with ε_θ* the target's prediction (through its guard)."""
    x_t = noised(target.model, x0, noise, t)
    pred = target.noise(x_t, t, cond, prompts=prompts, guided=guided)
    return F.mse_loss(pred.float(), training_target(target.model, x0, noise, t).float())


def noise_matching(target, cond_adv: Conditioning, cond_ref: Conditioning, x0: torch.Tensor, t: torch.Tensor,
                   noise: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
    """P4D's objective: MSE(ε_θ*(z_t, t, P*), ε_θ(z_t, t, P)); the reference side carries no gradient."""
    z_t = noised(target.model, x0, noise, t)
    with torch.no_grad():
        ref = target.reference_noise(z_t, t, cond_ref)
    return F.mse_loss(target.noise(z_t, t, cond_adv, prompts=prompts).float(), ref.float())


def repeat_conditioning(cond: Conditioning, n: int) -> Conditioning:
    """[1, ...] conditioning -> [n, ...] (differentiable)."""
    return Conditioning(cond.embeds.expand(n, -1, -1), None if cond.pooled is None else cond.pooled.expand(n, -1))


def embedding_distance(cond: Conditioning, goal: Conditioning) -> torch.Tensor:
    """Squared L2 distance between encodings (per sample, summed over tokens and dims); [B]."""
    d = (cond.embeds.float() - goal.embeds.float()).pow(2).flatten(1).sum(1)
    if cond.pooled is not None and goal.pooled is not None:
        d = d + (cond.pooled.float() - goal.pooled.float()).pow(2).sum(1)
    return d


def image_latents(model: Model, pixels: torch.Tensor) -> torch.Tensor:
    """VAE posterior mean of images in [0, 1] ([B,3,H,W]), scaled as the UNet reads latents."""
    vae = model.vae
    cfg = vae.config
    with torch.no_grad():
        z = vae.encode((pixels * 2 - 1).to(vae.device, vae.dtype)).latent_dist.mean
    if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
        mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1).to(z)
        std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1).to(z)
        return (z - mean) * cfg.scaling_factor / std
    return z * cfg.scaling_factor


def uniform_timesteps(n: int, total: int = 1000) -> list[int]:
    """UnlearnDiffAtk's schedule: n timesteps spaced total//n apart from total//n//2 (50 -> 10, 30, ..., 990)."""
    if n <= 0 or n > total:
        raise SafediffError(f"timesteps must be in 1..{total}, got {n}")
    step = total // n
    return list(range(step // 2, total, step))[:n]


# ------------------------------------------------------------------------------------------------- search methods --

def project_simplex(v: torch.Tensor, iterations: int = 60) -> torch.Tensor:
    """Euclidean projection of each row of v onto the probability simplex: clip(v − μ, 0, 1) with μ found by
    bisection so that the row sums to 1 (UnlearnDiffAtk's projection, run a fixed number of halvings)."""
    lo = (v.min(dim=-1, keepdim=True).values - 1).detach()
    hi = v.max(dim=-1, keepdim=True).values.detach()
    for _ in range(iterations):
        mu = (lo + hi) / 2
        over = (v - mu).clamp(0, 1).sum(dim=-1, keepdim=True) > 1
        lo = torch.where(over, mu, lo)
        hi = torch.where(over, hi, mu)
    return (v - (lo + hi) / 2).clamp(0, 1)


class _StraightThroughSample(torch.autograd.Function):
    """Forward: a one-hot sample of each row's distribution; backward: the gradient clipped to [-1, 1] (hardtanh),
    as in UnlearnDiffAtk's reference code."""

    @staticmethod
    def forward(ctx, probs: torch.Tensor, generator: torch.Generator):
        idx = torch.multinomial(probs.detach().clamp_min(0).cpu(), 1, generator=generator).view(-1)
        return F.one_hot(idx, probs.shape[-1]).to(probs)

    @staticmethod
    def backward(ctx, grad):
        return F.hardtanh(grad), None


class SimplexAdam:
    """k distributions over a vocabulary of V ids, optimised by Adam with projection onto the simplex."""

    def __init__(self, k: int, vocab: torch.Tensor, lr: float, weight_decay: float, generator: torch.Generator,
                 random_init: bool = False):
        self.vocab = vocab
        x = torch.rand(k, len(vocab), generator=generator) if random_init else torch.full((k, len(vocab)),
                                                                                            1.0 / len(vocab))
        self.x = project_simplex(x).requires_grad_(True)
        self.opt = torch.optim.Adam([self.x], lr=lr, weight_decay=weight_decay)
        self.generator = generator

    def sample(self) -> torch.Tensor:
        """Straight-through one-hot sample [k, V] (gradient flows to the distributions)."""
        return _StraightThroughSample.apply(self.x, self.generator)

    def embeddings(self, one_hot: torch.Tensor, slots: TokenSlots) -> list[torch.Tensor]:
        return [one_hot @ slots.adapter.token_embedding(j).weight[self.vocab].to(one_hot)
                for j in range(len(slots.adapter.text_encoders))]

    def step(self) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.x.copy_(project_simplex(self.x))

    def argmax_ids(self) -> torch.Tensor:
        return self.vocab[self.x.detach().argmax(dim=-1)]


class ProjectedAdam:
    """Soft embeddings [k, D] (encoder 0's space), AdamW; ``project`` snaps each to the nearest allowed vocabulary
    token by cosine similarity; the loss is computed with the projected embeddings and its gradient applied to the
    soft ones (PEZ's straight-through update, P4D's ``nn_project``)."""

    def __init__(self, init_ids: torch.Tensor, table: torch.nn.Embedding, vocab: torch.Tensor, lr: float,
                 weight_decay: float):
        self.table = table
        self.vocab = vocab
        self.soft = table.weight[init_ids].detach().clone().requires_grad_(True)
        self.opt = torch.optim.AdamW([self.soft], lr=lr, weight_decay=weight_decay)

    def project(self) -> torch.Tensor:
        """Nearest allowed token id per slot ([k])."""
        with torch.no_grad():
            rows = F.normalize(self.table.weight[self.vocab].float(), dim=-1)
            sims = F.normalize(self.soft.float(), dim=-1) @ rows.T
            return self.vocab[sims.argmax(dim=-1)]

    def step(self, grad_projected: torch.Tensor) -> None:
        self.soft.grad = grad_projected.to(self.soft)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def target_image_latents(ctx) -> tuple[torch.Tensor, dict]:
    """x₀ of an image of the concept, as unmetered setup: the row's ``image`` file if given, else the unconstrained
    reference model's image of the prompt at the row's seed (no edits, no guard). Also returns whether the judge
    flags that image (an attack that matches a concept-free image cannot bring the concept back)."""
    from PIL import Image

    from safediff.detectors.base import images_to_tensor

    target = ctx.target
    with ctx.unmetered("target_image"), torch.no_grad():
        if ctx.row.get("image"):
            try:
                image = Image.open(ctx.row["image"]).convert("RGB").resize((target.width, target.height))
            except OSError as e:
                raise SafediffError(f"target image '{ctx.row['image']}' could not be read: {e}") from None
            pixels = images_to_tensor([image])
            x0 = image_latents(target.model, pixels)
            source = ctx.row["image"]
        else:
            out = target.generate([ctx.prompt], [ctx.seed], model=target.reference)
            pixels, x0, source = out.pixels, out.latents, "reference model"
        score = float(ctx.judge.score(pixels)[0])
    return x0.detach(), {"source": source, "judge_score": round(score, 6),
                         "judge_success": score >= ctx.judge.threshold}


def better(best: Evaluation | None, ev: Evaluation | None) -> Evaluation | None:
    """The evaluation to keep: a success, else the one the judge scored higher."""
    if ev is None:
        return best
    return ev if best is None or ev.success or ev.score > best.score else best


def judge_and_keep(ctx: AttackContext, best: Evaluation | None, text: str) -> tuple[Evaluation | None, bool]:
    """Judge ``text`` and keep the better evaluation; also whether the search should stop (a success, or no budget
    left to judge)."""
    ev = ctx.evaluate(text)
    return better(best, ev), ev is None or ev.success


def finish_token_search(ctx: AttackContext, slots: TokenSlots, ids: torch.Tensor, last_text: str | None,
                        best: Evaluation | None, extra: dict) -> Found:
    """Judge the final tokens (unless already judged or a success was found) and return the best prompt."""
    text = slots.text(ids)
    if text != last_text and not (best is not None and best.success):
        best = better(best, ctx.evaluate(text))
    chosen = best.prompt if best is not None else text
    return Found(prompt=chosen, token_ids=slots.tokenizer(chosen, add_special_tokens=False).input_ids,
                 evaluation=best, extra={"slot_ids": ids.tolist(), **extra, "final_prompt": text})
