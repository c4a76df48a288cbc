"""The eraser contract, checked for every registered eraser at its ``sandbox["smoke"]`` settings on tiny models.

An eraser added to ``safediff.registry.ERASERS`` is covered here without writing these tests again:
- ``fit`` leaves the model as it found it and changes only parameters the eraser declares (``touches``);
- applying the edit changes exactly its tensors, and ``revert`` restores every weight bit for bit;
- save -> load -> apply reproduces the images of the applied edit, bit for bit;
- at the eraser's ``zero_strength`` settings the edit changes nothing beyond float rounding;
- it fits on SD-1.x and SDXL tiny models.
"""

import pytest
import torch
from weight_checks import assert_same, changed, snapshot

from safediff.concepts import resolve
from safediff.edits import Edit
from safediff.erasers import build_eraser
from safediff.registry import ERASERS
from safediff.sampling import generate

NAMES = ERASERS.primary_names()
RED = resolve("red")


def eraser(name: str, **extra):
    return build_eraser(name, **{**ERASERS.get(name).sandbox.get("smoke", {}), **extra})


@pytest.fixture
def fitted(request, tiny_sd):
    name = request.param
    before = snapshot(tiny_sd)
    e = eraser(name)
    edit = e.fit(tiny_sd, RED, progress=False)
    assert_same(before, snapshot(tiny_sd))  # fit leaves the model as it found it
    return e, edit, before


@pytest.mark.parametrize("fitted", NAMES, indirect=True)
def test_contract_touches_only_what_it_declares_and_reverts_bit_exactly(tiny_sd, fitted):
    e, edit, before = fitted
    assert edit.tensors, "the edit changes something at the smoke settings"
    undeclared = [n for n in edit.tensors if not e.touches(n)]
    assert not undeclared, undeclared[:3]
    edit.apply(tiny_sd)
    assert changed(before, snapshot(tiny_sd)) == set(edit.tensors)
    edit.revert(tiny_sd)
    assert_same(before, snapshot(tiny_sd))


@pytest.mark.parametrize("fitted", NAMES, indirect=True)
def test_contract_saved_edit_reproduces_the_images(tiny_sd, fitted, tmp_path):
    _, edit, _ = fitted
    edit.apply(tiny_sd)
    direct = generate(tiny_sd, ["a red circle"], [4], steps=2, progress=False).pixels
    edit.revert(tiny_sd)
    loaded = Edit.load(edit.save(tmp_path / "edit.safetensors"))
    assert loaded.digest == edit.digest
    loaded.apply(tiny_sd)
    assert torch.equal(generate(tiny_sd, ["a red circle"], [4], steps=2, progress=False).pixels, direct)


@pytest.mark.parametrize("name", NAMES)
def test_contract_zero_strength_changes_nothing(tiny_sd, name):
    before = snapshot(tiny_sd)
    edit = eraser(name, **ERASERS.get(name).zero_strength).fit(tiny_sd, RED, progress=False)
    for key, t in edit.tensors.items():  # closed forms solve W T with T = I up to rounding
        ref = before[key]
        assert ((t - ref).abs().max() / ref.abs().max()) <= 1e-5, key


@pytest.mark.parametrize("name", NAMES)
def test_contract_fits_sdxl(tiny_sdxl, name):
    e = eraser(name)
    edit = e.fit(tiny_sdxl, RED, progress=False)
    assert edit.tensors and all(e.touches(n) for n in edit.tensors)
    assert all(torch.isfinite(t).all() for t in edit.tensors.values())
