import math
from collections import Counter

import numpy as np
import pytest

from safediff.sandbox import world
from safediff.sandbox.world import (COLOURS, HELD_OUT_TEMPLATES, PLAIN_TEMPLATES, RGB, SHAPES, SYNONYMS,
                                    TRAIN_TEMPLATES, Scene, coverage, fill, random_scene, render,
                                    render_attributes, sample_batch, vocabulary)


def test_render_is_deterministic_in_the_seed():
    a = render_attributes("red", "circle", np.random.default_rng(3))
    b = render_attributes("red", "circle", np.random.default_rng(3))
    c = render_attributes("red", "circle", np.random.default_rng(4))
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("shape,area", [("circle", lambda h: math.pi * h * h), ("square", lambda h: (1.7 * h) ** 2),
                                        ("triangle", lambda h: 2 * h * h)])
def test_coverage_integrates_to_the_shape_area(shape, area):
    rng = np.random.default_rng(0)
    for _ in range(20):
        scene = random_scene(rng, "blue", shape)
        assert coverage(scene).sum() == pytest.approx(area(scene.size), rel=0.03)


def test_object_inside_image_white_border_exact_colour_and_antialiased_edges():
    rng = np.random.default_rng(1)
    for _ in range(50):
        scene = random_scene(rng)
        img = render(scene).astype(int)
        border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
        assert (border == 255).all()
        a = coverage(scene)
        assert (img[a == 1] == RGB[scene.colour]).all()
        assert ((a > 0) & (a < 1)).any()  # anti-aliased edge pixels


def test_shapes_differ_for_the_same_placement():
    base = Scene("green", "circle", 10.0, 16.0, 16.0)
    masks = [coverage(Scene("green", s, base.size, base.cx, base.cy)) for s in SHAPES]
    assert all(np.abs(masks[i] - masks[j]).sum() > 20 for i in range(3) for j in range(i + 1, 3))


def test_articles_agree_with_the_following_word():
    assert fill("{a} {c} {s}", "azure", "circle") == "an azure circle"
    assert fill("{a} {c} {s}", "red", "circle") == "a red circle"
    assert fill("an image of {a} {c} {s}", "emerald", "box") == "an image of an emerald box"
    assert fill("{a} {s} that is {c}", "golden", "triangle") == "a triangle that is golden"


def test_templates_split_into_plain_and_held_out():
    assert set(PLAIN_TEMPLATES) | set(HELD_OUT_TEMPLATES) == set(TRAIN_TEMPLATES)
    assert not set(PLAIN_TEMPLATES) & set(HELD_OUT_TEMPLATES)
    assert {"red", "blue", "green", "yellow"} <= set(COLOURS) and {"circle", "square", "triangle"} <= set(SHAPES)
    assert {"crimson", "scarlet"} <= set(SYNONYMS["red"]) and {"navy", "azure"} <= set(SYNONYMS["blue"])


def test_captions_mix_empty_single_attribute_synonyms_and_only_use_the_vocabulary():
    rng = np.random.default_rng(0)
    images, caps, scenes = sample_batch(rng, 3000)
    assert images.shape == (3000, 32, 32, 3)
    empty = sum(c == "" for c in caps) / len(caps)
    assert 0.08 < empty < 0.12
    vocab = set(vocabulary())
    counts = Counter()
    for c, s in zip(caps, scenes):
        words = set(c.split())
        assert words <= vocab
        colour_words = {s.colour, *SYNONYMS[s.colour]} & words
        shape_words = {s.shape, *SYNONYMS[s.shape]} & words
        others = (set(COLOURS) | set(SHAPES) | {w for v in SYNONYMS.values() for w in v}) - {s.colour, s.shape} \
            - set(SYNONYMS[s.colour]) - set(SYNONYMS[s.shape])
        assert not words & others  # a caption never names an attribute the image does not have
        counts[(bool(colour_words), bool(shape_words))] += 1
        counts["synonym"] += bool(words & (set(SYNONYMS[s.colour]) | set(SYNONYMS[s.shape])))
    assert counts[(True, False)] > 300 and counts[(False, True)] > 300 and counts[(True, True)] > 1500
    assert counts["synonym"] > 300


def test_sample_batch_is_deterministic():
    a = sample_batch(np.random.default_rng(9), 16)
    b = sample_batch(np.random.default_rng(9), 16)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]


def test_unknown_shape_is_rejected():
    with pytest.raises(ValueError):
        coverage(Scene("red", "hexagon", 8.0, 16.0, 16.0))
    assert world.IMAGE_SIZE == 32
