"""Name -> implementation registries shared by the CLI, the benchmark runner and the UI.

Entries are lazy ``"module:attr"`` strings so that heavy or optional backends are imported only when used.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any

from safediff.errors import SafediffError


class Registry:
    def __init__(self, kind: str, entries: dict[str, str], aliases: dict[str, str] | None = None):
        self.kind = kind
        self._aliases = dict(aliases or {})  # alias -> registered name
        self._entries = {**entries, **{alias: entries[name] for alias, name in self._aliases.items()}}

    def names(self) -> list[str]:
        """Every accepted name, aliases included."""
        return sorted(self._entries)

    def primary_names(self) -> list[str]:
        """One name per implementation (aliases left out): what a benchmark of every method runs."""
        return sorted(n for n in self._entries if n not in self._aliases)

    def aliases_of(self, name: str) -> tuple[str, ...]:
        return tuple(sorted(a for a, n in self._aliases.items() if n == name))

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> Any:
        if name not in self._entries:
            close = difflib.get_close_matches(name, self._entries, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise SafediffError(f"unknown {self.kind} '{name}'{hint}; accepted: {', '.join(self.names())}")
        module, attr = self._entries[name].split(":")
        return getattr(importlib.import_module(module), attr)


GUARDS = Registry("guard", {
    "none": "safediff.guards.base:NoGuard",
    "negative-prompt": "safediff.guards.negative_prompt:NegativePromptGuard",
    "sld": "safediff.guards.sld:SLD",
    "casg-sld": "safediff.guards.casg:CASGSLD",
    "safree": "safediff.guards.safree:SafreeGuard",
    "safree-released": "safediff.guards.safree:SafreeReleasedGuard",
    "casg-safree": "safediff.guards.casg_safree:CasgSafreeGuard",
    "spm": "safediff.guards.spm:SPMGuard",
    "adavd": "safediff.guards.adavd:AdaVD",
})

ERASERS = Registry("eraser", {
    "uce": "safediff.erasers.uce:UCE",
    "rece": "safediff.erasers.rece:RECE",
    "esd-x": "safediff.erasers.esd:ESDX",
    "esd-u": "safediff.erasers.esd:ESDU",
    "esd-x-strict": "safediff.erasers.esd:ESDXStrict",
    "trce": "safediff.erasers.trce:TRCE",
    "advunlearn": "safediff.erasers.advunlearn:AdvUnlearn",
    "stereo": "safediff.erasers.stereo:STEREO",
    "doco": "safediff.erasers.doco:DoCo",
    "salun": "safediff.erasers.salun:SalUn",
    "des": "safediff.erasers.des:DES",
    "freezeasguard": "safediff.erasers.freezeasguard:FreezeAsGuard",
    "geom-erasing": "safediff.erasers.geom_erasing:GeomErasing",
    "speed": "safediff.erasers.speed:SPEED",
    "concept-prune": "safediff.erasers.concept_prune:ConceptPrune",
    "mace": "safediff.erasers.mace:MACE",
    "realera": "safediff.erasers.realera:RealEra",
    "erase-anything": "safediff.erasers.erase_anything:EraseAnything",
    "spm": "safediff.erasers.spm:SPM",
    "concept-ablation": "safediff.erasers.concept_ablation:ConceptAblation",
    "forget-me-not": "safediff.erasers.forget_me_not:ForgetMeNot",
    "all-but-one": "safediff.erasers.all_but_one:AllButOne",
    "ticoe": "safediff.erasers.ticoe:TICoE",
    "safegen": "safediff.erasers.safegen:SafeGen",
}, aliases={"esd": "esd-u",  # the paper's variant for nudity and other global concepts
            "ca": "concept-ablation", "fmn": "forget-me-not"})  # the names the literature tables use

ATTACKS = Registry("attack", {
    "unlearndiff": "safediff.attacks.unlearndiff:UnlearnDiffAtk",
    "p4d-n": "safediff.attacks.p4d:P4DN",
    "p4d-k": "safediff.attacks.p4d:P4DK",
    "ring-a-bell": "safediff.attacks.ring_a_bell:RingABell",
    "mma-diffusion": "safediff.attacks.mma:MMADiffusion",
    "concept-inversion": "safediff.attacks.concept_inversion:ConceptInversion",
    "concept-arithmetic": "safediff.attacks.concept_arithmetic:ConceptArithmetic",
    "relearn": "safediff.attacks.relearn:Relearn",
})

DETECTORS = Registry("detector", {
    "nudenet": "safediff.detectors.nudenet:NudeNet",
    "q16": "safediff.detectors.q16:Q16",
    "i2p-harmful": "safediff.detectors.i2p_harmful:I2PHarmful",
    "clip-score": "safediff.detectors.clip_score:ClipScore",
    "sandbox-colour": "safediff.detectors.sandbox:SandboxColour",
    "sandbox-shape": "safediff.detectors.sandbox:SandboxShape",
    "sandbox-presence": "safediff.detectors.sandbox:SandboxPresence",
    "sandbox-style": "safediff.detectors.sandbox:SandboxStyle",
    "sandbox-mark": "safediff.detectors.sandbox:SandboxMark",
})

BACKDOORS = Registry("backdoor", {
    "text-encoder": "safediff.backdoors.inject:TextEncoderBackdoor",
    "unet": "safediff.backdoors.inject:UNetBackdoor",
    "natural": "safediff.backdoors.inject:NaturalBackdoor",
})

BACKDOOR_DETECTORS = Registry("backdoor detector", {
    "set": "safediff.backdoors.set_detector:SET",
    "attention-stats": "safediff.backdoors.baselines:AttentionStats",
    "seed-diversity": "safediff.backdoors.baselines:SeedDiversity",
})
