"""The sandbox world: one coloured shape on a white background, with captions, all from a seed.

Ground truth is exact: every image is rendered from known attributes (colour, shape, size, position), so
detectors and benchmarks can check what a model generated without a learned judge.

Rendering: the object's coverage of each pixel is computed on a 4x4 sub-pixel grid (anti-aliased edges), and the
pixel is ``(1 - a) * white + a * RGB[colour]``. Sizes and positions are drawn so the object lies inside the image.

Captions: a caption names both attributes, one, or none (``""``, ~10 %, the unconditional branch of
classifier-free guidance). Words are replaced by a synonym with probability ``p_synonym`` so the model learns
them from its training text. The model trains on all ``TRAIN_TEMPLATES``; erasers are only told the
``PLAIN_TEMPLATES``; the ``HELD_OUT_TEMPLATES`` (the rest) test whether an erasure generalises to phrasings it
never saw.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 200, 20),
}
SYNONYMS: dict[str, tuple[str, ...]] = {
    "red": ("crimson", "scarlet"),
    "green": ("emerald",),
    "blue": ("navy", "azure"),
    "yellow": ("golden",),
    "circle": ("disc",),
    "square": ("box",),
    "triangle": ("pyramid",),
}

# {c} = colour word, {s} = shape word; {a} = the article ("a"/"an") for the word that follows it.
PLAIN_TEMPLATES = (
    "{a} {c} {s}",
    "a photo of {a} {c} {s}",
    "an image of {a} {c} {s}",
    "the {c} {s}",
)
HELD_OUT_TEMPLATES = (
    "a drawing of {a} {c} {s}",
    "{a} {s} that is {c}",
    "a picture of {a} {c} {s} on a white background",
)
TRAIN_TEMPLATES = PLAIN_TEMPLATES + HELD_OUT_TEMPLATES
COLOUR_ONLY_TEMPLATES = ("{a} {c} shape", "something {c}", "{a} {c} object")
SHAPE_ONLY_TEMPLATES = ("{a} {s}", "a photo of {a} {s}", "{a} {s} on a white background")

IMAGE_SIZE = 32
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    size: float  # half-width of the object's bounding box, in pixels
    cx: float  # centre, in pixels (0 = left edge of the image)
    cy: float


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def fill(template: str, colour_word: str = "", shape_word: str = "") -> str:
    """Fill a template; the article agrees with the word right after ``{a}``."""
    after = template.split("{a}", 1)[1].lstrip() if "{a}" in template else ""
    first = colour_word if after.startswith("{c}") else shape_word
    return template.format(a=article(first), c=colour_word, s=shape_word)


def random_scene(rng: np.random.Generator, colour: str | None = None, shape: str | None = None,
                 size: int = IMAGE_SIZE) -> Scene:
    colour = colour if colour is not None else COLOURS[rng.integers(len(COLOURS))]
    shape = shape if shape is not None else SHAPES[rng.integers(len(SHAPES))]
    half = float(rng.uniform(0.2, 0.38) * size)
    cx, cy = (float(v) for v in rng.uniform(half + 1, size - half - 1, size=2))
    return Scene(colour, shape, half, cx, cy)


def coverage(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """[size, size] float32 in [0,1]: the fraction of each pixel covered by the object."""
    n = size * _SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float64) + 0.5) / _SUPERSAMPLE
    x, y = np.meshgrid(coords - scene.cx, coords - scene.cy)
    h = scene.size
    if scene.shape == "circle":
        inside = x * x + y * y <= h * h
    elif scene.shape == "square":
        side = h * 0.85  # equal area-ish with the circle and triangle of the same bounding size
        inside = (np.abs(x) <= side) & (np.abs(y) <= side)
    elif scene.shape == "triangle":  # upright, apex at top, base at bottom
        t = (y + h) / (2 * h)  # 0 at apex, 1 at base
        inside = (t >= 0) & (t <= 1) & (np.abs(x) <= t * h)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}; known: {', '.join(SHAPES)}")
    return inside.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3)).astype(np.float32)


def render(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """Scene -> uint8 [size, size, 3] RGB image."""
    if scene.colour not in RGB:
        raise ValueError(f"unknown colour {scene.colour!r}; known: {', '.join(COLOURS)}")
    a = coverage(scene, size)[..., None]
    img = (1.0 - a) * 255.0 + a * np.asarray(RGB[scene.colour], dtype=np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_attributes(colour: str, shape: str, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """Attributes + generator -> uint8 [size, size, 3] image (random size and position)."""
    return render(random_scene(rng, colour, shape, size), size)


def _word(attribute: str, rng: np.random.Generator, p_synonym: float) -> str:
    syn = SYNONYMS.get(attribute, ())
    if syn and rng.random() < p_synonym:
        return syn[rng.integers(len(syn))]
    return attribute


def caption(scene: Scene, rng: np.random.Generator, p_empty: float = 0.1, p_one: float = 0.3,
            p_synonym: float = 0.25) -> str:
    """A training caption for ``scene``: empty, one attribute, or both, in a random template."""
    u = rng.random()
    if u < p_empty:
        return ""
    c = _word(scene.colour, rng, p_synonym)
    s = _word(scene.shape, rng, p_synonym)
    if u < p_empty + p_one / 2:
        return fill(COLOUR_ONLY_TEMPLATES[rng.integers(len(COLOUR_ONLY_TEMPLATES))], colour_word=c)
    if u < p_empty + p_one:
        return fill(SHAPE_ONLY_TEMPLATES[rng.integers(len(SHAPE_ONLY_TEMPLATES))], shape_word=s)
    return fill(TRAIN_TEMPLATES[rng.integers(len(TRAIN_TEMPLATES))], c, s)


def sample_batch(rng: np.random.Generator, n: int, size: int = IMAGE_SIZE, **caption_kw
                 ) -> tuple[np.ndarray, list[str], list[Scene]]:
    """n random scenes -> (uint8 [n, size, size, 3], captions, scenes)."""
    scenes = [random_scene(rng, size=size) for _ in range(n)]
    images = np.stack([render(s, size) for s in scenes])
    captions = [caption(s, rng, **caption_kw) for s in scenes]
    return images, captions, scenes


def vocabulary() -> list[str]:
    """Every word the grammar can produce."""
    words: set[str] = set(COLOURS) | set(SHAPES) | {w for v in SYNONYMS.values() for w in v} | {"a", "an"}
    for t in TRAIN_TEMPLATES + COLOUR_ONLY_TEMPLATES + SHAPE_ONLY_TEMPLATES:
        words |= {w for w in t.replace("{a}", "").replace("{c}", "").replace("{s}", "").split()}
    return sorted(words)
