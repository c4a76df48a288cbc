"""Properties of the sampler: per-image determinism, one UNet call per step, bad settings rejected."""

import logging

import pytest
import torch

from float_bounds import BATCH_PIXELS, assert_close
from safediff.errors import SafediffError
from safediff.sampling import generate


def test_image_depends_only_on_its_prompt_and_seed(tiny_sd):
    alone = generate(tiny_sd, ["a green triangle"], [7], progress=False).pixels
    batch = generate(tiny_sd, ["a red circle", "a green triangle", "x"], [1, 7, 9], progress=False).pixels
    chunked = generate(tiny_sd, ["a red circle", "a green triangle", "x"], [1, 7, 9], batch_size=2,
                       progress=False).pixels
    assert_close(alone[0], batch[1], BATCH_PIXELS)
    assert_close(batch, chunked, BATCH_PIXELS)
    other_seed = generate(tiny_sd, ["a green triangle"], [8], progress=False).pixels
    assert (alone - other_seed).abs().max() > 1e-1  # measured 0.96


def test_one_unet_call_per_step(tiny_sd, monkeypatch):
    calls = []
    forward = tiny_sd.denoiser.forward

    def counting(sample, *a, **k):
        calls.append(sample.shape[0])
        return forward(sample, *a, **k)

    monkeypatch.setattr(tiny_sd.denoiser, "forward", counting)
    out = generate(tiny_sd, ["a", "b", "c"], [0, 1, 2], steps=3, progress=False)
    assert calls == [6, 6, 6]
    assert out.unet_batch_per_step == [2, 2, 2]


def test_empty_prompt_is_unconditional(tiny_sd):
    empty = generate(tiny_sd, [""], [5], guidance=7.0, progress=False).pixels
    no_cfg = generate(tiny_sd, [""], [5], guidance=1.0, progress=False).pixels
    assert_close(empty, no_cfg, BATCH_PIXELS)  # ∅ + g(∅ − ∅) = ∅; 2 branches vs 1


def test_long_prompt_truncated_with_one_warning(tiny_sd, caplog):
    long = " ".join(["word"] * 30)  # 150 byte tokens > 77
    with caplog.at_level(logging.WARNING, logger="safediff"):
        generate(tiny_sd, [long], [0], steps=1, progress=False)
    msgs = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(msgs) == 1
    n_tokens = len(tiny_sd.pipe.tokenizer(long).input_ids)
    assert f"{n_tokens - 77} token(s) dropped" in msgs[0]


@pytest.mark.parametrize("kw", [dict(steps=0), dict(guidance=-1.0), dict(height=30), dict(width=0)])
def test_bad_settings_raise(tiny_sd, kw):
    with pytest.raises(SafediffError):
        generate(tiny_sd, ["a"], [0], progress=False, **kw)


def test_prompt_seed_count_mismatch(tiny_sd):
    with pytest.raises(SafediffError, match="seeds"):
        generate(tiny_sd, ["a", "b"], [0], progress=False)


def test_encode_ids_routes_each_tokenizers_ids_to_its_own_encoder(tiny_sdxl):
    a = tiny_sdxl.adapter
    ids = [a.tokenize(["a red circle"], k) for k in range(len(a.tokenizers))]
    other = [a.tokenize(["a blue square"], k) for k in range(len(a.tokenizers))]
    same = a.encode_ids(ids)
    assert torch.equal(same.embeds, a.encode(["a red circle"]).embeds)
    mixed = a.encode_ids([ids[0], other[1]])  # encoder 1 reads the red prompt, encoder 2 the blue one
    blue = a.encode(["a blue square"])
    d1 = a.text_encoders[0].config.hidden_size
    assert torch.equal(mixed.embeds[..., :d1], same.embeds[..., :d1])
    assert torch.equal(mixed.embeds[..., d1:], blue.embeds[..., d1:]) and torch.equal(mixed.pooled, blue.pooled)
    assert not torch.equal(mixed.pooled, same.pooled)
