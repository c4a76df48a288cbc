"""Attacks on SD3 / FLUX: token searches run over T5's vocabulary and every other encoder reads the decoded text, so
what is optimised is what a typed prompt gives; gradients reach the searched tokens through T5; MMA's sentence
embedding is T5's ``</s>`` row there; concept inversion learns one vector per encoder; objectives use the velocity."""

import pytest
import torch
import torch.nn.functional as F

from safediff.attacks.concept_inversion import ConceptInversion, placeholder_conditioning
from safediff.attacks.mma import pooled_reads_search
from safediff.attacks.spaces import TokenSlots, vocabulary
from safediff.attacks.token_sequences import encode_tokens, search_tokenizer


@pytest.mark.parametrize("fixture", ["tiny_sd3", "tiny_flux"])
def test_searched_ids_encode_as_their_typed_text(request, fixture):
    a = request.getfixturevalue(fixture).adapter
    tok = search_tokenizer(a)
    assert tok is a.tokenizers[a.t5_index]
    words = vocabulary(tok, "words")
    ids = words[torch.tensor([[5, 17, 3], [40, 2, 9]])]
    texts = [tok.decode(row.tolist()).strip() for row in ids]
    with torch.no_grad():
        got, want = encode_tokens(a, ids), a.encode(texts)
    assert torch.equal(got.embeds, want.embeds) and torch.equal(got.pooled, want.pooled)


def test_gradients_reach_the_searched_tokens_through_t5_only(tiny_flux):
    a = tiny_flux.adapter
    ids = vocabulary(search_tokenizer(a), "words")[:4][None]
    soft = F.one_hot(ids, len(search_tokenizer(a))).float().requires_grad_(True)
    cond = encode_tokens(a, ids, soft=soft)
    (grad_seq,) = torch.autograd.grad(cond.embeds.sum(), [soft], retain_graph=True)
    assert grad_seq.abs().sum() > 0
    # CLIP's pooled vector reads the decoded text: no path from the searched tokens
    assert torch.autograd.grad(cond.pooled.sum(), [soft], allow_unused=True) == (None,)
    assert not pooled_reads_search(a)


def test_token_slots_without_bos(tiny_flux):
    slots = TokenSlots(tiny_flux, "a red circle", 2, "prefix")
    fill = vocabulary(slots.tokenizer, "words")[:2]
    assert slots.slots.tolist() == [0, 1]  # T5 has no BOS: the first slot is the first token
    with torch.no_grad():
        cond = slots.encode(slots.embeddings_of(fill), fill)
        assert torch.equal(cond.embeds, tiny_flux.adapter.encode([slots.text(fill)]).embeds)
    every = TokenSlots(tiny_flux, "a photo of a blue square", 0, "every", every=2)
    tokens = slots.tokenizer.convert_ids_to_tokens(every.token_ids(fill.repeat(every.k)[:every.k]))
    after = [tokens[p + 1] for p in every.slots.tolist() if p + 1 < len(tokens)]
    assert all(t.startswith("\u2581") for t in after)  # every slot sits at a word boundary


def test_sdxl_pooled_vector_reads_the_search(tiny_sdxl, tiny_sd3):
    assert pooled_reads_search(tiny_sdxl.adapter) and not pooled_reads_search(tiny_sd3.adapter)


def test_concept_inversion_learns_a_vector_per_encoder(tiny_sd3, tiny_flux):
    for model, keys in ((tiny_sd3, {"clip_l", "clip_g", "t5"}), (tiny_flux, {"clip_l", "t5"})):
        a = model.adapter
        dims = [a.token_embedding(k).weight.shape[1] for k in range(len(a.text_encoders))]
        tensors = ConceptInversion().embedding_tensors(torch.cat([torch.randn(d) for d in dims]), a)
        assert set(tensors) == keys
        slots = [tok("x", add_special_tokens=False).input_ids[0] for tok in a.tokenizers]
        vectors = [a.token_embedding(k).weight[s] for k, s in enumerate(slots)]
        with torch.no_grad():
            got = placeholder_conditioning(a, ["a {} circle"], slots, vectors)
            want = a.encode(["a x circle"])  # each encoder reads its own tokens, "x" one token in both
        assert torch.equal(got.embeds, want.embeds) and torch.equal(got.pooled, want.pooled)


def test_flow_objectives_are_the_velocity_on_the_straight_path(tiny_flux):
    x0, eps = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    t = torch.tensor([250, 750])
    x_t = tiny_flux.adapter.noised(x0, eps, t)
    assert torch.allclose(x_t[0], 0.75 * x0[0] + 0.25 * eps[0]) and torch.allclose(x_t[1], 0.25 * x0[1] + 0.75 * eps[1])
    assert torch.equal(tiny_flux.adapter.training_target(x0, eps, t), eps - x0)
