"""benchmarks/sandbox_binding.py: the noise interventions change only what they name, and the rates read a model
that binds colours to the prompt apart from one that takes them from the noise (synthetic detector output; no
sampling)."""

import torch

from bench_helpers import load_benchmark


def script():
    return load_benchmark("sandbox_binding")


def test_half_means_swap_exchanges_only_the_two_halves_channel_means():
    mod = script()
    x = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    y = mod.half_means_swapped(x)
    left, right = (slice(None, 8), slice(8, None))
    mean = lambda z, half: z[..., half].mean((-2, -1))  # noqa: E731
    torch.testing.assert_close(mean(y, left), mean(x, right))
    torch.testing.assert_close(mean(y, right), mean(x, left))
    for half in (left, right):  # the rest of each half is untouched
        torch.testing.assert_close(y[..., half] - mean(y, half)[..., None, None],
                                   x[..., half] - mean(x, half)[..., None, None])
    torch.testing.assert_close(mod.half_means_swapped(y), x)
    assert torch.equal(mod.mirrored(mod.mirrored(x)), x)


def _scene(left, right, shapes=("circle", "square")):
    return [{"side": "left", "colour": left, "shape": shapes[0]},
            {"side": "right", "colour": right, "shape": shapes[1]}]


def test_rates_tell_a_binding_model_from_one_that_reads_colours_from_the_noise():
    mod = script()
    pairs = [("red", "circle", "blue", "square")] * 4
    binds = mod.measure(pairs, [_scene("red", "blue")] * 4, [_scene("blue", "red")] * 4,
                        [_scene("red", "blue")] * 4, [_scene("red", "blue")] * 4)
    assert binds["colours_right"]["value"] == 1 and binds["colours_right_swapped_prompt"]["value"] == 1
    assert binds["colours_ignore_prompt_order"]["value"] == 0 and binds["colours_follow_mirrored_noise"]["value"] == 0
    noise = mod.measure(pairs, [_scene("blue", "red")] * 4, [_scene("blue", "red")] * 4,
                        [_scene("red", "blue")] * 4, [_scene("blue", "red")] * 4)
    assert noise["colours_right"]["value"] == 0 and noise["colours_ignore_prompt_order"]["value"] == 1
    assert noise["colours_follow_mirrored_noise"]["value"] == 1 and noise["colours_follow_half_means"]["value"] == 0
    assert noise["shapes_right"]["value"] == 1 and noise["colours_right"]["n"] == 4


def test_pair_prompts_name_two_colours_and_two_shapes_and_repeat_with_the_seed():
    mod = script()
    pairs = mod.pair_prompts(50, 3)
    assert pairs == mod.pair_prompts(50, 3) and pairs != mod.pair_prompts(50, 4)
    assert all(c1 != c2 and s1 != s2 for c1, s1, c2, s2 in pairs)
