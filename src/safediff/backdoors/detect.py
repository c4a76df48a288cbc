"""Input-level backdoor detection: the contract every detector keeps, the probe runs they share, and the metrics.

A detector reads a model and prompts (each with its seed), never the attack: ``features(model, prompts, seeds)``
([N, d], whatever it measures), ``fit(benign)`` (learns from the features of a few clean prompts), ``score(features)``
([N], higher = more likely triggered). Its threshold is the ``quantile`` of the benign prompts' scores
(``benign_scores``: the scores of the fitting prompts themselves, or leave-one-out ones for a detector that learns a
model of them, so the threshold is not set on what it was fitted to). ``detect`` runs it all with the compute metered
(denoiser calls, text encodings, seconds per prompt). ``auroc`` / ``accuracy`` score it against known labels. A
detector that reads a part only some architectures have declares them (``archs``, ``archs_reason``) and refuses the
others in one line (``adapters.require_arch``).

Probes run the sampler's own loop (``sampling.denoise``) with a session (``guards.base.Session``) that adds branches
to the one denoiser call per step and reads their predictions, so a probe costs what the sampler costs per extra branch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from safediff.errors import SafediffError
from safediff.options import check_fields, option


@dataclass
class BackdoorDetector:
    """Subclasses: ``@dataclass``, options as fields, ``name``, ``paper``, ``features``, ``fit``, ``score``."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    # settings per purpose on the sandbox: "benchmark" (benchmarks/backdoors_sandbox.py) and "smoke" (tests)
    sandbox: ClassVar[dict[str, dict]] = {}
    archs: ClassVar[tuple[str, ...]] = ()  # Adapter.arch values the detector runs on; () = every architecture
    archs_reason: ClassVar[str] = ""  # why the others are refused, and what to use instead

    quantile: float = option(0.95, low=0.5, high=1.0, help="threshold: this quantile of the benign scores")
    batch: int = option(16, low=1, help="prompts per probe run")

    def __post_init__(self):
        check_fields(self, f"backdoor detector {self.name}")

    def features(self, model, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        raise NotImplementedError

    def require(self, model) -> None:
        """Refuse, in one line, a model whose architecture the detector does not declare."""
        from safediff.adapters import require_arch

        require_arch("backdoor detector", self.name, self.archs, self.archs_reason, model.adapter)

    def fit(self, benign: torch.Tensor) -> None:
        """Learn from benign features [n, d] (nothing for a fixed statistic)."""

    def score(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def benign_scores(self, benign: torch.Tensor) -> torch.Tensor:
        """Scores of the benign prompts the threshold is set on (after ``fit``)."""
        return self.score(benign)

    def config(self) -> dict:
        return {"name": self.name, "paper": self.paper, **dataclasses.asdict(self)}


def build_backdoor_detector(spec: str, **settings) -> BackdoorDetector:
    """``NAME[:KEY=VALUE,...]`` -> the detector (``registry.BACKDOOR_DETECTORS``)."""
    from safediff.options import Spec, typed_values
    from safediff.registry import BACKDOOR_DETECTORS

    parsed = Spec.parse(spec, "backdoor detector")
    cls = BACKDOOR_DETECTORS.get(parsed.name)
    if parsed.preset is not None:
        raise SafediffError(f"backdoor detector {parsed.name} has no presets; got '{parsed.preset}'")
    return cls(**{**settings, **typed_values(cls, parsed.options, f"backdoor detector {parsed.name}")})


@dataclass
class Detection:
    """Per prompt: score and verdict; the threshold, the benign scores and the compute per prompt."""

    scores: list[float]
    flagged: list[bool]
    threshold: float
    benign_scores: list[float]
    cost_per_prompt: dict


def detect(detector: BackdoorDetector, model, benign: list[dict], rows: list[dict]) -> Detection:
    """Fit on ``benign`` rows (prompt, seed), set the threshold, score ``rows``; the cost counts only ``rows``."""
    from safediff.attacks.budget import ComputeMeter

    detector.require(model)
    if len(benign) < 2:
        raise SafediffError(f"a backdoor detector needs at least 2 clean prompts to fit on, got {len(benign)}")
    with torch.no_grad():
        clean = detector.features(model, [r["prompt"] for r in benign], [int(r["seed"]) for r in benign])
        detector.fit(clean)
        reference = detector.benign_scores(clean)
        threshold = float(torch.quantile(reference.double(), detector.quantile))
        meter = ComputeMeter()
        start = time.perf_counter()
        with meter.watch(model):
            feats = detector.features(model, [r["prompt"] for r in rows], [int(r["seed"]) for r in rows])
        seconds = time.perf_counter() - start
        scores = detector.score(feats)
    n = max(len(rows), 1)
    cost = {k: v / n for k, v in meter.counts.items() if k != "iterations"}
    cost["seconds"] = round(seconds / n, 4)
    return Detection([float(s) for s in scores], [bool(s > threshold) for s in scores], threshold,
                     [float(s) for s in reference], cost)


def auroc(scores: list[float], labels: list[int]) -> float:
    """Area under the ROC curve of ``scores`` for labels 1 vs 0: P(s₁ > s₀) + ½ P(s₁ = s₀) (Mann-Whitney)."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        raise SafediffError("AUROC needs both triggered and benign prompts")
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def accuracy(flagged: list[bool], labels: list[int]) -> float:
    """Share of prompts whose verdict equals their label."""
    return sum(bool(f) == bool(y) for f, y in zip(flagged, labels)) / len(labels)


# ---------------------------------------------------------------------------------------------- probe runs --

def batched(fn, prompts: list[str], seeds: list[int], size: int) -> torch.Tensor:
    """``fn(prompts, seeds)`` -> [n, ...] over chunks of ``size`` prompts, concatenated."""
    return torch.cat([fn(prompts[i:i + size], seeds[i:i + size]) for i in range(0, len(prompts), size)])


def cross_attention_modules(model) -> list[torch.nn.Module]:
    """The attention modules whose keys/values read text (the parents of the adapter's text K/V projections): a
    UNet's cross-attention ``attn2`` (on an MM-DiT these are joint attentions, where text and image share one softmax;
    detectors that need cross-attention declare the UNet architectures)."""
    names = {n.rsplit(".", 1)[0] for n, _ in model.adapter.text_kv()}
    return [m for n, m in model.denoiser.named_modules() if n in names]


@contextlib.contextmanager
def cross_attention_hooks(model, hook, with_kwargs: bool = False):
    """``hook`` registered as a forward hook on every ``cross_attention_modules(model)`` while active (removed on
    exit, also on error)."""
    handles = [m.register_forward_hook(hook, with_kwargs=with_kwargs) for m in cross_attention_modules(model)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def probe(model, session_class, prompts: list[str], seeds: list[int], steps: int | None, **session_kwargs):
    """Run the sampler's loop (the model's scheduler and guidance; its default steps unless ``steps``) for
    ``prompts`` with a probing session; returns the session (what it read) after the last step."""
    from safediff.guards.base import GenerationContext
    from safediff.sampling import SamplerSettings, denoise, initial_noise, make_scheduler, step_kwargs

    s = SamplerSettings.of(model, steps)
    adapter = model.adapter
    scheduler = make_scheduler(model)
    adapter.set_timesteps(scheduler, s.steps, s.height, s.width)
    latents, gens = initial_noise(model, seeds, s.height, s.width)
    ctx = GenerationContext(model, list(prompts), adapter.encode(list(prompts)),
                            adapter.encode_negative(None, len(prompts)), s.guidance, scheduler.timesteps,
                            s.height, s.width, s.embedded_guidance)
    session = session_class(ctx, **session_kwargs)
    denoise(session, scheduler, adapter.initial_latents(scheduler, latents), kwargs=step_kwargs(scheduler, gens, 0.0))
    return session
