import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safediff.errors import SafediffError
from safediff.sandbox.tokenizer import (BOS, EOS, MAX_LENGTH, bytes_to_unicode, learn_merges, load_tokenizer,
                                        word_list, write_tokenizer_files)
from safediff.sandbox.world import vocabulary


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tokenizer_files(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(folder):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder))


def reference_bpe(word: str, merges: list[tuple[str, str]]) -> list[str]:
    """Textbook BPE encoding: repeatedly merge the adjacent pair with the lowest merge rank."""
    b2u = bytes_to_unicode()
    symbols = [b2u[b] for b in word.encode("utf-8")]
    symbols[-1] += "</w>"
    rank = {m: i for i, m in enumerate(merges)}
    while len(symbols) > 1:
        pairs = [(rank.get(p, 1 << 30), i) for i, p in enumerate(zip(symbols, symbols[1:]))]
        best, i = min(pairs)
        if best == 1 << 30:
            break
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def test_full_vocabulary_loads_offline_with_special_tokens(tok, folder):
    vocab = json.loads((folder / "vocab.json").read_text())
    assert len(tok) == len(vocab) > 512 + len(word_list())  # not the 2-token stub a missing repo gives
    assert tok.bos_token == BOS and tok.eos_token == EOS and tok.pad_token == EOS
    assert tok.bos_token_id == vocab[BOS] and tok.eos_token_id == vocab[EOS] == tok.pad_token_id
    assert tok.model_max_length == MAX_LENGTH


def test_every_world_and_common_word_is_one_token(tok):
    assert set(vocabulary()) <= set(word_list())
    for w in word_list():
        ids = tok(w, add_special_tokens=False).input_ids
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids) == [w + "</w>"], w


def test_implicit_phrases_are_one_token_per_word_and_hyphen(tok):
    from safediff.sandbox.world import IMPLICIT

    assert tok.tokenize("a tennis-ball-coloured star") == ["a</w>", "tennis</w>", "-</w>", "ball</w>", "-</w>",
                                                          "coloured</w>", "star</w>"]
    for phrase in (p for ps in IMPLICIT.values() for p in ps):
        assert len(tok.tokenize(phrase)) == len(phrase.replace("-", " - ").split()), phrase


def test_unknown_text_falls_back_to_bytes_and_round_trips(tok):
    text = "qzxv blorptastic ünïcode 42!"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert len(ids) > 2 + len(text.split())
    assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == text.replace(" ", "")


def test_matches_a_textbook_bpe_encoder(tok):
    merges = learn_merges(word_list())
    rng = np.random.default_rng(0)
    words = list(word_list()) + ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(1, 12)))
                                 for _ in range(300)]
    for w in words:
        assert tok.convert_ids_to_tokens(tok(w, add_special_tokens=False).input_ids) == reference_bpe(w, merges), w


def test_pads_to_77_with_eos(tok):
    ids = tok(["a red circle"], padding="max_length", max_length=MAX_LENGTH).input_ids[0]
    assert len(ids) == MAX_LENGTH and ids[:5] == [tok.bos_token_id, *ids[1:4], tok.eos_token_id]
    assert set(ids[5:]) == {tok.pad_token_id}


def test_learn_merges_is_deterministic_and_complete():
    words = ["red", "reed", "bed", "bead"]
    merges = learn_merges(words)
    assert merges == learn_merges(list(words))
    assert all(reference_bpe(w, merges) == [w + "</w>"] for w in words)


def test_load_rejects_missing_folder(tmp_path):
    with pytest.raises(SafediffError):
        load_tokenizer(tmp_path)
