"""Word boundaries in token sequences, for the two subword conventions safediff meets.

CLIP's byte-level BPE marks a word's *last* token with the ``</w>`` suffix; SentencePiece (T5) marks a word's
*first* token with the ``▁`` prefix. Erasers find a concept word at word boundaries, attacks cut prompts between
words and restrict searches to whole-word tokens, whichever encoder's tokens they work on.
"""

from __future__ import annotations

WORD_START = "\u2581"  # SentencePiece's word-initial marker
WORD_END = "</w>"  # CLIP's word-final marker


def marks_word_start(tokenizer) -> bool:
    """True for SentencePiece-style tokenizers (``▁`` opens a word), False for CLIP-style ones (``</w>`` ends it)."""
    probe = tokenizer.convert_ids_to_tokens(tokenizer("a", add_special_tokens=False).input_ids)
    return bool(probe) and probe[0].startswith(WORD_START)


def is_whole_word_piece(tokenizer, token: str, starts: bool | None = None) -> bool:
    """Whether ``token`` (a vocabulary string) carries its tokenizer's word marker: ``▁…`` or ``…</w>``."""
    starts = marks_word_start(tokenizer) if starts is None else starts
    return token.startswith(WORD_START) if starts else token.endswith(WORD_END)


def word_ends(tokenizer, ids: list[int]) -> list[bool]:
    """For each token of ``ids`` (no special tokens), whether a word ends with it."""
    tokens = tokenizer.convert_ids_to_tokens(ids)
    if marks_word_start(tokenizer):
        return [i + 1 == len(tokens) or tokens[i + 1].startswith(WORD_START) for i in range(len(tokens))]
    return [t.endswith(WORD_END) for t in tokens]
