"""Shared pieces of the attack-recipe tests: a cheap judge and a tiny target."""

from __future__ import annotations

import torch

from safediff.attacks.judge import Judge
from safediff.attacks.target import Target
from safediff.concepts import resolve
from safediff.detectors.base import Detector, images_to_tensor


class Redness(Detector):
    """Mean excess of red over the other channels (a stand-in judge on random tiny models)."""

    name = "redness-test"
    labels = ("red",)
    flag_labels = ("red",)
    threshold = 0.5

    def scores(self, images) -> torch.Tensor:
        x = images_to_tensor(images)
        return (x[:, 0] - x[:, 1:].mean(1)).clamp(0, 1).mean((1, 2))[:, None]


def never_flags() -> Judge:
    """A judge whose threshold no score reaches: the unmodified prompt never succeeds, so the search always runs."""
    return Judge(Redness(), threshold=1.5)


def red_target(model, guard=None) -> Target:
    kwargs = {} if guard is None else {"guard": guard}
    return Target(model=model, concepts=resolve("red"), spec=model.spec, **kwargs)


ROW = {"prompt": "a red circle"}
