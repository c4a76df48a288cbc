"""Exemplar scenes for erasers that learn from images: one object that carries a value, or none of several values.

``render(values, n, seed, present)`` draws ``n`` one-object scenes without the mark (the mark is unprompted and no
concept's business). With ``present``, scene i carries ``values[i % len(values)]`` on its axis and the other
attributes are drawn uniformly; without, every attribute is drawn among the values not in ``values`` (an axis that
would be left empty keeps all its values). Exact by construction: the world renders what the scene says.
"""

from __future__ import annotations

import numpy as np

from safediff.errors import SafediffError
from safediff.sandbox.values import AXES, VALUES, axis_of
from safediff.sandbox.world import Scene, random_object, render as render_scene


def render(values: list[str], n: int, seed: int, present: bool = True) -> np.ndarray:
    """uint8 [n, 64, 64, 3] scenes carrying ``values`` in turn (``present``) or none of them."""
    unknown = [v for v in values if v not in VALUES]
    if unknown or not values:
        raise SafediffError(f"unknown sandbox value(s) {unknown or values}; accepted: {', '.join(VALUES)}")
    if n < 1:
        raise SafediffError(f"the number of exemplar images must be >= 1, got {n}")
    rng = np.random.default_rng([seed, 29, int(present)])
    pools = {axis: tuple(v for v in vs if v not in values) or vs for axis, vs in AXES.items()}
    images = []
    for i in range(n):
        fixed = {}
        if present:
            value = values[i % len(values)]
            fixed[axis_of(value)] = value
        else:
            fixed = {axis: pools[axis][rng.integers(len(pools[axis]))] for axis in AXES}
        images.append(render_scene(Scene((random_object(rng, **fixed),), mark=False)))
    return np.stack(images)
