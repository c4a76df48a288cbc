"""benchmarks/edit_residuals.py: 1 for an edit that leaves the projections as they were, well below 1 for UCE, which
maps the concept's rows toward the anchor's by least squares."""


from safediff.concepts import resolve
from safediff.erasers.uce import UCE
from bench_helpers import load_benchmark


def script():
    return load_benchmark("edit_residuals")


def test_residual_is_one_for_no_change_and_small_for_uce(tiny_sd):
    from types import SimpleNamespace

    from safediff.erasers.closed_form import kv_projections

    mod = script()
    moved = UCE().fit(tiny_sd, resolve("red"), progress=False)
    projections = kv_projections(tiny_sd)
    unchanged = SimpleNamespace(tensors={name: projections[name].weight.detach().clone() for name in moved.tensors})
    r0 = mod.residuals(tiny_sd, unchanged, "red", "to_end")
    r1 = mod.residuals(tiny_sd, moved, "red", "to_end")
    assert r0 and set(r0) == set(r1)
    assert all(abs(v - 1.0) < 1e-6 for v in r0.values())
    assert all(v < 0.9 for v in r1.values())


def test_on_an_mm_dit_the_residual_is_taken_at_the_token_row_reader(tiny_flux):
    """FLUX: the one layer reading the T5 rows (context_embedder); the pooled embedder UCE also edits is left out."""
    mod = script()
    moved = UCE().fit(tiny_flux, resolve("red"), progress=False)
    r = mod.residuals(tiny_flux, moved, "red", "to_end")
    assert list(r) == ["transformer.context_embedder.weight"]
    assert r["transformer.context_embedder.weight"] < 0.9
