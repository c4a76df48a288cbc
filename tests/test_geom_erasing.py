"""Geom-Erasing: boxes become location tokens, flagged images' captions carry the concept and its place, the learned
rows are the location tokens' only, the declared negative prompt is what the sampler uses, the mark detector locates
the glyph."""

import numpy as np
import pytest
import torch

from safediff.concepts import resolve
from safediff.detectors.sandbox import SandboxMark
from safediff.erasers.geom_erasing import GeomErasing, box_bins, location_tokens
from safediff.errors import SafediffError
from safediff.imagesets import training_images
from safediff.sampling import generate
from safediff.sandbox.geometry import MARK_ORIGIN
from safediff.sandbox.world import Object, Scene, render

SMOKE = {**GeomErasing.sandbox["smoke"], "detector": "sandbox-mark", "n_images": 8}
MARK = resolve("mark")


def test_boxes_become_the_cells_of_their_first_and_last_pixels():
    assert box_bins((0.0, 0.0, 1.0, 1.0), 8) == (0, 0, 7, 7)
    assert box_bins((52 / 64, 52 / 64, 60 / 64, 60 / 64), 8) == (6, 6, 7, 7)
    assert box_bins((0.5, 0.25, 0.5 + 1 / 64, 0.25 + 1 / 64), 4) == (2, 1, 2, 1)


def test_the_mark_detector_locates_the_glyph_only_where_it_is():
    obj = Object("red", "circle", "solid", 12.0, 20.0, 20.0)
    images = torch.from_numpy(np.stack([render(Scene((obj,), mark)) for mark in (True, False)]) / 255.0)
    boxes = SandboxMark().locate(images.permute(0, 3, 1, 2).float())
    r, c = MARK_ORIGIN
    assert boxes == [(c / 64, r / 64, (c + 8) / 64, (r + 8) / 64), None]


def test_location_tokens_are_single_tokens_and_too_many_bins_are_refused(tiny_sd):
    words, ids = location_tokens(tiny_sd.adapter, 4, ())
    assert len(words) == 4 and len(ids) == 1 and len(set(ids[0])) == 4
    tok = tiny_sd.adapter.tokenizers[0]
    assert all(tok(w, add_special_tokens=False).input_ids == [i] for w, i in zip(words, ids[0]))
    with pytest.raises(SafediffError, match="not one token"):
        location_tokens(tiny_sd.adapter, 1, ("xy",))
    with pytest.raises(SafediffError, match="single-token location strings"):
        location_tokens(tiny_sd.adapter, 5, tuple("~^|`"))


def test_flagged_images_get_the_concept_and_its_place(tiny_sd):
    edit = GeomErasing(**SMOKE).fit(tiny_sd, MARK, progress=False)
    info = edit.metadata["info"]
    g = torch.Generator(device="cpu").manual_seed(0)  # the eraser's seed: its images, drawn again
    data = training_images(tiny_sd, 8, g, "world", prompts=[])
    flagged = SandboxMark().verdict(data.pixels)
    assert info["flagged"] == int(flagged.sum()) > 0
    place = "mark " + " ".join(info["location_tokens"][i] for i in (6, 6, 7, 7))
    assert info["places"] == {place: info["flagged"]} and info["negative_prompt"] == place


def test_only_the_location_rows_and_the_chosen_modules_change(tiny_sd):
    edit = GeomErasing(**SMOKE).fit(tiny_sd, MARK, progress=False)
    (table,) = [n for n in edit.tensors if n.startswith("text_encoder.")]
    assert table.endswith("embeddings.token_embedding.weight")
    old = tiny_sd.pipe.text_encoder.get_input_embeddings().weight
    rows = (edit.tensors[table] != old).any(dim=1).nonzero().flatten().tolist()
    _, ids = location_tokens(tiny_sd.adapter, SMOKE.get("bins", 8), ())
    assert set(rows) <= set(ids[0]) and rows
    assert all(".attn2." in n for n in edit.tensors if n.startswith("unet."))


def test_the_declared_negative_prompt_is_what_the_sampler_uses(tiny_sd):
    edit = GeomErasing(**SMOKE).fit(tiny_sd, MARK, progress=False)
    negative = edit.metadata["info"]["negative_prompt"]
    edit.apply(tiny_sd)
    assert tiny_sd.negative_prompt == negative
    implicit = generate(tiny_sd, ["a red circle"], [3], steps=2, progress=False)
    explicit = generate(tiny_sd, ["a red circle"], [3], steps=2, negative_prompt=negative, progress=False)
    assert torch.equal(implicit.pixels, explicit.pixels) and implicit.settings["negative_prompt"] == [negative]
    edit.revert(tiny_sd)
    quiet = GeomErasing(**{**SMOKE, "negative": False}).fit(tiny_sd, MARK, progress=False)
    assert quiet.metadata["info"]["negative_prompt"] is None
    quiet.apply(tiny_sd)
    assert tiny_sd.negative_prompt is None


def test_it_needs_a_detector_and_one_concept(tiny_sd):
    with pytest.raises(SafediffError, match="needs a detector"):
        GeomErasing(**{**SMOKE, "detector": ""}).fit(tiny_sd, MARK, progress=False)
    with pytest.raises(SafediffError, match="one implicit concept per fit"):
        GeomErasing(**SMOKE).fit(tiny_sd, resolve("red,blue"), progress=False)
