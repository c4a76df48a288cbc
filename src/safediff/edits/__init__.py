"""Edits: what an eraser produces, applied to a model by loading (``SPEC+EDIT``), below both models and erasers."""

from safediff.edits.edit import Edit, changed_tensors, resolve_parameter, split_name

__all__ = ["Edit", "changed_tensors", "resolve_parameter", "split_name"]
