"""A run folder: content-addressed images, one record file per finished batch, the protocol, the results.

    RUN/protocol.json          what determines every number (written once; a different protocol is refused)
    RUN/images/<sha256>.png    images named by the sha256 of their PNG bytes
    RUN/batches/<id>.json      the records of one batch, written after all its images
    RUN/results.json           metrics + per-sample records (written last)

Every file is written atomically (temporary file + ``os.replace``), so a run killed at any moment leaves only whole
files (and perhaps a stray ``.*.tmp``, removed on the next start). A batch counts as done when its record file exists
and every image it names is present with the right hash; anything else is redone, and since an image depends only
on the protocol and its batch, redoing it reproduces the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safediff.errors import SafediffError
from safediff.protocol import write_bytes_atomic, write_json_atomic

PROTOCOL = "protocol.json"
RESULTS = "results.json"


def canonical(data) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def _differences(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if canonical(old) == canonical(new) else [prefix or "(root)"]


class RunStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.images = self.root / "images"
        self.batches = self.root / "batches"

    @classmethod
    def open(cls, root: str | Path, identity: dict, provenance: dict | None = None) -> "RunStore":
        """Create RUN for ``identity``, or reopen it when it was made with exactly the same identity."""
        store = cls(Path(root))
        proto = store.root / PROTOCOL
        if proto.is_file():
            try:
                old = json.loads(proto.read_text())["identity"]
            except (ValueError, KeyError):
                raise SafediffError(f"'{proto}' is unreadable; this is not a safediff run folder") from None
            old = json.loads(canonical(old))
            new = json.loads(canonical(identity))
            diff = _differences(old, new)
            if diff:
                shown = ", ".join(diff[:4]) + (f" (+{len(diff) - 4} more)" if len(diff) > 4 else "")
                raise SafediffError(f"run folder '{store.root}' was made with a different protocol (differs in: "
                                    f"{shown}); use a new --out folder, never mix protocols in one run")
        elif store.root.exists() and (not store.root.is_dir() or any(store.root.iterdir())):
            raise SafediffError(f"--out '{store.root}' exists and is not a safediff run folder (no {PROTOCOL}); "
                                "choose a new folder")
        else:
            try:
                write_json_atomic(proto, {"identity": identity, "created": provenance or {}})
            except OSError as e:
                raise SafediffError(f"--out '{store.root}' is not writable: {e.strerror}") from None
        store.images.mkdir(exist_ok=True)
        store.batches.mkdir(exist_ok=True)
        store._remove_partial_writes()
        return store

    def _remove_partial_writes(self) -> None:
        for folder in (self.root, self.images, self.batches):
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)

    def put_image(self, png: bytes) -> str:
        digest = hashlib.sha256(png).hexdigest()
        path = self.images / f"{digest}.png"
        if not (path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == digest):
            write_bytes_atomic(path, png)
        return digest

    def image_path(self, digest: str) -> Path:
        return self.images / f"{digest}.png"

    def _batch_path(self, batch_id: int) -> Path:
        return self.batches / f"{batch_id:06d}.json"

    def put_batch(self, batch_id: int, records: list[dict]) -> None:
        write_json_atomic(self._batch_path(batch_id), {"batch": batch_id, "records": records})

    def batch(self, batch_id: int) -> list[dict] | None:
        """The records of a finished batch whose images are all intact, else None (to be redone)."""
        path = self._batch_path(batch_id)
        if not path.is_file():
            return None
        try:
            records = json.loads(path.read_text())["records"]
        except (ValueError, KeyError):
            return None
        for r in records:
            img = self.image_path(r["image"])
            if not img.is_file() or hashlib.sha256(img.read_bytes()).hexdigest() != r["image"]:
                return None
        return records

    def write_results(self, results: dict) -> Path:
        path = self.root / RESULTS
        write_json_atomic(path, results)
        return path
