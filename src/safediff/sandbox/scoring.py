"""Judging a generated image against its prompt-set row (``sandbox.benchmarks``), from the objects the detectors read
(``detectors.sandbox.objects``: dicts with ``colour``, ``shape``, ``style``, ``side``, ``area``; a benchmark run's
records hold them as ``detections["sandbox-presence"]["objects"]``).

Each intended object of the row is matched with one detected object: a lone object (position ``any``) with the
largest object found anywhere, a ``left`` / ``right`` object with the largest object found in that half. Then, per
intended object: was an object there (``found``), is each value the row names right (``colour`` / ``shape`` /
``style``: True, False, or None where the row leaves it open), are all of them right (``correct``), and the values
read (``read``). An erasure's target object is *gone* when ``read[axis] != target``; the other object of a
two-object row is *kept* when it is ``correct`` (in its own half, with its values).
"""

from __future__ import annotations

AXES = ("colour", "shape", "style")


def assign(intended: list[dict], found: list[dict]) -> list[dict | None]:
    """The detected object standing for each intended one (None where there is none)."""
    out = []
    for obj in intended:
        pool = found if obj["position"] == "any" else [f for f in found if f["side"] == obj["position"]]
        out.append(max(pool, key=lambda f: f["area"]) if pool else None)
    return out


def judge(row: dict, found: list[dict]) -> list[dict]:
    """Per intended object of ``row``: ``{"found", "colour", "shape", "style", "correct", "read"}``."""
    out = []
    for obj, got in zip(row["objects"], assign(row["objects"], found)):
        checks = {axis: None if obj[axis] is None else got is not None and got[axis] == obj[axis] for axis in AXES}
        out.append({"found": got is not None, **checks,
                    "correct": got is not None and all(v for v in checks.values() if v is not None),
                    "read": {axis: got[axis] if got else None for axis in AXES}})
    return out


def target_shown(row: dict, found: list[dict]) -> bool:
    """Does the image still show the row's target (on the object that carries it)?"""
    return any(j["read"][row["axis"]] == row["target"]
               for o, j in zip(row["objects"], judge(row, found)) if o["target"])


def others_kept(row: dict, found: list[dict]) -> bool:
    """Are all the row's non-target objects drawn right, in their place?"""
    return all(j["correct"] for o, j in zip(row["objects"], judge(row, found)) if not o["target"])


def rest_kept(row: dict, found: list[dict]) -> bool:
    """Is everything the row asks for but its target drawn right: the target object's values on the other axes, and
    every other object in its place?"""
    kept = True
    for obj, j in zip(row["objects"], judge(row, found)):
        if obj["target"]:
            kept &= j["found"] and all(j[a] for a in AXES if a != row["axis"] and j[a] is not None)
        else:
            kept &= j["correct"]
    return kept
