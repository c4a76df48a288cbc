"""Weights hashing covers 0-d tensors; atomic writes leave files readable as the umask allows."""

import os
import stat

import torch

from safediff.hashing import state_sha256
from safediff.storage import write_json_atomic


def test_hash_handles_scalars_and_changes_with_values():
    m = torch.nn.Module()
    m.scale = torch.nn.Parameter(torch.tensor(2.0))
    m.lin = torch.nn.Linear(2, 2)
    h = state_sha256([m])
    with torch.no_grad():
        m.scale += 1
    assert state_sha256([m]) != h


def test_atomic_json_respects_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "a.json").stat().st_mode)
    assert mode == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
