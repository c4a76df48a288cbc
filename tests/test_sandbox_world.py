import itertools
import math
import re
from collections import Counter

import numpy as np
import pytest

from safediff.sandbox import world
from safediff.sandbox.captions import CaptionMix, split_words
from safediff.sandbox.geometry import MARK, MARK_ORIGIN, MARK_ZONE, OUTLINE, Polygon, coverage, silhouette
from safediff.sandbox.world import (AXES, COLOURS, HELD_OUT_TEMPLATES, IMAGE_SIZE, IMPLICIT, NEIGHBOURS, PAIR_TEMPLATES,
                                    PLAIN_TEMPLATES, RGB, SHAPES, STYLES, SYNONYMS, TRAIN_TEMPLATES, VALUES, Object,
                                    Scene, axis_of, caption, far, fill, random_object, random_scene, render,
                                    sample_batch, vocabulary, words)


def lone(colour="red", shape="circle", style="solid", size=14.0, cx=30.3, cy=29.6, mark=False) -> Scene:
    return Scene((Object(colour, shape, style, size, cx, cy),), mark)


def polygon_area(p: Polygon) -> float:
    v = np.asarray(p.vertices)
    return 0.5 * abs(float(np.sum(v[:, 0] * np.roll(v[:, 1], -1) - np.roll(v[:, 0], -1) * v[:, 1])))


# ---- values ----

def test_at_least_twenty_values_on_three_independent_axes_with_the_required_colours():
    assert {"red", "orange", "pink", "purple", "blue", "cyan", "green", "yellow"} <= set(COLOURS)
    assert len(SHAPES) >= 7 and STYLES == ("solid", "outlined", "striped") and len(VALUES) >= 20
    assert len(set(VALUES)) == len(VALUES) and [axis_of(v) for v in ("red", "star", "striped")] == \
        ["colour", "shape", "style"]
    with pytest.raises(ValueError):
        axis_of("ring")


def test_every_two_colours_ink_directions_are_at_least_20_degrees_apart():
    ink = {c: (255.0 - np.asarray(RGB[c])) / np.linalg.norm(255.0 - np.asarray(RGB[c])) for c in COLOURS}
    angle = {(a, b): math.degrees(math.acos(min(1.0, float(ink[a] @ ink[b]))))
             for a, b in itertools.combinations(COLOURS, 2)}
    assert min(angle.values()) > 20.0
    assert set(NEIGHBOURS["red"]) >= {"orange", "pink", "purple"}


def test_neighbours_are_symmetric_on_one_axis_and_far_is_the_rest():
    for v in VALUES:
        assert all(axis_of(n) == axis_of(v) and v in NEIGHBOURS[n] and n != v for n in NEIGHBOURS[v])
        assert set(far(v)) == set(AXES[axis_of(v)]) - {v, *NEIGHBOURS[v]}
    assert "blue" in far("red") and "orange" not in far("red") and far("solid") == ("outlined", "striped")


def test_synonyms_and_implicit_phrases_never_name_any_value_or_each_other():
    names = {v: {v, *SYNONYMS.get(v, ())} for v in VALUES}
    for phrases in IMPLICIT.values():
        for phrase in phrases:
            assert not set(split_words(phrase)) & set().union(*names.values()), phrase
    for v in VALUES:
        assert not names[v] & set().union(*(names[w] for w in VALUES if w != v))
    assert set(IMPLICIT) >= set(COLOURS) and words("red")[:2] == ("red", "crimson")


# ---- geometry ----

@pytest.mark.parametrize("shape", SHAPES)
def test_solid_coverage_integrates_to_the_shape_area_and_fits_its_box(shape):
    h = 15.0
    parts = silhouette(shape, h)
    if shape == "circle":
        area = math.pi * h * h
    elif shape == "heart":
        disc = parts[0]
        area = polygon_area(parts[2]) + math.pi * disc.r ** 2  # the square plus two half-discs outside it
    else:
        area = polygon_area(parts[0])
    a, (top, left) = coverage(shape, "solid", h, 30.3, 31.7, IMAGE_SIZE)
    assert a.sum() == pytest.approx(area, rel=0.01)
    rows, cols = np.nonzero(a)
    assert rows.min() + top >= math.floor(31.7 - h) and rows.max() + top <= math.ceil(31.7 + h)
    assert cols.min() + left >= math.floor(30.3 - h) and cols.max() + left <= math.ceil(30.3 + h)


def test_inset_polygon_edges_are_w_inside():
    square = silhouette("square", 10.0)[0].inset(2.0)
    assert np.allclose(np.abs(square.vertices), 8.5 - 2.0)
    star = silhouette("star", 12.0)[0]
    inner = star.inset(1.5)
    v, w = np.asarray(star.vertices), np.asarray(inner.vertices)
    for i in range(len(v)):  # each inset vertex lies 1.5 from the lines of its two edges
        for a, b in ((v[i - 1], v[i]), (v[i], v[(i + 1) % len(v)])):
            e, r = b - a, w[i] - a
            d = abs(e[0] * r[1] - e[1] * r[0]) / np.linalg.norm(e)
            assert d == pytest.approx(1.5, abs=1e-9)


def test_styles_outlined_is_the_band_striped_adds_centred_stripes():
    h = 16.0
    solid, _ = coverage("circle", "solid", h, 32.0, 32.0, IMAGE_SIZE)
    outlined, _ = coverage("circle", "outlined", h, 32.0, 32.0, IMAGE_SIZE)
    striped, _ = coverage("circle", "striped", h, 32.0, 32.0, IMAGE_SIZE)
    w = OUTLINE * h
    assert outlined.sum() == pytest.approx(math.pi * (h * h - (h - w) ** 2), rel=0.02)
    assert (outlined <= solid + 1e-6).all() and (striped >= outlined - 1e-6).all() and (striped <= solid + 1e-6).all()
    centre = solid.shape[0] // 2
    assert outlined[centre, centre] == 0 and striped[centre, centre] == 1 and solid[centre, centre] == 1
    assert striped[centre + 4, centre] == 0 and striped[centre + 8, centre] == 1  # period 2 * STRIPE = 8 px
    assert 0.4 < striped.sum() / solid.sum() < 0.75


def test_unknown_shape_or_style_is_rejected():
    with pytest.raises(ValueError, match="unknown shape"):
        coverage("ring", "solid", 10.0, 32.0, 32.0, IMAGE_SIZE)
    with pytest.raises(ValueError, match="unknown style"):
        coverage("circle", "dotted", 10.0, 32.0, 32.0, IMAGE_SIZE)
    with pytest.raises(ValueError, match="unknown colour"):
        random_object(np.random.default_rng(0), colour="magenta")


# ---- scenes and rendering ----

def test_render_is_exact_and_deterministic_in_the_seed():
    a = render(random_scene(np.random.default_rng(3)))
    assert a.dtype == np.uint8 and a.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert np.array_equal(a, render(random_scene(np.random.default_rng(3))))
    assert not np.array_equal(a, render(random_scene(np.random.default_rng(4))))
    scene = lone("teal", "star", "solid")
    img = render(scene).astype(int)
    cover, (top, left) = coverage("star", "solid", 14.0, 30.3, 29.6, IMAGE_SIZE)
    full = np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool)
    full[top:top + cover.shape[0], left:left + cover.shape[1]] = cover == 1
    assert (img[full] == RGB["teal"]).all()
    assert ((cover > 0) & (cover < 1)).any()  # anti-aliased edges


def test_objects_stay_inside_out_of_the_mark_corner_and_pairs_in_their_halves():
    rng = np.random.default_rng(1)
    for _ in range(300):
        scene = random_scene(rng)
        for o in scene.objects:
            assert o.cx - o.size >= 2 and o.cx + o.size <= IMAGE_SIZE - 2
            assert o.cy - o.size >= 2 and o.cy + o.size <= IMAGE_SIZE - 2
            assert not (o.cx + o.size > MARK_ZONE and o.cy + o.size > MARK_ZONE)
        if len(scene.objects) == 2:
            left, right = scene.objects
            assert left.cx + left.size <= IMAGE_SIZE / 2 - 2 and right.cx - right.size >= IMAGE_SIZE / 2 + 2
        img = render(scene).astype(int)
        border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
        assert (border == 255).all()


def test_the_mark_is_black_exactly_on_its_glyph_and_drawn_on_a_quarter_of_the_images():
    img = render(lone(mark=True))
    r, c = MARK_ORIGIN
    glyph = img[r:r + MARK.shape[0], c:c + MARK.shape[1]]
    assert (glyph[MARK] == 0).all() and (glyph[~MARK] == 255).all()
    assert (render(lone(mark=False))[MARK_ZONE:, MARK_ZONE:] == 255).all()
    scenes = [random_scene(np.random.default_rng([7, k])) for k in range(2000)]
    assert 0.22 < np.mean([s.mark for s in scenes]) < 0.28
    assert 0.27 < np.mean([len(s.objects) == 2 for s in scenes]) < 0.33
    counts = Counter(o.colour for s in scenes for o in s.objects)
    assert set(counts) == set(COLOURS) and {o.style for s in scenes for o in s.objects} == set(STYLES)


# ---- captions ----

def test_fill_agrees_articles_drops_empty_slots_and_moves_post_nominal_colours():
    assert fill("{a} {c} {s}", "azure", "circle") == "an azure circle"
    assert fill(PLAIN_TEMPLATES[0], "red", "circle") == "a red circle"
    assert fill(PLAIN_TEMPLATES[0], "red", "circle", "outlined") == "an outlined red circle"
    assert fill("an image of {a} {t} {c} {s}", "emerald", "box") == "an image of an emerald box"
    assert fill("{a} {t} {s} that is {c}", "golden", "triangle") == "a triangle that is golden"
    assert fill(PLAIN_TEMPLATES[0], "the colour of blood", "circle", "striped") == \
        "a striped circle the colour of blood"
    assert fill("{a} {t} {c} shape", "the colour of an elephant") == "a shape the colour of an elephant"
    assert fill("{a} {t} {c} {s}", "sky-coloured", "shape with three corners") == \
        "a sky-coloured shape with three corners"
    assert fill("{a} {t} {s} that is {c}", "the colour of grass", "arrow") == "an arrow that is the colour of grass"


def test_templates_split_into_plain_and_held_out():
    assert set(PLAIN_TEMPLATES) | set(HELD_OUT_TEMPLATES) == set(TRAIN_TEMPLATES)
    assert not set(PLAIN_TEMPLATES) & set(HELD_OUT_TEMPLATES)


def test_two_object_captions_name_the_left_object_first():
    scene = Scene((Object("red", "circle", "solid", 12.0, 16.0, 20.0),
                   Object("blue", "square", "striped", 12.0, 48.0, 20.0)), False)
    plain = CaptionMix(p_empty=0.0, p_style=1.0, p_implicit=0.0, p_synonym=0.0)
    seen = {caption(scene, np.random.default_rng(k), plain) for k in range(60)}
    expected = {t.format(x="a solid red circle", y="a striped blue square") for t in PAIR_TEMPLATES}
    assert seen == expected


def test_the_mark_is_never_mentioned():
    for k in range(50):
        objs = random_scene(np.random.default_rng([k, 1])).objects
        assert caption(Scene(objs, True), np.random.default_rng(k)) == caption(Scene(objs, False),
                                                                               np.random.default_rng(k))


def test_captions_mix_kinds_and_only_say_what_the_image_shows():
    images, caps, scenes = sample_batch(np.random.default_rng(0), 3000)
    assert images.shape == (3000, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert 0.08 < sum(c == "" for c in caps) / len(caps) < 0.12
    vocab = set(vocabulary())
    said = Counter()
    for c, s in zip(caps, scenes):
        assert set(split_words(c)) <= vocab
        shown = {v for o in s.objects for v in (o.colour, o.shape, o.style)}
        for v in VALUES:
            for phrase in words(v):
                if re.search(rf"(?<![\w-]){re.escape(phrase)}(?![\w-])", c):
                    assert v in shown, (c, phrase)  # a caption never names a value the image lacks
                    said["implicit" if phrase in IMPLICIT.get(v, ()) else
                         "synonym" if phrase != v else "word"] += 1
                    said[phrase] += 1
    assert said["implicit"] > 300 and said["synonym"] > 300 and said["word"] > 3000
    every = [p for v in VALUES for p in words(v)]
    assert all(said[p] > 0 for p in every), [p for p in every if not said[p]]


def test_sample_batch_is_deterministic():
    a = sample_batch(np.random.default_rng(9), 16)
    b = sample_batch(np.random.default_rng(9), 16)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]
    assert world.IMAGE_SIZE == 64
