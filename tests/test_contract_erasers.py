"""The eraser contract, checked for every registered eraser at its ``sandbox["smoke"]`` settings on tiny models.

An eraser added to ``safediff.registry.ERASERS`` is covered here without writing these tests again:
- ``fit`` leaves the model as it found it and changes only parameters the eraser declares (``touches``);
- applying the edit changes exactly its tensors, and ``revert`` restores every weight bit for bit;
- save -> load -> apply reproduces the images of the applied edit, bit for bit;
- at the eraser's ``zero_strength`` settings the edit changes nothing beyond float rounding;
- it fits on SD-1.x, SDXL, SD3 and FLUX tiny models, or refuses an architecture it does not declare (``archs``) in
  one line that says why.
"""

import pytest
import torch
from conftest import tiny_model
from weight_checks import assert_same, changed, snapshot

from safediff.concepts import resolve
from safediff.edits import Edit
from safediff.erasers import build_eraser
from safediff.errors import SafediffError
from safediff.registry import ERASERS
from safediff.sampling import generate

NAMES = ERASERS.primary_names()
RED = resolve("red")
ARCHS = ["tiny-sd", "tiny-sd3", "tiny-flux"]
ARCH_OF = {"tiny-sd": "sd1", "tiny-sd3": "sd3", "tiny-flux": "flux"}


def runs_on(name: str, arch: str) -> bool:
    archs = ERASERS.get(name).archs
    return not archs or ARCH_OF[arch] in archs


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


CASES = [pytest.param((n, a), id=f"{n}-{a}") for n in NAMES for a in ARCHS if runs_on(n, a)]
REFUSED = [pytest.param(n, a, id=f"{n}-{a}") for n in NAMES for a in ARCHS if not runs_on(n, a)]


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


@pytest.mark.parametrize("name, arch", [pytest.param(*c.values[0], id=c.id) for c in CASES])
def test_contract_zero_strength_changes_nothing(arch, name):
    model = tiny_model(arch)
    before = snapshot(model)
    edit = eraser(name, **ERASERS.get(name).zero_strength).fit(model, RED, progress=False)
    for key, t in edit.tensors.items():  # closed forms solve W T with T = I up to rounding
        ref = before[key]
        assert ((t - ref).abs().max() / ref.abs().max()) <= 1e-5, key


@pytest.mark.parametrize("name, arch", REFUSED)
def test_contract_refuses_an_architecture_it_does_not_declare_in_one_line(name, arch):
    cls = ERASERS.get(name)
    assert cls.archs_reason, f"{name} refuses {arch} without saying why"
    with pytest.raises(SafediffError) as err:
        eraser(name).fit(tiny_model(arch), RED, progress=False)
    assert "\n" not in str(err.value) and cls.archs_reason in str(err.value)


@pytest.mark.parametrize("name", [n for n in NAMES if not ERASERS.get(n).archs or "sdxl" in ERASERS.get(n).archs])
def test_contract_fits_sdxl(tiny_sdxl, name):
    e = eraser(name)
    edit = e.fit(tiny_sdxl, RED, progress=False)
    assert edit.tensors and all(e.touches(n) for n in edit.tensors)
    assert all(torch.isfinite(t).all() for t in edit.tensors.values())
