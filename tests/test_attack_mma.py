"""MMA-Diffusion (text): banned sub-words never emitted, GCG improves the loss, budgets, determinism, no UNet."""

import pytest
import torch
from transformers import CLIPTokenizer

from attack_recipe_helpers import ROW, never_flags, red_target
from safediff.attacks import gcg
from safediff.attacks.budget import Budget
from safediff.attacks.mma import MMADiffusion
from safediff.errors import SafediffError


def _word_tokenizer():
    words = ["na", "ak", "ke", "naked</w>", "cat</w>", "snake</w>", "a</w>", "k</w>"]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    return CLIPTokenizer(vocab=vocab, merges=[], pad_token="<|endoftext|>")


def test_banned_tokens_follow_mma_rule():
    tok = _word_tokenizer()
    ids = torch.arange(2, len(tok))
    banned = dict(zip([tok.decode([int(i)]).strip() for i in ids], gcg.banned_tokens(tok, ids, ["naked"]).tolist()))
    # pieces of >= 2 characters and tokens containing the word are banned; 1-character pieces and others are not
    assert banned == {"na": True, "ak": True, "ke": True, "naked": True, "cat": False, "snake": False, "a": False,
                      "k": False}


def test_candidates_are_single_token_changes_from_the_proposals():
    gen = torch.Generator().manual_seed(0)
    current = torch.tensor([5, 5, 5, 5])
    proposals = torch.tensor([[1, 2], [3, 4], [6, 7], [8, 9]])
    cands = gcg.sample_candidates(current, proposals, 8, gen)
    for b, c in enumerate(cands):
        pos = b * 4 // 8
        assert (c != current).sum() <= 1 and int(c[pos]) in proposals[pos].tolist()


def test_search_lowers_the_loss_and_never_emits_a_banned_word(tiny_sd):
    target = red_target(tiny_sd)
    # ban the concept's names (automatic) and, to make it bite on a byte-level vocabulary, the letters a and e
    r = MMADiffusion(batch=64, topk=32, n_tokens=8, banned="a;e").run(target, ROW, never_flags(),
                                                                      Budget(iterations=10), seed=0)
    loss = [h["objective"] for h in r.history]
    assert all(b <= a for a, b in zip(loss, loss[1:])) and r.extra["loss"] < r.extra["initial_loss"]
    text = r.adversarial_prompt.lower()
    assert not any(w in text for w in ("red", "crimson", "scarlet", "a", "e"))
    assert set(r.extra["banned_words"]) == {"red", "crimson", "scarlet", "a", "e"}
    tok = tiny_sd.adapter.tokenizers[0]
    assert tok(r.adversarial_prompt, add_special_tokens=False).input_ids == r.token_ids  # the text is the ids
    assert r.compute["unet_forward"] == target.steps and r.compute["unet_backward"] == 0  # only the judging


@pytest.mark.parametrize("limit", [{"iterations": 4}, {"text_encoder": 9}])
def test_budget_is_respected_exactly(tiny_sd, limit):
    r = MMADiffusion(batch=32, topk=16, n_tokens=6, encode_batch=16).run(red_target(tiny_sd), ROW, never_flags(),
                                                                         Budget(**limit), seed=0)
    key, value = next(iter(limit.items()))
    if key == "iterations":
        assert r.compute["iterations"] == value
    else:  # setup 2, each step 1 gradient + 2 candidate chunks, evaluation 2
        assert value - 3 < r.compute["text_encoder"] <= value
    assert r.image is not None


def test_same_seed_same_prompt(tiny_sd):
    attack = MMADiffusion(batch=32, topk=16, n_tokens=6)
    runs = [attack.run(red_target(tiny_sd), ROW, never_flags(), Budget(iterations=3), seed=s) for s in (2, 2)]
    assert runs[0].adversarial_prompt == runs[1].adversarial_prompt


def test_hidden_state_embedding_and_sdxl(tiny_sdxl):
    r = MMADiffusion(batch=16, topk=8, n_tokens=4, embedding="hidden").run(red_target(tiny_sdxl), ROW, never_flags(),
                                                                           Budget(iterations=2), seed=0)
    assert r.extra["loss"] <= r.extra["initial_loss"] and "red" not in r.adversarial_prompt


def test_bad_hyper_parameters_are_user_errors():
    with pytest.raises(SafediffError):
        MMADiffusion(embedding="mean")
    with pytest.raises(SafediffError):
        MMADiffusion(topk=0)
