"""`safediff ui`: the comparison behind the page (columns, same seeds, the guard changes only its own column, the
edit only the edited columns), the app builds, and a missing extra or bad input is one clear line."""

import sys

import pytest
import torch

from cli_helpers import run_cli
from safediff.errors import SafediffError
from safediff.ui import ModelCache, compare, panels


@pytest.fixture
def edited_folder(tiny_folder, tmp_path):
    from safediff.concepts import resolve
    from safediff.erasers.uce import UCE
    from safediff.models import load_pipeline

    path = tmp_path / "red.safetensors"
    UCE().fit(load_pipeline(str(tiny_folder)), resolve("red"), progress=False).save(path)
    return f"{tiny_folder}+{path}"


def pixels(images):
    import numpy as np

    return torch.tensor(np.stack([np.asarray(i) for i in images])).float()


def test_columns_base_edited_and_guarded_share_seeds(tiny_folder, edited_folder):
    models = ModelCache()
    r = compare(models, edited_folder, "a red circle", seed=3, n=2, guard="sld:max", concept="red", steps=2)
    assert [c.label for c in r.columns] == [f"{tiny_folder} (no edits)", edited_folder, f"{edited_folder} + sld:max"]
    assert r.seeds == [3, 4] and all(len(c.images) == 2 for c in r.columns)
    base, edited, guarded = (pixels(c.images) for c in r.columns)
    assert not torch.equal(base, edited) and not torch.equal(edited, guarded)
    assert r.columns[2].settings["guard"]["name"] == "sld" and r.columns[1].settings["guard"]["name"] == "none"
    assert set(r.protocol["models"]) == {str(tiny_folder), edited_folder}
    assert [c.role for c in r.columns] == ["base", "model", "guarded"] and panels(r) == r.columns
    # the same model generating alone gives the same images: columns are independent and cached models unchanged
    alone = compare(models, str(tiny_folder), "a red circle", seed=3, n=2, steps=2)
    assert [c.label for c in alone.columns] == [str(tiny_folder)] and torch.equal(pixels(alone.columns[0].images), base)
    assert panels(alone) == [None, alone.columns[0], None]


@pytest.mark.parametrize("kwargs, words", [
    ({"spec": " "}, "empty model"),
    ({"n": 0}, "between 1 and 8"),
    ({"guard": "sdl"}, "unknown guard 'sdl'"),
    ({"guard": "sld:huge"}, "unknown preset"),
])
def test_bad_input_is_one_clear_error(tiny_folder, kwargs, words):
    args = {"spec": str(tiny_folder), "prompt": "x", "seed": 0, "n": 1, "steps": 1, **kwargs}
    with pytest.raises(SafediffError, match=words):
        compare(ModelCache(), **args)


def test_app_builds_with_gradio():
    pytest.importorskip("gradio")
    from safediff.ui import build_app

    app = build_app("sandbox")
    assert type(app).__name__ == "Blocks"


def test_missing_extra_names_the_install(monkeypatch):
    from safediff.ui import build_app

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio now raises ImportError
    with pytest.raises(SafediffError, match=r"pip install safediff\[ui\]"):
        build_app()


def test_cli_bad_port_is_one_line():
    r = run_cli("ui", "--port", "0")
    assert r.returncode == 2 and "port must be in 1..65535" in r.stderr and "Traceback" not in r.stderr


def test_model_cache_keeps_the_most_recent_models(tiny_folder, edited_folder):
    models = ModelCache(keep=1)
    first = models.get(str(tiny_folder))
    assert models.get(str(tiny_folder)) is first  # cached
    models.get(edited_folder)
    assert models.get(str(tiny_folder)) is not first  # evicted by the edited model, loaded again
