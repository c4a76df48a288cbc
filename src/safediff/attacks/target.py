"""What an attack runs against: a model (edits already applied), a guard, and the sampler settings it is judged with.

``reference`` is the *unconstrained* model (same base weights, no edits, no guard) that P4D matches and that draws
target images; it is the target model itself when there are no edits. Noise predictions go through the one step
function (``safediff.sampling.guided_eps`` / ``denoiser_output``); images through the one sampler.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

import torch

from safediff.adapters import Conditioning
from safediff.attacks.budget import ComputeMeter
from safediff.concepts import Concept, resolve
from safediff.errors import SafediffError
from safediff.guards.base import GenerationContext, Guard, NoGuard, start_session
from safediff.identity import ByIdentity
from safediff.models import Model
from safediff.sampling import SamplerSettings, denoiser_output, generate, guided_eps, latent_shape, make_scheduler


def step_index(timesteps: torch.Tensor, t: torch.Tensor) -> int:
    """The sampler step whose timestep is nearest ``t``'s (first) value: which step's rules a guard applies to a
    prediction at an arbitrary training timestep."""
    return int((timesteps.to(t.device).float() - t.reshape(-1).float()[0]).abs().argmin())


@dataclass
class Target:
    """The attacked system: ``model`` (edits applied) behind ``guard``, sampled with ``settings``."""

    model: Model
    guard: Guard = field(default_factory=NoGuard)
    concepts: list[Concept] = field(default_factory=list)
    spec: str = ""
    reference_model: Model | None = None
    steps: int | None = None
    guidance: float | None = None
    height: int | None = None
    width: int | None = None
    scheduler: str | None = None
    _uncond: ByIdentity = field(default_factory=ByIdentity, repr=False)
    _call_costs: dict | None = field(default=None, repr=False)

    def __post_init__(self):
        s = SamplerSettings.of(self.model, self.steps, self.guidance, self.height, self.width, self.scheduler)
        self.settings = s
        self.steps, self.guidance, self.height, self.width = s.steps, s.guidance, s.height, s.width

    @property
    def guarded(self) -> bool:
        return not isinstance(self.guard, NoGuard)

    @property
    def reference(self) -> Model:
        return self.reference_model if self.reference_model is not None else self.model

    def models(self) -> list[Model]:
        return [self.model] if self.reference is self.model else [self.model, self.reference]

    # --- generation (the one sampler) ---
    def generate(self, prompts: list[str], seeds: list[int], model: Model | None = None, guard: Guard | None = None,
                 conditioning: Conditioning | None = None):
        """Images from the target: its model with its guard. With ``model`` given (e.g. ``target.reference``, the
        unconstrained model, which *is* the target model when there are no edits) the guard is ``guard`` or none.
        ``conditioning`` replaces the prompts' encoding (soft prompts, learned embeddings)."""
        if model is None:
            model, guard = self.model, (guard if guard is not None else self.guard)
        s = self.settings
        return generate(model, prompts, seeds, guard=guard or NoGuard(), progress=False, steps=s.steps,
                        guidance=s.guidance, height=s.height, width=s.width, scheduler=s.scheduler,
                        conditioning=None if conditioning is None else detached(conditioning))

    # --- noise predictions (differentiable in cond) ---
    def uncond(self, model: Model, batch: int) -> Conditioning:
        """The unconditional branch (cached per model; its one encoding is counted when first made)."""
        if model not in self._uncond:
            with torch.no_grad():
                self._uncond[model] = model.adapter.encode_negative(None, 1)
        u = self._uncond[model]
        return Conditioning(u.embeds.expand(batch, -1, -1),
                            None if u.pooled is None else u.pooled.expand(batch, -1))

    def timesteps(self) -> torch.Tensor:
        s = make_scheduler(self.model, self.scheduler)
        self.model.adapter.set_timesteps(s, self.steps, self.height, self.width, device=self.model.device)
        return s.timesteps

    def noise(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning, prompts: list[str] | None = None,
              guided: bool | None = None) -> torch.Tensor:
        """ε the target uses at (x_t, t): unguarded -> the conditional prediction ε_θ*(x_t, t, c) (as the reference
        attacks do); guarded (default when a guard is set) -> the guard session's combined prediction over its
        branches in one denoiser call: what the sampler would step with at the sampler step nearest t (warm-up
        rules included). Each call is a fresh guard session, so stateful guards start from their initial state
        (SLD's momentum ν = 0): the single-step view of a trajectory, as P4D's reference code also takes."""
        guided = self.guarded if guided is None else guided
        return self._predict(self.model, self.guard if guided else None, latents, t, cond, prompts)

    def reference_noise(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                        guided: bool | None = None) -> torch.Tensor:
        """ε of the unconstrained model: conditional, or plain CFG at the target's guidance when ``guided``
        (defaults to whether the target is guarded, so both sides of a matching loss are the same kind)."""
        guided = self.guarded if guided is None else guided
        return self._predict(self.reference, NoGuard() if guided else None, latents, t, cond, None)

    def _predict(self, model: Model, guard: Guard | None, latents, t, cond: Conditioning,
                 prompts: list[str] | None) -> torch.Tensor:
        b = latents.shape[0]
        t = t.reshape(-1).to(latents.device)
        if guard is None:
            return denoiser_output(model, latents, t, cond)
        timesteps = self.timesteps()
        ctx = GenerationContext(model, list(prompts or [""] * b), cond, self.uncond(model, b), self.guidance,
                                timesteps, self.height, self.width)
        session = start_session(guard, ctx)
        i = step_index(timesteps, t)
        with session.unet_hooks():
            return guided_eps(session, i, t, latents)

    # --- measured per-call costs (calibrated once, not charged to any attack) ---
    def call_costs(self) -> dict:
        """Counted units of one target ``noise`` call, one ``reference_noise`` call and one text encoding."""
        if self._call_costs is None:
            with torch.no_grad():
                lat = torch.zeros(1, *latent_shape(self.model, self.height, self.width), device=self.model.device,
                                  dtype=self.model.dtype)
                t = self.timesteps()[:1]
                self.uncond(self.model, 1), self.uncond(self.reference, 1)  # cached outside the measurement
                costs = {}
                for key, fn in (("encode", lambda: self.model.adapter.encode([""])),
                                ("noise", lambda: self.noise(lat, t, self.uncond(self.model, 1))),
                                ("reference_noise", lambda: self.reference_noise(lat, t,
                                                                                 self.uncond(self.reference, 1)))):
                    meter = ComputeMeter()
                    before = dict(meter.counts)
                    with meter.watch(*self.models()):
                        fn()
                    costs[key] = meter.delta(before)
            self._call_costs = costs
        return self._call_costs

    def protocol(self) -> dict:
        return {"spec": self.spec, "model": self.model.protocol(), "guard": self.guard.config(),
                "concepts": [dataclasses.asdict(c) for c in self.concepts],
                "reference_model": None if self.reference is self.model else self.reference.protocol(),
                "sampler": self.settings.record(self.model)}


def detached(cond: Conditioning) -> Conditioning:
    return Conditioning(cond.embeds.detach(), None if cond.pooled is None else cond.pooled.detach())


@contextlib.contextmanager
def frozen_weights(*models: Model):
    """Weights need no gradients during an attack (only prompts/embeddings are searched); flags restored on exit."""
    params = {id(p): p for m in models for module in m.weight_modules() for p in module.parameters()}
    flags = {k: p.requires_grad for k, p in params.items()}
    try:
        for p in params.values():
            p.requires_grad_(False)
        yield
    finally:
        for k, p in params.items():
            p.requires_grad_(flags[k])


def parse_target(spec: str, concept: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 **settings) -> Target:
    """``SPEC[+EDIT...][:GUARD[:PRESET][,KEY=VALUE...]]`` -> Target. The guard is built for ``concept``; with edits
    the unconstrained reference model (the same SPEC, no edits) is loaded too."""
    from safediff.guards import build_guard
    from safediff.models import load_pipeline

    if not spec or not spec.strip():
        raise SafediffError("empty target; accepted: SPEC[+EDIT][:GUARD[:PRESET]], e.g. sandbox+uce.safetensors:sld")
    model_spec, _, guard_spec = spec.partition(":")
    concepts = resolve(concept)
    guard = build_guard(guard_spec, concept) if guard_spec else NoGuard()
    model = load_pipeline(model_spec, device=device, dtype=dtype)
    base = model_spec.split("+")[0].strip()
    reference = load_pipeline(base, device=device, dtype=dtype) if model.edits else None
    return Target(model=model, guard=guard, concepts=concepts, spec=spec, reference_model=reference, **settings)
