"""UnlearnDiffAtk — Zhang et al., "To Generate or Not? Safety-Driven Unlearned Diffusion Models Are Still Easy to
Generate Unsafe Images ... For Now", ECCV 2024 (reference code: OPTML-Group/Diffusion-MU-Attack, ``text_grad_.py``).

The erased model θ* is used as its own classifier: find a prompt c′ = [adv; c] that maximises p_θ*(c′ | x_tgt), i.e.
minimises the denoising error on a target image x_tgt of the concept,

    min_{u ∈ C}  E_ε ‖ε − ε_θ*(x_t, t, [u; c])‖²,   x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε,  x₀ = E(x_tgt),

where each of the k prefix tokens u_i is a distribution over the vocabulary (C = product of probability simplices).
Update (per iteration at timestep t): sample one-hot tokens ũ ~ u (straight-through: the gradient of the one-hot
is passed to u clipped to [−1, 1]), embed ũ, take an Adam step (lr 0.01, weight decay 0.1) on u, and project each
u_i back onto the simplex (bisection). Timesteps t = 10, 30, …, 990 in order, ``iterations_per_timestep`` each;
after each timestep the argmax tokens are decoded to text, the target generates from that text, the judge looks,
and the attack stops at the first success.

Recipe: search space = ``TokenSlots`` (prefix of k slots) + ``vocabulary``; objective = ``denoising_error``;
search method = ``SimplexAdam``; judge after every timestep.

Target image: by default the *unconstrained* base model's image of the prompt at the row's seed (the reference
code generates its dataset with SD v1.4 the same way), or a file in the row's ``image`` column.
Guarded targets: the objective uses the noise prediction the sampler would step with (the guard session's
``combine``, which includes CFG) — ``through_guard=True``, the default. The reference code's loss ignores SLD (it
optimises the unguarded UNet's conditional prediction and only generates with SLD): ``through_guard=False``.
Vocabulary: ``words`` (default) restricts slots to whole-word tokens that re-encode to themselves, so the printed
prompt is exactly the prompt that was judged; ``all`` is the reference's full vocabulary (the decoded text is
still what is judged, as in the reference's evaluation, but may re-tokenize differently from the optimised ids).

Reference per-prompt budget: 50 timesteps × 40 iterations = 2,000 UNet forward + backward passes, plus up to 50
judged 50-step generations. Sandbox defaults: 10 timesteps × 20 iterations (200) and up to 10 judged generations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from safediff.attacks.base import Attack
from safediff.attacks.context import AttackContext, Found
from safediff.attacks.objectives import denoising_error, repeat_conditioning, target_image_latents, uniform_timesteps
from safediff.options import option
from safediff.attacks.search import finish_token_search, judge_and_keep, SimplexAdam
from safediff.attacks.spaces import TokenSlots, vocabulary


@dataclass
class UnlearnDiffAtk(Attack):
    name: ClassVar[str] = "unlearndiff"
    default_budget: ClassVar[dict] = {}
    sandbox: ClassVar[dict[str, dict]] = {
        "benchmark": {"params": "timesteps=3,iterations_per_timestep=12", "budget": "iterations=36"},
        "smoke": {"params": "timesteps=2,iterations_per_timestep=2", "budget": "iterations=4"},
    }
    reference_budget: ClassVar[dict] = {"timesteps": 50, "iterations_per_timestep": 40, "unet_forward": 2000,
                                        "unet_backward": 2000, "judged_generations": 50, "generation_steps": 50}

    k: int = option(5, low=1)
    layout: str = "prefix"
    timesteps: int = option(10, low=1, high=1000)
    iterations_per_timestep: int = option(20, low=1)
    lr: float = option(0.01, low=0.0)
    weight_decay: float = option(0.1, low=0.0)
    random_init: bool = False
    vocabulary: str = "words"
    through_guard: bool = True
    noise_batch: int = option(1, low=1)  # noise draws averaged per iteration, in one UNet call (reference: 1)

    def search(self, ctx: AttackContext) -> Found:
        target = ctx.target
        slots = TokenSlots(target.model, ctx.prompt, self.k, self.layout)
        vocab = vocabulary(slots.tokenizer, self.vocabulary)
        x0, image_info = target_image_latents(ctx)
        method = SimplexAdam(slots.k, vocab, self.lr, self.weight_decay, ctx.rng, self.random_init)
        initial = method.argmax_ids().tolist()
        guided = target.guarded and self.through_guard
        cost = ctx.step_cost(noise=1, encode=1, backward=1)
        best, last_text, exhausted = None, None, False
        for t_value in uniform_timesteps(self.timesteps):
            t = torch.tensor([t_value], device=target.model.device)
            for _ in range(self.iterations_per_timestep):
                if not ctx.afford(cost):
                    exhausted = True
                    break
                one_hot = method.sample()
                cond = repeat_conditioning(slots.encode(method.embeddings(one_hot, slots), method.ids(one_hot)),
                                           self.noise_batch)
                noise = torch.randn((self.noise_batch, *x0.shape[1:]), generator=ctx.rng).to(x0)
                loss = denoising_error(target, cond, x0.expand_as(noise), t, noise,
                                       prompts=[ctx.prompt] * self.noise_batch, guided=guided)
                ctx.backward(loss, inputs=[method.x])
                method.step()
                ctx.tick(loss.item(), timestep=t_value)
            if exhausted:
                break
            last_text = slots.text(method.argmax_ids())
            best, stop = judge_and_keep(ctx, best, last_text)
            if stop:
                break
        extra = {"initial_slot_ids": initial, "target_image": image_info,
                 "objective": "denoising_error" + (" (through guard)" if guided else "")}
        return finish_token_search(ctx, slots, method.argmax_ids(), last_text, best, extra)
