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
- ``tokens="last"`` (UCE 2025 ``uce_sd_erase.py``): the word's last token only;
- ``tokens="surrounding"`` (MACE's closed-form refinement, ``cfr_utils.prepare_k_v``): every token *except* the
  word's own (the shared prefix and BOS, which meet themselves in the guide prompt, and everything after the word,
  which through causal attention absorbs it).

Erase row ``i`` is paired with guide row ``i - k·(len(word) - len(guide))``, ``k`` the number of occurrences that
end at or before ``i``: the word's last token meets the guide's last token (the token before the word when the guide
is empty; for the word alone and guide "" that is BOS, exactly as both reference scripts pair them), and the
tokens after it meet the same tokens of the guide prompt. Padding rows (after EoT) are paired the same way with
``padding="shifted"`` (the 2023 code) or with the guide's padding row at the *same position* with
``padding="same_position"`` (default): padding carries position, and one linear map cannot move every erase prompt's
padding by a position while keeping the preserved prompts' padding where it is. On the sandbox the relative residual
``‖W_new c − W_old g‖/‖W_old c − W_old g‖`` over the erase rows is 0.22 (same position) vs 0.29 (shifted) for "red"
and 0.20 vs 0.46 for "triangle", with the preserved rows' drift equal or smaller (measured on the v1 sandbox). On
the v2 sandbox the two give the same image-level rates (red 4 %, triangle 12 %: ``uce`` and ``uce:padding=shifted``
in ``benchmarks/results/erasers_sandbox_v2``).
Preserved prompts contribute all their rows (the reference's convention), and the empty prompt is always preserved.

Several encoders. Each *segment* of the conditioning (``adapter.segments``: SD3's CLIP tokens and T5 tokens) is
searched with its own tokenizer, so a word gives rows in every segment it appears in (SentencePiece tokenizers mark
a word's first token with ``▁`` where CLIP marks its last with ``</w>``; T5 has no BOS, so a word that opens the
prompt meets the guide prompt's first token). Models whose pooled vector is read by a layer of its own (SD3 and
FLUX: ``time_text_embed.text_embedder``) also get pooled rows: one per erase, guide and preserved prompt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from safediff.concepts import Concept, fill_context, resolve
from safediff.errors import SafediffError
from safediff.tokens import WORD_END, WORD_START, marks_word_start

TOKEN_CONVENTIONS = ("to_end", "last", "surrounding")
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
    pooled: "Rows | None" = None  # the same prompts' pooled vectors, where a layer reads them (SD3, FLUX)

    def space(self, name: str) -> "Rows":
        """The rows of one space a text reader reads: ``tokens`` (these) or ``pooled``."""
        return self if name == "tokens" else self.pooled


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
        self.marks_start = marks_word_start(tokenizer)  # SentencePiece (T5): "▁" opens a word

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
        if self.marks_start:
            return self.tok.convert_ids_to_tokens(ids[i]).startswith(WORD_START)
        return self.tok.convert_ids_to_tokens(ids[i - 1]).endswith(WORD_END)

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
    if tokens == "last":
        rows = ends
    elif tokens == "to_end":
        rows = range(ends[0], max_length)
    else:  # surrounding: everything but the word's tokens
        inside = {i for s in starts for i in range(s, s + len(word_ids))}
        rows = [i for i in range(max_length) if i not in inside]
    pairs = []
    for i in rows:
        j = i - sum(1 for e in ends if e <= i) * shift
        if padding == "same_position" and i >= length:
            j = i
        j = max(j, 0)  # no BOS (T5): a word that opens the prompt meets the guide's first token
        if j < max_length:
            pairs.append((i, j))
    return pairs


def encode_with_pooled(model, prompts: list[str], batch: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token rows [N, L, D] and pooled vectors [N, P] (None when the model has none) of the prompts, float64."""
    parts = [model.adapter.encode(prompts[s:s + batch]) for s in range(0, len(prompts), batch)]
    if not parts:
        return torch.zeros(0, model.adapter.max_length, model.adapter.text_dim, dtype=torch.float64), None
    embeds = torch.cat([c.embeds.double().cpu() for c in parts])
    pooled = None if parts[0].pooled is None else torch.cat([c.pooled.double().cpu() for c in parts])
    return embeds, pooled


def encode_prompts(model, prompts: list[str], batch: int = 64) -> torch.Tensor:
    """[N, L, D] float64 on the CPU: the token rows of every prompt (encoded ``batch`` at a time)."""
    return encode_with_pooled(model, prompts, batch)[0]


def word_positions(finder: WordFinder, prompt: str, word: str, max_length: int) -> list[int]:
    """Every token position of ``word`` in ``prompt``'s (padded) ids, at word boundaries inside the attention mask."""
    enc = finder.tok(prompt, padding="max_length", max_length=max_length, truncation=True)
    word_ids = finder.ids(word)
    starts = finder.occurrences(enc.input_ids, sum(enc.attention_mask), word_ids)
    return [i for s in starts for i in range(s, s + len(word_ids))]


def last_token_positions(adapter, prompts: list[str]) -> list[torch.Tensor]:
    """Per segment (``adapter.segments``), long [N]: each prompt's last token before the end-of-text token, as a
    position of ``Conditioning.embeds`` (the segment's BOS for the empty prompt; its EOS where it has no BOS, T5)."""
    return [(adapter.eos_positions(prompts, s) - 1).clamp(min=s.start) for s in adapter.segments]


@torch.no_grad()
def last_token_rows(model, prompts: list[str], to_end: bool = False) -> torch.Tensor:
    """[N·S, D] float64: each prompt's row at its last token before the end-of-text token (BOS for the empty prompt):
    SPEED's "last subject token", in each of the S segments (SD3: CLIP then T5), segment by segment. ``to_end``: that
    row and every later row of its segment (end-of-text and padding), UCE's ``to_end`` convention."""
    embeds = encode_prompts(model, prompts)
    segments, positions = model.adapter.segments, last_token_positions(model.adapter, prompts)
    if not to_end:
        return torch.cat([embeds[torch.arange(len(prompts)), p] for p in positions])
    return torch.cat([embeds[i, p:seg.start + seg.length] for seg, ps in zip(segments, positions)
                      for i, p in enumerate(ps.tolist())])


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


@dataclass
class RowPlan:
    """Which prompts give the rows, and where: ``pairs[k]`` = (erase prompt, guide prompt), ``positions[k]`` its
    (erase row, guide row) positions in ``Conditioning.embeds`` (every segment's), ``kept`` the preserved prompts."""

    pairs: list[tuple[str, str]]
    positions: list[list[tuple[int, int]]]
    kept: list[str]
    info: dict


def plan_rows(model, concepts: list[Concept], guide: str | None, preserve: list[str] | None, tokens: str,
              expand: bool, also_erase: tuple[str, ...] = (), padding: str = "same_position") -> RowPlan:
    """The erase/guide prompt pairs of every keyword of every concept, their aligned rows in each segment (each
    tokenizer finds the word in its own tokens), and the preserved prompts."""
    if tokens not in TOKEN_CONVENTIONS:
        raise SafediffError(f"unknown token convention '{tokens}'; accepted: {', '.join(TOKEN_CONVENTIONS)}")
    if padding not in PADDING_ALIGNMENTS:
        raise SafediffError(f"unknown padding alignment '{padding}'; accepted: {', '.join(PADDING_ALIGNMENTS)}")
    adapter = model.adapter
    segments = [(s, WordFinder(adapter.tokenizers[s.encoders[0]])) for s in adapter.segments]
    pairs_prompts, index = [], []  # (erase prompt, guide prompt), and per pair its (erase row, guide row) list
    erase_words = []
    for concept in concepts:
        g = concept.guide if guide is None else guide
        guide_lens = [len(f.tok(g, add_special_tokens=False).input_ids) if g.strip() else 0 for _, f in segments]
        for word in words_of(concept, also_erase):
            word_ids = [f.ids(word) for _, f in segments]
            erase_words.append(word)
            found = 0
            for prompt in contexts(concept, word, expand):
                guide_prompt = replace_word(prompt, word, g)
                rows = [(seg.start + i, seg.start + j)
                        for (seg, finder), ids, glen in zip(segments, word_ids, guide_lens)
                        for i, j in aligned_rows(finder, prompt, guide_prompt, ids, glen, tokens, seg.length, padding)]
                if rows:
                    pairs_prompts.append((prompt, guide_prompt))
                    index.append(rows)
                    found += 1
            if not found:
                raise SafediffError(f"the concept word {word!r} does not fit in the text encoder's "
                                    f"{adapter.max_length}-token window; give a shorter concept")
    if preserve is None:
        items = list(dict.fromkeys(p for c in concepts for p in c.preserve))
    else:
        items = [p.strip() for p in preserve if p.strip()]
    kept = preserve_prompts(items, erase_words, expand)
    length = sum(seg.length for seg, _ in segments)
    info = {"token_convention": tokens, "padding": padding, "expand_prompts": expand, "erase_words": erase_words,
            "prompts": {"erase": len(pairs_prompts), "preserve": len(kept)},
            "rows": {"erase": sum(len(r) for r in index), "preserve": len(kept) * length},
            "examples": {"erase": pairs_prompts[:INFO_EXAMPLES], "preserve": kept[:INFO_EXAMPLES]}}
    return RowPlan(pairs_prompts, index, kept, info)


@torch.no_grad()
def build_rows(model, concepts: list[Concept], guide: str | None, preserve: list[str] | None, tokens: str,
               expand: bool, also_erase: tuple[str, ...] = (), padding: str = "same_position") -> Rows:
    """Erase/guide rows of every keyword of every concept, and the preserve rows (every position of every preserved
    prompt); ``Rows.pooled``: the same prompts' pooled vectors, one per prompt, for models whose pooled vector is read
    by a layer of its own (SD3, FLUX)."""
    plan = plan_rows(model, concepts, guide, preserve, tokens, expand, also_erase, padding)
    erase_emb, erase_pooled = encode_with_pooled(model, [p for p, _ in plan.pairs])
    guide_emb, guide_pooled = encode_with_pooled(model, [g for _, g in plan.pairs])
    e_rows, g_rows = [], []
    for k, rows in enumerate(plan.positions):
        i, j = zip(*rows)
        e_rows.append(erase_emb[k, list(i)])
        g_rows.append(guide_emb[k, list(j)])
    preserve_emb, preserve_pooled = encode_with_pooled(model, plan.kept)
    pooled = None
    if "pooled" in model.adapter.text_readers():
        pooled = Rows(erase_pooled, guide_pooled, preserve_pooled, plan.info)
    return Rows(torch.cat(e_rows), torch.cat(g_rows), preserve_emb.reshape(-1, model.adapter.text_dim), plan.info,
                pooled)
