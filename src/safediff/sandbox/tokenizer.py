"""The sandbox tokenizer: a real ``transformers.CLIPTokenizer`` (vocab.json + merges.txt) built by the project.

Every world word and a few hundred common English words are ONE token each: the merges are learned by plain
byte-pair encoding (Sennrich et al. 2016) on that word list, run until every word is a single symbol, in CLIP's
format (byte-level alphabet, ``</w>`` end-of-word suffix). CLIP's pre-tokenizer splits a hyphenated phrase such as
"sky-coloured" into sky, -, coloured: three tokens, the hyphen being a single byte. Any other text falls back to
byte-level pieces, so no input is ever unknown. BOS ``<|startoftext|>``, EOS = pad = ``<|endoftext|>``,
``model_max_length`` 77.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from safediff.sandbox.world import vocabulary

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77

# Common words for free-text concepts, guides and attacks (one token each).
COMMON_WORDS = """
a an the of in on at to for with without and or not no is are was be this that it its as by from into over under
photo photograph picture image drawing painting sketch illustration render art artwork portrait style realistic
background white black grey gray colour color colours colors colored coloured bright dark light shape shapes object
objects thing something nothing one two three many some big small large tiny little round sharp corner corners edge
person people man woman men women boy girl child children kid baby face body hand hands head hair eye eyes skin
naked nude nudity sexual sex erotic porn explicit topless breasts clothes clothing clothed dressed wearing shirt dress
violence violent blood bloody gore weapon weapons gun knife fight war death dead kill murder hate harassment shocking
illegal drug drugs theft harm suicide self cruelty brutality suffering humiliation vandalism abuse gesture gestures
safe unsafe bad good beautiful ugly happy sad angry cute scary horror evil nice
cat dog bird horse car tree house flower flowers sky sun moon water sea mountain city street road forest garden
red green blue yellow orange purple pink brown violet cyan magenta teal gold silver
circle square triangle rectangle star heart ball box disc ring cube sphere pyramid diamond oval line dot
very more most less same other another only just also all any each every new old
style van gogh monet picasso anime cartoon cinematic photorealistic detailed highly quality masterpiece hd
draw paint show make made look looks looking like near far left right top bottom middle center centre
""".split()


def word_list() -> list[str]:
    """The words that must be single tokens, in a fixed order."""
    return sorted(set(vocabulary()) | set(COMMON_WORDS))


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE on ``words`` (each counted once) until every word is one symbol; ties broken lexicographically."""
    b2u = bytes_to_unicode()
    seqs = []
    for w in words:
        chars = [b2u[b] for b in w.encode("utf-8")]
        chars[-1] += "</w>"
        seqs.append(chars)
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter = Counter()
        for s in seqs:
            pairs.update(zip(s, s[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        for k, s in enumerate(seqs):
            if len(s) < 2:
                continue
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[k] = out


def write_tokenizer_files(folder: str | Path) -> Path:
    """Write vocab.json, merges.txt and the tokenizer config into ``folder``; return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = learn_merges(word_list())
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"),
                        model_max_length=MAX_LENGTH)
    tok.save_pretrained(str(folder))
    return folder


def load_tokenizer(folder: str | Path):
    """Load a tokenizer folder written by :func:`write_tokenizer_files`, checking it is the full vocabulary."""
    from transformers import CLIPTokenizer

    from safediff.errors import SafediffError

    folder = Path(folder)
    if not ((folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file()):
        raise SafediffError(f"no tokenizer at {folder} (vocab.json and tokenizer.json missing)")
    tok = CLIPTokenizer.from_pretrained(str(folder))
    if len(tok) < 512:
        raise SafediffError(f"tokenizer at {folder} has only {len(tok)} tokens; expected the sandbox vocabulary")
    return tok
