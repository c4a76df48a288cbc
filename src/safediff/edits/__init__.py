"""Edits: what an eraser produces, applied to a model by loading (``SPEC+EDIT``), below both models and erasers."""

from safediff.edits.edit import Edit, resolve_parameter, split_name

__all__ = ["Edit", "resolve_parameter", "split_name"]
