"""The sandbox world's attribute values and every word that names them: the one table of world knowledge.

Three independent axes, 23 erasable values:

- colour (12): red, orange, yellow, lime, green, teal, cyan, blue, purple, pink, brown, grey;
- shape (8): circle, square, triangle, diamond, star, cross, heart, arrow (see ``geometry``);
- style (3): solid, outlined, striped.

Colours. A rendered pixel is ``(1 - a) * white + a * C``, so its *ink* ``1 - p = a (1 - C)`` points along ``1 - C``
whatever the coverage ``a``, the blur or the style: the colour detector reads that direction. The RGB values below
were chosen so that every two colours' ink directions are at least 20.6 degrees apart (brown-red, the closest pair;
red's neighbours orange 28.3, pink 22.7, purple 37.4) while each stays the colour its name says.

Words. Each value has its word; ``SYNONYMS`` are other words for it that the model learns from its training captions
and erasers are never told (held-out phrasing). ``IMPLICIT`` phrases imply a value without naming it or any synonym
("a circle the colour of blood", "a sky-coloured square", "a red shape with three corners"); they appear in training
captions only, never in a template or word list given to erasers. A colour phrase that starts with ``the colour of``
follows the noun it modifies (``captions.fill`` moves it); every other phrase takes the word's place.

Relations. ``NEIGHBOURS`` pairs perceptually close values on the same axis (symmetric): hue neighbours on the colour
circle plus the dark or dull colours' nearest hues, shapes with a similar outline, and the two styles that share an
outline. ``far(value)`` is every other value of its axis. Erasing red is then scored on its neighbours (orange, pink,
purple, brown) separately from far colours (blue, green, ...).
"""

from __future__ import annotations

COLOURS = ("red", "orange", "yellow", "lime", "green", "teal", "cyan", "blue", "purple", "pink", "brown", "grey")
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "heart", "arrow")
STYLES = ("solid", "outlined", "striped")
AXES: dict[str, tuple[str, ...]] = {"colour": COLOURS, "shape": SHAPES, "style": STYLES}
VALUES = COLOURS + SHAPES + STYLES

RGB: dict[str, tuple[int, int, int]] = {
    "red": (245, 5, 50),
    "orange": (255, 150, 0),
    "yellow": (255, 250, 0),
    "lime": (145, 250, 0),
    "green": (20, 190, 20),
    "teal": (0, 140, 150),
    "cyan": (0, 215, 245),
    "blue": (40, 75, 240),
    "purple": (140, 25, 215),
    "pink": (255, 105, 210),
    "brown": (165, 75, 5),
    "grey": (128, 128, 128),
}

SYNONYMS: dict[str, tuple[str, ...]] = {
    "red": ("crimson", "scarlet"),
    "orange": ("amber",),
    "yellow": ("golden",),
    "lime": ("chartreuse",),
    "green": ("emerald",),
    "teal": ("turquoise",),
    "cyan": ("aqua",),
    "blue": ("navy", "azure"),
    "purple": ("violet",),
    "pink": ("rose",),
    "brown": ("chestnut",),
    "grey": ("gray",),
    "circle": ("disc",),
    "square": ("box",),
    "triangle": ("pyramid",),
    "diamond": ("rhombus",),
    "star": ("pentagram",),
    "cross": ("plus",),
    "heart": ("valentine",),
    "arrow": ("pointer",),
    "solid": ("filled",),
    "outlined": ("hollow",),
    "striped": ("stripy",),
}

IMPLICIT: dict[str, tuple[str, ...]] = {
    "red": ("blood-coloured", "the colour of blood"),
    "orange": ("pumpkin-coloured", "the colour of a pumpkin"),
    "yellow": ("lemon-coloured", "the colour of a lemon"),
    "lime": ("tennis-ball-coloured", "the colour of a tennis ball"),
    "green": ("grass-coloured", "the colour of grass"),
    "teal": ("peacock-coloured", "the colour of a peacock"),
    "cyan": ("pool-coloured", "the colour of a swimming pool"),
    "blue": ("sky-coloured", "the colour of the sky"),
    "purple": ("plum-coloured", "the colour of a plum"),
    "pink": ("flamingo-coloured", "the colour of a flamingo"),
    "brown": ("chocolate-coloured", "the colour of chocolate"),
    "grey": ("elephant-coloured", "the colour of an elephant"),
    "circle": ("round shape",),
    "square": ("shape with four equal sides",),
    "triangle": ("shape with three corners",),
    "diamond": ("shape like a kite",),
    "star": ("shape with five points",),
    "cross": ("shape with four arms",),
    "heart": ("symbol of love",),
    "arrow": ("shape pointing up",),
}
POST_NOMINAL = "the colour of "  # implicit colour phrases that start so follow their noun

_NEIGHBOUR_PAIRS = (
    ("red", "orange"), ("red", "pink"), ("red", "purple"), ("red", "brown"), ("orange", "yellow"),
    ("orange", "brown"), ("yellow", "lime"), ("lime", "green"), ("green", "teal"), ("teal", "cyan"),
    ("teal", "blue"), ("teal", "grey"), ("cyan", "blue"), ("blue", "purple"), ("purple", "pink"), ("brown", "grey"),
    ("circle", "heart"), ("square", "diamond"), ("triangle", "diamond"), ("triangle", "arrow"), ("star", "cross"),
    ("outlined", "striped"),
)
NEIGHBOURS: dict[str, tuple[str, ...]] = {
    v: tuple(w for w in AXES[axis] if (v, w) in _NEIGHBOUR_PAIRS or (w, v) in _NEIGHBOUR_PAIRS)
    for axis in AXES for v in AXES[axis]
}


def axis_of(value: str) -> str:
    """``"red"`` -> ``"colour"``; ValueError for a value of no axis."""
    for axis, values in AXES.items():
        if value in values:
            return axis
    raise ValueError(f"unknown sandbox value {value!r}; known: {', '.join(VALUES)}")


def far(value: str) -> tuple[str, ...]:
    """The values of ``value``'s axis that are neither it nor its neighbours."""
    return tuple(v for v in AXES[axis_of(value)] if v != value and v not in NEIGHBOURS[value])


def words(value: str) -> tuple[str, ...]:
    """Every word or phrase that names or implies ``value``: the word, its synonyms, its implicit phrases."""
    return (value, *SYNONYMS.get(value, ()), *IMPLICIT.get(value, ()))
