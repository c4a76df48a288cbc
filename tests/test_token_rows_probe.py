"""benchmarks/token_rows_probe.py: each condition swaps exactly the rows it names (on the shipped sandboxes' encoders:
CLIP's causal sequence, FLUX's bidirectional T5 sequence and pooled CLIP; no sampling), and the probe refuses words
that are not one token."""


import pytest
import torch

from safediff.sandbox import FLUX_WEIGHTS_DIR, WEIGHTS_DIR
from bench_helpers import load_benchmark

pytestmark = pytest.mark.skipif(not (WEIGHTS_DIR / "SHA256SUMS").is_file(), reason="sandbox weights absent")


def script():
    return load_benchmark("token_rows_probe")


@pytest.fixture(scope="module")
def sandbox():
    from safediff.models import load_pipeline

    return load_pipeline("sandbox")


def test_each_condition_swaps_the_rows_it_names(sandbox):
    mod = script()
    prompts = ["a red circle", "a striped red square on white"]
    own = sandbox.adapter.encode(prompts).embeds
    other = sandbox.adapter.encode([mod.swapped(p, "red", "blue") for p in prompts]).embeds
    positions = mod.word_positions(sandbox, prompts, "red")
    assert positions == [2, 3]  # BOS, a, red / BOS, a, striped, red
    assert torch.equal(own[:, :2], other[:, :2])  # causal: rows before the word do not read it
    swapped = {c: mod.conditioning(sandbox, prompts, "red", "blue", c).embeds for c in mod.CONDITIONS}
    assert torch.equal(swapped["none"], own)
    for i, pos in enumerate(positions):
        word = swapped["word"][i]
        assert torch.equal(word[pos], other[i, pos]) and torch.equal(word[pos + 1:], own[i, pos + 1:])
        after = swapped["after"][i]
        assert torch.equal(after[:pos + 1], own[i, :pos + 1]) and torch.equal(after[pos + 1:], other[i, pos + 1:])
        assert torch.equal(swapped["word+after"][i, pos:], other[i, pos:])


def test_the_unet_sandbox_has_no_pooled_condition(sandbox):
    assert script().conditions(sandbox) == [c for c in script().CONDITIONS if c != "pooled"]


def test_a_word_of_several_tokens_is_refused(sandbox):
    with pytest.raises(SystemExit, match="one-token word"):
        script().word_positions(sandbox, ["a reddish circle"], "reddish")


@pytest.mark.skipif(not (FLUX_WEIGHTS_DIR / "SHA256SUMS").is_file(), reason="sandbox-flux weights absent")
def test_on_flux_the_rows_are_t5_and_the_pooled_vector_is_swapped_alone():
    from safediff.models import load_pipeline

    flux, mod = load_pipeline("sandbox-flux"), script()
    prompts = ["a red circle", "a striped red square on white"]
    own = flux.adapter.encode(prompts)
    other = flux.adapter.encode([mod.swapped(p, "red", "blue") for p in prompts])
    positions = mod.word_positions(flux, prompts, "red")
    assert positions == [1, 2]  # T5 has no BOS: a, red / a, striped, red
    assert not torch.equal(own.embeds[:, 0], other.embeds[:, 0])  # bidirectional: rows before the word read it too
    assert mod.conditions(flux) == list(mod.CONDITIONS)
    swapped = {c: mod.conditioning(flux, prompts, "red", "blue", c) for c in mod.CONDITIONS}
    assert torch.equal(swapped["all"].embeds, other.embeds) and torch.equal(swapped["all"].pooled, own.pooled)
    assert torch.equal(swapped["pooled"].embeds, own.embeds) and torch.equal(swapped["pooled"].pooled, other.pooled)
    for i, pos in enumerate(positions):
        word = swapped["word"][i].embeds
        assert torch.equal(word[:pos], own.embeds[i, :pos]) and torch.equal(word[pos], other.embeds[i, pos])
        assert torch.equal(swapped["word"][i].pooled, own.pooled[i])
