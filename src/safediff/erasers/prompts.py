"""Which text-embedding rows a closed-form eraser edits, and what each is mapped to.

For every word to erase, an *erase prompt* contains it and its *guide prompt* is the same prompt with each
occurrence of the word replaced by the guide text ("" removes it). Without ``expand`` the erase prompt is the word
alone and the guide prompt the guide alone (the reference code's setting); with ``expand`` the word is also placed
in the concept's ``contexts`` (the 2025 UCE code's ``--expand_prompts``): the phrasings the concept's preset says its
words appear in (for the sandbox's values, the world's plain templates with every value of the other attribute), or,
for a concept without contexts, the 2025 code's object templates.

Rows. The word is found in the prompt's token ids (a whole-word match of its tokens, inside the attention mask, at
every position it occurs; never by counting whitespace words). Then, following the references:

- ``tokens="to_end"`` (UCE 2023 ``train_erase.py``): the word's last token and every token after it (the following
  words, EoT, padding: through causal attention they all carry the word);
- ``tokens="last"`` (UCE 2025 ``uce_sd_erase.py``): the word's last token only.

Erase row ``i`` is paired with guide row ``i - k·(len(word) - len(guide))``, ``k`` the number of occurrences that
end at or before ``i``: the word's last token meets the guide's last token (the token before the word when the guide
is empty; for the word alone and guide "" that is BOS, exactly as both reference scripts pair them), and the
tokens after it meet the same tokens of the guide prompt. Padding rows (after EoT) are paired the same way with
``padding="shifted"`` (the 2023 code) or with the guide's padding row at the *same position* with
``padding="same_position"`` (default): padding carries position, and one linear map cannot move every erase prompt's
padding by a position while keeping the preserved prompts' padding where it is. On the sandbox the relative residual
``‖W_new c − W_old g‖/‖W_old c − W_old g‖`` over the erase rows is 0.22 (same position) vs 0.29 (shifted) for "red"
and 0.20 vs 0.46 for "triangle", with the preserved rows' drift equal or smaller (benchmarks/results/
erasers_sandbox.md has the image-level rates).
Preserved prompts contribute all their rows (the reference's convention), and the empty prompt is always preserved.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from safediff.concepts import Concept, fill_context, resolve
from safediff.errors import SafediffError

TOKEN_CONVENTIONS = ("to_end", "last")
PADDING_ALIGNMENTS = ("same_position", "shifted")
# UCE 2025 `--expand_prompts`, concept_type object (art uses "painting by {}", "art by {}", ...).
GENERIC_TEMPLATES = ("image of {}", "photo of {}", "portrait of {}", "picture of {}", "painting of {}")
INFO_EXAMPLES = 12  # prompts recorded in an edit's metadata (the rest follow from its hyper-parameters)


@dataclass
class Rows:
    """Text-embedding rows in float64: ``erase[i]`` is to be mapped where ``guide[i]`` goes; ``preserve`` kept."""

    erase: torch.Tensor  # [N, D]
    guide: torch.Tensor  # [N, D]
    preserve: torch.Tensor  # [M, D]
    info: dict


def words_of(concept: Concept, also: tuple[str, ...] = ()) -> list[str]:
    return list(dict.fromkeys([*concept.keywords, *also]))


def contexts(concept: Concept, word: str, expand: bool) -> list[str]:
    """Prompts that contain ``word`` (one of ``concept``'s words): the word alone, and with ``expand`` the concept's
    contexts (or the generic templates) filled with it."""
    out = [word]
    if expand:
        out += [fill_context(t, word) for t in (concept.contexts or GENERIC_TEMPLATES)]
    return list(dict.fromkeys(out))


def _whole_word(word: str) -> re.Pattern:
    return re.compile(r"(?<!\w)" + re.escape(word) + r"(?!\w)", flags=re.IGNORECASE)  # CLIP lowercases


def replace_word(prompt: str, word: str, guide: str) -> str:
    """Every whole-word occurrence of ``word`` -> ``guide`` (whitespace normalised)."""
    return " ".join(_whole_word(word).sub(lambda _: guide, prompt).split())


def contains_word(prompt: str, word: str) -> bool:
    return _whole_word(word).search(prompt) is not None


class WordFinder:
    """Finds a word's tokens in tokenized prompts, at word boundaries, inside the attention mask."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.special = set(tokenizer.all_special_ids)

    def ids(self, text: str) -> list[int]:
        """The text's token ids without special tokens; SafediffError if none are left."""
        ids = [i for i in self.tok(text, add_special_tokens=False).input_ids if i not in self.special]
        if not ids:
            raise SafediffError(f"the concept word {text!r} encodes to no tokens with this model's tokenizer "
                                "(only whitespace or special tokens); give words the tokenizer can read")
        return ids

    def _starts_word(self, ids: list[int], i: int) -> bool:
        if i == 0 or ids[i - 1] in self.special:
            return True
        return self.tok.convert_ids_to_tokens(ids[i - 1]).endswith("</w>")

    def occurrences(self, ids: list[int], length: int, word: list[int]) -> list[int]:
        """Start positions of ``word`` in ``ids[:length]`` (the unmasked part)."""
        n = len(word)
        return [i for i in range(0, length - n + 1) if ids[i:i + n] == word and self._starts_word(ids, i)]


def aligned_rows(finder: WordFinder, prompt: str, guide_prompt: str, word_ids: list[int], guide_len: int,
                 tokens: str, max_length: int, padding: str = "same_position") -> list[tuple[int, int]]:
    """(erase row, guide row) pairs for one prompt; empty when the word is not among its (unmasked) tokens or the
    guide prompt does not line up with it token for token."""
    enc = finder.tok(prompt, padding="max_length", max_length=max_length, truncation=True)
    ids, length = enc.input_ids, sum(enc.attention_mask)
    starts = finder.occurrences(ids, length, word_ids)
    guide_length = len(finder.tok(guide_prompt).input_ids)
    if not starts or guide_length != len(finder.tok(prompt).input_ids) - len(starts) * (len(word_ids) - guide_len):
        return []
    ends = [s + len(word_ids) - 1 for s in starts]
    shift = len(word_ids) - guide_len
    rows = ends if tokens == "last" else range(ends[0], max_length)
    pairs = []
    for i in rows:
        j = i - sum(1 for e in ends if e <= i) * shift
        if padding == "same_position" and i >= length:
            j = i
        if 0 <= j < max_length:
            pairs.append((i, j))
    return pairs


def _encode(model, prompts: list[str], batch: int = 64) -> torch.Tensor:
    out = [model.adapter.encode(prompts[s:s + batch]).embeds.double().cpu() for s in range(0, len(prompts), batch)]
    return torch.cat(out) if out else torch.zeros(0, model.adapter.max_length, model.adapter.text_dim,
                                                   dtype=torch.float64)


def as_concept(item: str) -> Concept:
    """A preserve item as a concept: the preset of that name, else free text."""
    found = resolve(item)
    return found[0] if len(found) == 1 and found[0].name == item else Concept(item, (item,), category="custom")


def preserve_prompts(items: list[str], erase_words: list[str], expand: bool) -> list[str]:
    """The empty prompt, then each preserve item in its contexts, without prompts that contain an erased word."""
    out = [""]
    for item in items:
        for p in contexts(as_concept(item), item, expand):
            if not any(contains_word(p, w) for w in erase_words):
                out.append(p)
    return list(dict.fromkeys(out))


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


@torch.no_grad()
def build_rows(model, concepts: list[Concept], guide: str | None, preserve: list[str] | None, tokens: str,
               expand: bool, also_erase: tuple[str, ...] = (), padding: str = "same_position") -> Rows:
    """Erase/guide rows of every keyword of every concept, and the preserve rows."""
    if tokens not in TOKEN_CONVENTIONS:
        raise SafediffError(f"unknown token convention '{tokens}'; accepted: {', '.join(TOKEN_CONVENTIONS)}")
    if padding not in PADDING_ALIGNMENTS:
        raise SafediffError(f"unknown padding alignment '{padding}'; accepted: {', '.join(PADDING_ALIGNMENTS)}")
    finder = WordFinder(model.adapter.tokenizers[0])
    max_length = model.adapter.max_length
    pairs_prompts, index = [], []  # (erase prompt, guide prompt), and per pair its (erase row, guide row) list
    erase_words = []
    for concept in concepts:
        g = concept.guide if guide is None else guide
        guide_len = len(finder.tok(g, add_special_tokens=False).input_ids) if g.strip() else 0
        for word in words_of(concept, also_erase):
            word_ids = finder.ids(word)
            erase_words.append(word)
            found = 0
            for prompt in contexts(concept, word, expand):
                guide_prompt = replace_word(prompt, word, g)
                rows = aligned_rows(finder, prompt, guide_prompt, word_ids, guide_len, tokens, max_length, padding)
                if rows:
                    pairs_prompts.append((prompt, guide_prompt))
                    index.append(rows)
                    found += 1
            if not found:
                raise SafediffError(f"the concept word {word!r} does not fit in the text encoder's "
                                    f"{max_length}-token window; give a shorter concept")
    erase_emb = _encode(model, [p for p, _ in pairs_prompts])
    guide_emb = _encode(model, [g for _, g in pairs_prompts])
    e_rows, g_rows = [], []
    for k, rows in enumerate(index):
        i, j = zip(*rows)
        e_rows.append(erase_emb[k, list(i)])
        g_rows.append(guide_emb[k, list(j)])
    if preserve is None:
        items = list(dict.fromkeys(p for c in concepts for p in c.preserve))
    else:
        items = [p.strip() for p in preserve if p.strip()]
    kept = preserve_prompts(items, erase_words, expand)
    preserve_emb = _encode(model, kept).reshape(-1, model.adapter.text_dim)
    info = {"token_convention": tokens, "padding": padding, "expand_prompts": expand, "erase_words": erase_words,
            "prompts": {"erase": len(pairs_prompts), "preserve": len(kept)},
            "rows": {"erase": sum(len(r) for r in index), "preserve": len(kept) * max_length},
            "examples": {"erase": pairs_prompts[:INFO_EXAMPLES], "preserve": kept[:INFO_EXAMPLES]}}
    return Rows(torch.cat(e_rows), torch.cat(g_rows), preserve_emb, info)
