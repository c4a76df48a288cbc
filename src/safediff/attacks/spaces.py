"""Search spaces of attack recipes: which token ids a slot may hold, and a prompt's tokens with adversarial slots.

- ``vocabulary(tokenizer, mode)``: the token ids a slot may hold (``all`` non-special tokens, or ``words``: whole-word
  tokens whose decoded text re-encodes to exactly that token, so an adversarial prompt survives being typed).
- ``TokenSlots``: a prompt's token sequence with k adversarial *slots* (``prefix``, ``suffix``, ``every`` k prompt
  tokens, or ``free`` = the slots alone) in the search vocabulary (``token_sequences``); slot contents are token
  embeddings, so they can be relaxed or soft.
"""

from __future__ import annotations

import torch

from safediff.adapters import Conditioning
from safediff.attacks.token_sequences import search_tokenizer, sequence_ids
from safediff.errors import SafediffError
from safediff.identity import ByIdentity
from safediff.models import Model
from safediff.tokens import is_whole_word_piece, marks_word_start, word_ends

LAYOUTS = ("prefix", "suffix", "every", "free")

_VOCAB_CACHE: dict[str, ByIdentity[torch.Tensor]] = {"all": ByIdentity(), "words": ByIdentity()}


def vocabulary(tokenizer, mode: str = "words") -> torch.Tensor:
    """Sorted token ids a slot may hold. ``all``: every non-special token. ``words``: whole-word tokens (CLIP's
    ``</w>`` suffix, SentencePiece's ``▁`` prefix) whose decoded text tokenizes back to exactly that one token."""
    if mode not in ("all", "words"):
        raise SafediffError(f"unknown vocabulary '{mode}'; accepted: all, words")
    cache = _VOCAB_CACHE[mode]
    if tokenizer not in cache:
        special = set(tokenizer.all_special_ids)
        ids = [i for i in range(len(tokenizer)) if i not in special]
        if mode == "words":
            tokens = tokenizer.convert_ids_to_tokens(ids)
            starts = marks_word_start(tokenizer)
            ids = [i for i, tk in zip(ids, tokens) if is_whole_word_piece(tokenizer, tk, starts)]
            texts = [tokenizer.decode([i]).strip() for i in ids]
            enc = tokenizer(texts, add_special_tokens=False).input_ids
            ids = [i for i, t, e in zip(ids, texts, enc) if t and e == [i]]
        if not ids:
            raise SafediffError(f"the tokenizer has no '{mode}' tokens to search over")
        cache[tokenizer] = torch.tensor(ids, dtype=torch.long)
    return cache[tokenizer]


class TokenSlots:
    """The token sequence of ``prompt`` with ``k`` adversarial slots, in the search vocabulary.

    ``prefix``: [BOS], k slots, prompt, EOS (UnlearnDiffAtk's ``prefix_k``); ``suffix``: after the prompt; ``every``:
    P4D-K's layout, a slot before every group of ``every`` prompt tokens and one before the remainder (n tokens ->
    ⌊n/every⌋ + 1 slots: ``L p p p L p p p L p``), each cut moved to the end of its word so no slot splits a word
    (k is then set by the prompt's length); ``free``: the k slots alone, the prompt dropped (P4D-N). Slot tokens are
    drawn from the vocabulary of the adapter's search segment (``token_sequences``): CLIP's on SD 1.x/2.x and SDXL
    (both CLIPs share it), T5's on SD3/FLUX, whose CLIP encoders then read the decoded text of the filled sequence.
    Too long sequences keep the slots and drop prompt tokens from the end.
    """

    def __init__(self, model: Model, prompt: str, k: int, layout: str = "prefix", every: int = 3):
        if layout not in LAYOUTS:
            raise SafediffError(f"unknown slot layout '{layout}'; accepted: {', '.join(LAYOUTS)}")
        self.adapter = model.adapter
        self.search = self.adapter.search_segment.encoders
        self.tokenizer = search_tokenizer(self.adapter)
        tok = self.tokenizer
        self.bos = self.adapter.bos_offset(self.search[0])
        words = [] if layout == "free" else tok(prompt, add_special_tokens=False).input_ids
        length = self.adapter.window(self.search[0])
        frame = self.bos + 1  # BOS (if any) and EOS
        if layout == "every":
            if every <= 0:
                raise SafediffError(f"every must be a positive number of tokens, got {every}")
            groups = self._groups(tok, words, every)
            while sum(len(g) + 1 for g in groups) + frame > length:
                groups = self._groups(tok, sum(groups, [])[:-1], every)
            k = len(groups)
        elif k <= 0:
            raise SafediffError(f"the number of adversarial tokens must be positive, got {k}")
        else:
            words = words[:max(0, length - frame - k)]
        if k + frame > length:
            raise SafediffError(f"{k} adversarial tokens do not fit the {length}-token window")
        body: list[int | None] = []  # None marks a slot
        if layout == "prefix":
            body = [None] * k + words
        elif layout == "suffix":
            body = words + [None] * k
        elif layout == "free":
            body = [None] * k
        else:  # P4D-K: a slot before every full group and one before the remainder: L ppp L ppp L p
            for g in groups:
                body += [None] + g
        self.k = k
        self.layout = layout
        self.body = body
        self.slots = torch.tensor([i + self.bos for i, x in enumerate(body) if x is None], dtype=torch.long)

    @staticmethod
    def _groups(tok, words: list[int], every: int) -> list[list[int]]:
        """The prompt's tokens in groups of ``every``, each cut moved to the end of the word it falls in so no slot
        splits a word; the last group holds the remainder (maybe [])."""
        ends = word_ends(tok, words)
        groups, current = [], []
        for w, end in zip(words, ends):
            current.append(w)
            if len(current) >= every and end:
                groups.append(current)
                current = []
        groups.append(current)
        return groups

    def _filled(self, slot_ids: list[int]) -> torch.Tensor:
        """[1, n] search-vocabulary ids of the body with the slots filled."""
        it = iter(slot_ids)
        return torch.tensor([[next(it) if x is None else x for x in self.body]], dtype=torch.long)

    def token_ids(self, slot_ids: torch.Tensor | list[int]) -> list[int]:
        """The search vocabulary's ids between BOS and EOS with the slots filled."""
        return self._filled([int(x) for x in slot_ids])[0].tolist()

    def text(self, slot_ids: torch.Tensor | list[int]) -> str:
        return self.tokenizer.decode(self.token_ids(slot_ids)).strip()

    def encode(self, slot_embeds: list[torch.Tensor], slot_ids: torch.Tensor | list[int]) -> Conditioning:
        """Conditioning with search encoder j's slot embeddings ``slot_embeds[j]`` [k, D_j] (differentiable; the
        slots' ``slot_ids`` only mark positions there), and the other encoders reading the text of ``slot_ids``."""
        ids = sequence_ids(self.adapter, self._filled([int(x) for x in slot_ids]))
        full = []
        for j, ids_j in enumerate(ids):
            table = self.adapter.token_embedding(j)
            base = table(ids_j.to(table.weight.device)).detach()
            if j in self.search:
                mask = torch.zeros(base.shape[1], dtype=torch.bool, device=base.device)
                mask[self.slots] = True
                e = slot_embeds[self.search.index(j)]
                placed = torch.zeros_like(base).index_copy(1, self.slots.to(base.device), e.unsqueeze(0).to(base.dtype))
                base = torch.where(mask.view(1, -1, 1), placed, base)
            full.append(base)
        return self.adapter.encode_token_embeddings(ids, full)

    def embeddings_of(self, slot_ids: torch.Tensor) -> list[torch.Tensor]:
        """Each search encoder's embedding rows of the given slot ids ([k, D_j])."""
        return [self.adapter.token_embedding(j).weight[slot_ids] for j in self.search]
