"""The eraser contract, checked for every registered eraser at its ``sandbox["smoke"]`` settings on tiny models.

An eraser added to ``safediff.registry.ERASERS`` is covered here without writing these tests again:
- ``fit`` leaves the model as it found it and changes only parameters the eraser declares (``touches``);
- applying the edit changes exactly its tensors, and ``revert`` restores every weight bit for bit;
- save -> load -> apply reproduces the images of the applied edit, bit for bit;
- at the eraser's ``zero_strength`` settings the edit changes nothing beyond float rounding;
- it fits on SD-1.x, SDXL, SD3 and FLUX tiny models.
"""

import pytest
import torch
from conftest import tiny_model
from weight_checks import assert_same, changed, snapshot

from safediff.concepts import resolve
from safediff.edits import Edit
from safediff.erasers import build_eraser
from safediff.registry import ERASERS
from safediff.sampling import generate

NAMES = ERASERS.primary_names()
RED = resolve("red")
ARCHS = ["tiny-sd", "tiny-sd3", "tiny-flux"]


def eraser(name: str, **extra):
    return build_eraser(name, **{**ERASERS.get(name).sandbox.get("smoke", {}), **extra})


@pytest.fixture(scope="module")
def fits():
    """(name, architecture) -> (model, eraser, edit, weights before): each fit once for the tests below, which leave
    the model as they found it."""
    cache = {}

    def fit(name: str, arch: str):
        if (name, arch) not in cache:
            model = tiny_model(arch)
            before = snapshot(model)
            e = eraser(name)
            edit = e.fit(model, RED, progress=False)
            assert_same(before, snapshot(model))  # fit leaves the model as it found it
            cache[name, arch] = (model, e, edit, before)
        return cache[name, arch]

    return fit


@pytest.fixture
def fitted(request, fits):
    return fits(*request.param)


CASES = [pytest.param((n, a), id=f"{n}-{a}") for n in NAMES for a in ARCHS]


@pytest.mark.parametrize("fitted", CASES, indirect=True)
def test_contract_touches_only_what_it_declares_and_reverts_bit_exactly(fitted):
    model, e, edit, before = fitted
    assert edit.tensors, "the edit changes something at the smoke settings"
    assert all(torch.isfinite(t).all() for t in edit.tensors.values())
    undeclared = [n for n in edit.tensors if not e.touches(n)]
    assert not undeclared, undeclared[:3]
    edit.apply(model)
    assert changed(before, snapshot(model)) == set(edit.tensors)
    edit.revert(model)
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("fitted", CASES, indirect=True)
def test_contract_saved_edit_reproduces_the_images(fitted, tmp_path):
    model, _, edit, _ = fitted
    edit.apply(model)
    direct = generate(model, ["a red circle"], [4], steps=2, progress=False).pixels
    edit.revert(model)
    loaded = Edit.load(edit.save(tmp_path / "edit.safetensors"))
    assert loaded.digest == edit.digest
    loaded.apply(model)
    assert torch.equal(generate(model, ["a red circle"], [4], steps=2, progress=False).pixels, direct)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", NAMES)
def test_contract_zero_strength_changes_nothing(arch, name):
    model = tiny_model(arch)
    before = snapshot(model)
    edit = eraser(name, **ERASERS.get(name).zero_strength).fit(model, RED, progress=False)
    for key, t in edit.tensors.items():  # closed forms solve W T with T = I up to rounding
        ref = before[key]
        assert ((t - ref).abs().max() / ref.abs().max()) <= 1e-5, key


@pytest.mark.parametrize("name", NAMES)
def test_contract_fits_sdxl(tiny_sdxl, name):
    e = eraser(name)
    edit = e.fit(tiny_sdxl, RED, progress=False)
    assert edit.tensors and all(e.touches(n) for n in edit.tensors)
    assert all(torch.isfinite(t).all() for t in edit.tensors.values())
