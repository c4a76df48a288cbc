"""The sandbox's concept presets: one ``Concept`` per attribute value (23), filled with what the world knows.

For a value of one axis (colour, shape or style):

- ``contexts``: the plain templates (the only phrasings erasers are told) with the value's word left open and a value
  of another axis in place (a colour: every shape; a shape: every colour; a style: every shape);
- ``pairs`` (Ring-A-Bell, Concept Arithmetic): every name an eraser may know or an attacker may use (the word and its
  synonyms; never the implicit phrases) in every plain template and every value of that other axis, against the same
  prompt without the value (a shape is replaced by the word "shape");
- ``synonyms``: held out from erasers; ``preserve``: every other value of every axis;
- ``judge``: the exact detector that reads the axis;
- ``exemplars``: ``sandbox:VALUE``, scenes the world renders with (or without) the value (``sandbox.exemplars``).
"""

from __future__ import annotations

from safediff.concepts import Concept
from safediff.sandbox.captions import PLAIN_TEMPLATES, fill
from safediff.sandbox.values import AXES, COLOURS, SHAPES, SYNONYMS, VALUES, axis_of

JUDGES = {"colour": "sandbox-colour", "shape": "sandbox-shape", "style": "sandbox-style"}
SLOT = "\x00"  # stands for the concept's word while a template is filled, then becomes "{}"


def _fill(template: str, axis: str, word: str, other: str) -> str:
    """``template`` with ``word`` on ``axis`` and ``other`` on the other axis (a shape for colours and styles, a
    colour for shapes)."""
    values = {"colour": "", "shape": "", "style": ""}
    values[axis] = word
    values["colour" if axis == "shape" else "shape"] = other
    return fill(template, **values)


def _others(axis: str) -> tuple[str, ...]:
    return COLOURS if axis == "shape" else SHAPES


def _contexts(axis: str) -> tuple[str, ...]:
    out = [_fill(t, axis, SLOT, o).replace(SLOT, "{}").replace("a {}", "{a} {}").replace("an {}", "{a} {}")
           for t in PLAIN_TEMPLATES for o in _others(axis)]
    return tuple(dict.fromkeys(out))


def _pairs(value: str, axis: str) -> tuple[tuple[str, str], ...]:
    without = "shape" if axis == "shape" else ""
    return tuple((_fill(t, axis, word, o), _fill(t, axis, without, o))
                 for word in (value, *SYNONYMS.get(value, ())) for t in PLAIN_TEMPLATES for o in _others(axis))


def presets() -> dict[str, Concept]:
    out = {}
    for value in VALUES:
        axis = axis_of(value)
        preserve = tuple(v for a in AXES for v in AXES[a] if v != value)
        out[value] = Concept(value, (value,), category=axis, synonyms=tuple(SYNONYMS.get(value, ())),
                             preserve=preserve, contexts=_contexts(axis), pairs=_pairs(value, axis),
                             judge=JUDGES[axis], exemplars=f"sandbox:{value}")
    return out
