"""The sandbox's concept presets: one ``Concept`` per attribute value, filled with what the world knows.

For a colour (a shape likewise), ``contexts`` are the plain templates (the only phrasings erasers are told) with every
shape in place and the colour's word left open, ``pairs`` are Ring-A-Bell / Concept-Arithmetic prompt pairs (every
name of the colour, keyword and synonyms, in every plain template and shape, against the same prompt without the
colour word), ``preserve`` the other values, ``judge`` the exact detector that reads the attribute.
"""

from __future__ import annotations

from safediff.concepts import Concept
from safediff.sandbox.world import COLOURS, PLAIN_TEMPLATES, SHAPES, SYNONYMS, fill

JUDGES = {"colour": "sandbox-colour", "shape": "sandbox-shape"}


def _contexts(category: str) -> tuple[str, ...]:
    """Plain templates with the other attribute filled in and the concept's word left as ``{}``."""
    out = []
    for t in PLAIN_TEMPLATES:
        for o in (SHAPES if category == "colour" else COLOURS):
            slot = t.replace("{c}", "{}") if category == "colour" else t.replace("{s}", "{}")
            out.append(slot.replace("{s}", o) if category == "colour" else slot.replace("{c}", o))
    return tuple(dict.fromkeys(out))


def _pairs(value: str, category: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for word in dict.fromkeys((value, *SYNONYMS.get(value, ()))):
        for template in PLAIN_TEMPLATES:
            if category == "colour":
                bare = template.replace("{c} ", "").replace(" {c}", "")
                pairs += [(fill(template, word, s), fill(bare, "", s)) for s in SHAPES]
            else:
                pairs += [(fill(template, c, word), fill(template, c, "shape")) for c in COLOURS]
    return tuple(pairs)


def presets() -> dict[str, Concept]:
    out = {}
    for category, values in (("colour", COLOURS), ("shape", SHAPES)):
        same, other = (COLOURS, SHAPES) if category == "colour" else (SHAPES, COLOURS)
        for v in values:
            preserve = (tuple(x for x in same if x != v) + tuple(other) if category == "colour"
                        else tuple(other) + tuple(x for x in same if x != v))
            out[v] = Concept(v, (v,), category=category, synonyms=tuple(SYNONYMS.get(v, ())), preserve=preserve,
                             contexts=_contexts(category), pairs=_pairs(v, category), judge=JUDGES[category])
    return out
