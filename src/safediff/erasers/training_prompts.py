"""The prompts the training erasers (AdvUnlearn, STEREO, DoCo, SalUn, DES) learn from: (erase, guide) pairs of every
keyword in its contexts, and the retained prompts. Built on the contexts and word handling of ``erasers.prompts``."""

from __future__ import annotations

from safediff.concepts import Concept
from safediff.erasers.prompts import contexts, preserve_prompts, replace_word, words_of
from safediff.errors import SafediffError


def prompt_pairs(concepts: list[Concept], guide: str | None) -> list[tuple[str, str]]:
    """(erase prompt, guide prompt) for the training erasers: each keyword of each concept in its contexts (the
    concept's ``contexts``, or the generic templates), and the same prompt with the keyword replaced by the guide
    (``guide``, else the concept's own; "" removes the word)."""
    pairs = []
    for concept in concepts:
        g = concept.guide if guide is None else guide
        for word in words_of(concept):
            if not word.strip():
                continue
            pairs += [(p, replace_word(p, word, g)) for p in contexts(concept, word, expand=True)]
    if not pairs:
        raise SafediffError("no concept keywords to erase; give at least one concept with a keyword")
    return list(dict.fromkeys(pairs))


def retain_prompts(concepts: list[Concept], preserve: list[str] | None) -> list[str]:
    """What the training erasers keep: each preserved concept in its contexts (the concepts' own preserve lists,
    or ``preserve``), none containing an erased word; the empty prompt when nothing else is left."""
    items = [p for c in concepts for p in c.preserve] if preserve is None else [p.strip() for p in preserve]
    words = [w for c in concepts for w in words_of(c) if w.strip()]
    kept = [p for p in preserve_prompts(list(dict.fromkeys(i for i in items if i)), words, expand=True) if p]
    return kept or [""]
